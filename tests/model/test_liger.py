"""use_liger_kernel: Liger's RMSNorm, SwiGLU and RoPE kernels only where they can run (CUDA, installed, an
architecture Liger has kernels for); asked for where they cannot, one line says what is missing."""

from __future__ import annotations

import pytest

from qlorakit.errors import UserError
from qlorakit.model import liger


@pytest.mark.parametrize("setting,device,installed,has,want", [
    ("auto", "cuda", True, True, True),
    ("true", "cuda", True, True, True),
    ("false", "cuda", True, True, False),
    ("auto", "cpu", True, True, False),
    ("auto", "cuda", False, True, False),
    ("auto", "cuda", True, False, False),
])
def test_decide(setting, device, installed, has, want):
    on, why = liger.decide(setting, device, installed, "llama", has)
    assert on is want
    assert ("Liger-Kernel" in why) is want and (why.startswith("off (auto: ") or setting != "auto" or want)


@pytest.mark.parametrize("device,installed,has,message", [
    ("cpu", True, True, "use_liger_kernel: its kernels are Triton, CUDA only, and this run is on cpu; set "
                        "use_liger_kernel auto or false"),
    ("cuda", False, True, "liger-kernel is not installed (pip install 'qlorakit[cuda]')"),
    ("cuda", True, False, "Liger has no kernels for model type mpt"),
])
def test_asked_for_where_it_cannot_run_is_one_line(device, installed, has, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        liger.decide("true", device, installed, "mpt", has)


def test_on_this_cpu_auto_leaves_the_model_as_it_was(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    before = {name: type(m) for name, m in model.named_modules()}
    forwards = {name: m.forward for name, m in model.named_modules()}
    on, why = liger.use_liger_kernel(model, "auto", "cpu")
    assert not on and why == "off (auto: its kernels are Triton, CUDA only, and this run is on cpu)"
    assert {name: type(m) for name, m in model.named_modules()} == before
    assert all(m.forward == forwards[name] for name, m in model.named_modules())


def test_the_patch_gets_the_model_and_only_the_layer_kernels(monkeypatch):
    """Where it applies, Liger's function gets the model and rope/rms_norm/swiglu on, its own losses off (qlorakit's
    loss is model/loss.py's); keywords the function does not take are left out."""
    calls = []

    def apply_to_llama(rope=True, cross_entropy=False, fused_linear_cross_entropy=True, rms_norm=True, swiglu=True,
                       model=None):
        calls.append(dict(rope=rope, cross_entropy=cross_entropy, flce=fused_linear_cross_entropy,
                          rms_norm=rms_norm, swiglu=swiglu, model=model))

    class Model:
        class config:
            model_type = "llama"

    monkeypatch.setattr(liger, "apply_function", lambda model_type: apply_to_llama if model_type == "llama" else None)
    monkeypatch.setattr(liger, "installed", lambda: True)
    model = Model()
    on, _ = liger.use_liger_kernel(model, "auto", "cuda")
    assert on and calls == [dict(rope=True, cross_entropy=False, flce=False, rms_norm=True, swiglu=True, model=model)]
