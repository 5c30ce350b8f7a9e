"""The LoRA levers of add_lora: rsLoRA's scale (alpha / sqrt(r)) in the fused branch; gaussian init; DoRA on a 4-bit
base, through peft's own forward (the fused branch serves plain LoRA only), with its magnitudes trained."""

from __future__ import annotations

import math

import pytest
import torch

from qlorakit.model.fused_lora import _fused_forward, fusable_classes
from qlorakit.model.load import load_base_model
from qlorakit.model.lora import add_lora, target_modules

R, ALPHA = 16, 32.0


def _model(path, bits: int = 16, **levers):
    base = load_base_model(str(path), bits=bits, bf16=False, device=torch.device("cpu"))
    return add_lora(base, r=R, alpha=ALPHA, dropout=0.0, modules=target_modules(base, "all"), seed=0, **levers)


def _lora_layers(model):
    return [m for m in model.modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})]


@pytest.mark.parametrize("rslora,scale", [(False, ALPHA / R), (True, ALPHA / math.sqrt(R))])
@torch.no_grad()
def test_rslora_scale_is_what_the_fused_branch_applies(tiny_llama, rslora, scale):
    """Each layer's output is base(x) + scale * x A^T B^T with scale alpha / sqrt(r) under rsLoRA (8 here) and
    alpha / r without (2): computed by hand against the fused layer."""
    model = _model(tiny_llama, rslora=rslora)
    layers = _lora_layers(model)
    assert layers and all(getattr(m.forward, "__func__", None) is _fused_forward for m in layers)
    g = torch.Generator().manual_seed(0)
    for layer in layers:
        assert layer.scaling["default"] == pytest.approx(scale)
        b = layer.lora_B["default"].weight
        b.copy_(torch.randn(b.shape, generator=g) * 0.05)
        x = torch.randn(3, layer.in_features, generator=g)
        a = layer.lora_A["default"].weight
        want = layer.get_base_layer()(x) + scale * (x @ a.T @ b.T)
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_gaussian_init_draws_a_from_a_normal_of_std_1_over_r(tiny_llama):
    for init, want_std in (("gaussian", 1 / R), ("default", None)):
        layers = _lora_layers(_model(tiny_llama, init=init))
        a = torch.cat([m.lora_A["default"].weight.flatten() for m in layers])
        assert all(float(m.lora_B["default"].weight.abs().max()) == 0 for m in layers)  # the adapter starts at 0
        if want_std is None:  # Kaiming-uniform with a = sqrt(5): bounded by 1 / sqrt(in_features) = 1/8 here
            assert float(a.abs().max()) <= 1 / 8 + 1e-6
        else:
            assert float(a.std()) == pytest.approx(want_std, rel=0.05)
            assert float(a.abs().max()) > 1 / 8  # a normal's tail, past the uniform's bound


def test_dora_on_a_4bit_base_uses_peft_forward_and_trains_the_magnitudes(tiny_llama):
    from peft.tuners.lora.bnb import Linear4bit

    model = _model(tiny_llama, bits=4, dora=True)
    layers = _lora_layers(model)
    assert layers and all(isinstance(m, Linear4bit) for m in layers)
    assert all("default" in m.lora_magnitude_vector for m in layers)
    assert all(type(m) in fusable_classes() for m in layers)  # routed, but the fused branch declines DoRA ...
    model.train()
    ids = torch.arange(5, 40)[None]
    with torch.no_grad():  # ... so the output is peft's own DoRA forward, exactly
        fused_route = model(input_ids=ids).logits
        for m in layers:
            m.__dict__.pop("forward")
        peft_own = model(input_ids=ids).logits
    assert torch.equal(fused_route, peft_own)
    model(input_ids=ids, labels=ids).loss.backward()
    mags = [m.lora_magnitude_vector["default"].weight for m in layers]
    assert all(p.requires_grad and p.grad is not None and float(p.grad.abs().sum()) > 0 for p in mags)
