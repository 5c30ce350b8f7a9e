"""The fused LoRA branch on a 4-bit base: what peft computes, in float32 and under bf16 autocast, with and without
dropout; in place, without a mask at dropout 0; and low-precision copies of A and B made once per optimizer step."""

from __future__ import annotations

import contextlib

import pytest
import torch

from helpers import lora_model
from qlorakit.model.fused_lora import cache_lora_casts, fusable_classes
from qlorakit.model.load import enable_gradient_checkpointing, load_base_model

pytestmark = pytest.mark.numerics  # rerun on AVX2 kernels where the CPU has AVX512

IDS = torch.arange(5, 70)[None]


def _model(path, dropout: float, fused: bool, bf16: bool, checkpointing: bool = False, device: str = "cpu"):
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    base = load_base_model(str(path), bits=4, bf16=bf16, device=torch.device(device))
    if checkpointing:
        enable_gradient_checkpointing(base)
    model = lora_model(base, dropout, fused)
    assert any(type(m) is LoraLinear4bit for m in model.modules())  # the 4-bit layers are the ones under test
    return model


def _autocast(bf16: bool, device_type: str = "cpu"):
    return torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _loss_and_grads(model, bf16: bool, seed: int = 11):
    torch.manual_seed(seed)
    with _autocast(bf16):
        loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    return loss.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_equals_peft_on_a_4bit_base(tiny_llama, dropout, bf16):
    """Whole model: peft's Linear4bit draws the same KeepMaskDropout masks. In float32 they agree to 1e-5; under
    bf16 autocast, where the rounding falls differs (peft scales after B, the fused branch before), and two bf16
    layers of this tiny model with large weights bring that to a few percent of a gradient; the layer test below
    holds bf16 to its rounding."""
    fused = _model(tiny_llama, dropout, True, bf16)
    peft = _model(tiny_llama, dropout, False, bf16)
    (l1, g1), (l2, g2) = _loss_and_grads(fused, bf16), _loss_and_grads(peft, bf16)
    assert abs(float(l1 - l2)) <= (1e-3 if bf16 else 1e-6) * float(l2)
    assert g1.keys() == g2.keys() and any("lora_A" in n for n in g1)
    worst = max(_rel(g1[n], g2[n]) for n in g1)
    assert worst <= (8e-2 if bf16 else 1e-4), worst


def _layer(tiny_llama, dropout: float, bf16: bool, device: str = "cpu"):
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    model = _model(tiny_llama, dropout, True, bf16, device=device)
    return next(m for m in model.modules() if type(m) is LoraLinear4bit)


def _run_layer(layer, x, g, bf16: bool, fused: bool):
    """Output and the gradients of x, A and B of one layer, fused or through peft's own forward."""
    for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
        p.grad = None
    x = x.detach().clone().requires_grad_()
    forward = layer.forward if fused else type(layer).forward.__get__(layer)
    torch.manual_seed(5)
    with _autocast(bf16, x.device.type):
        out = forward(x)
    out.backward(g)
    return [out.detach().float(), x.grad.float(), layer.lora_A["default"].weight.grad,
            layer.lora_B["default"].weight.grad]


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_one_4bit_layer_equals_peft_to_rounding_and_a_wrong_scale_is_caught(tiny_llama, dropout, bf16):
    _layer_agrees(_layer(tiny_llama, dropout, bf16), bf16)


def _layer_agrees(layer, bf16: bool):
    dtype = torch.bfloat16 if bf16 else torch.float32
    dev = layer.lora_A["default"].weight.device
    x = torch.randn(2, 33, layer.in_features, generator=torch.Generator().manual_seed(1)).to(dev, dtype)
    g = torch.randn(2, 33, layer.out_features, generator=torch.Generator().manual_seed(2)).to(dev, dtype)
    ours, theirs = _run_layer(layer, x, g, bf16, True), _run_layer(layer, x, g, bf16, False)
    tol = 1e-2 if bf16 else 1e-5  # bf16 carries 8 bits: 2**-8 = 3.9e-3 per rounding
    for a, b in zip(ours, theirs):
        assert _rel(a, b) <= tol, _rel(a, b)
    layer.scaling = {k: v * 1.05 for k, v in layer.scaling.items()}  # the twin: a 5% wrong LoRA scale
    wrong = _run_layer(layer, x, g, bf16, True)
    assert max(_rel(a, b) for a, b in zip(wrong[2:], theirs[2:])) > 3 * tol


def test_under_autocast_the_fused_branch_runs_not_peft(tiny_llama, monkeypatch):
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    model = _model(tiny_llama, 0.0, True, True)

    def peft_forward(*a, **k):
        raise AssertionError("fell back to peft's forward under autocast")

    monkeypatch.setattr(LoraLinear4bit, "forward", peft_forward)
    _loss_and_grads(model, True)


def test_branch_adds_into_the_base_output_and_draws_no_mask_at_dropout_0(tiny_llama):
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    model = _model(tiny_llama, 0.0, True, False)
    layer = next(m for m in model.modules() if type(m) is LoraLinear4bit)
    seen = []
    handle = layer.base_layer.register_forward_hook(lambda mod, args, out: seen.append(out.data_ptr()))
    x = torch.randn(3, 7, layer.in_features, requires_grad=True)
    state = torch.get_rng_state()
    out = layer(x)
    handle.remove()
    assert out.data_ptr() == seen[0]  # no full-width copy: the LoRA product went into the base output
    assert torch.equal(torch.get_rng_state(), state)  # no dropout mask drawn
    out.sum().backward()
    assert x.grad is not None and layer.lora_A["default"].weight.grad is not None
    from qlorakit.model.fused_lora import KeepMaskDropout

    layer.lora_dropout["default"] = KeepMaskDropout(0.3)  # peft holds nn.Identity where dropout is 0
    layer(x)
    assert not torch.equal(torch.get_rng_state(), state)  # with dropout, masks are drawn


class DataWritingSGD(torch.optim.Optimizer):
    """Writes ``p.data`` as bitsandbytes' optimizers do: the version counter of ``p`` does not move."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data.add_(p.grad, alpha=-group["lr"])


@pytest.mark.parametrize("make_opt,bumps_version", [
    (lambda ps: torch.optim.AdamW(ps, lr=0.05), True),
    (lambda ps: torch.optim.AdamW(ps, lr=0.05, fused=True), False),
    (lambda ps: DataWritingSGD(ps, lr=0.5), False),
], ids=["adamw", "adamw-fused", "data-writing"])
def test_cast_cache_is_made_once_per_step_and_remade_after_it(tiny_llama, make_opt, bumps_version):
    """With checkpointing each layer runs twice per step (forward, recompute): the bf16 copies are made once per
    step. After optimizer.step() they are remade, so the cached model keeps equal to one that casts on every call.
    The twin, a cache that never hears of the step, keeps stale copies wherever the optimizer leaves the version
    counter alone: the fused AdamW (torch 2.13) and optimizers that write ``p.data`` (bitsandbytes')."""
    cached = _model(tiny_llama, 0.0, True, True, checkpointing=True)
    fresh = _model(tiny_llama, 0.0, True, True, checkpointing=True)
    stale = _model(tiny_llama, 0.0, True, True, checkpointing=True)
    opts = [make_opt([p for p in m.parameters() if p.requires_grad]) for m in (cached, fresh, stale)]
    cache = cache_lora_casts(cached, opts[0])
    stale_cache = cache_lora_casts(stale, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0))
    n_layers = sum(type(m) in fusable_classes() for m in cached.modules())
    for step in range(2):
        losses = []
        for m, opt in zip((cached, fresh, stale), opts):
            loss, _ = _loss_and_grads(m, True)
            losses.append(loss)
            opt.step()
            opt.zero_grad()
        assert cache.casts == 2 * n_layers * (step + 1)  # A and B of each layer, once per step
        assert torch.equal(losses[0], losses[1])
    if bumps_version:  # the version counter alone already catches the step
        assert stale_cache.casts == cache.casts and torch.equal(losses[2], losses[1])
    else:
        assert stale_cache.casts == 2 * n_layers and not torch.equal(losses[2], losses[1])


def test_cast_cache_sees_a_checkpoint_load(tiny_llama):
    model = _model(tiny_llama, 0.0, True, True)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    cache = cache_lora_casts(model, opt)
    before, _ = _loss_and_grads(model, True)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.zeros_like(p))  # what load_state_dict does
    after, _ = _loss_and_grads(model, True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), model.disable_adapter():
        base = model(input_ids=IDS, labels=IDS).loss.float()
    assert cache.casts > 0 and not torch.equal(before, after)
    torch.testing.assert_close(after, base)  # B = 0: the adapter adds nothing once the new weights are seen


@pytest.mark.cuda
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_cuda_4bit_layer_equals_peft_under_bf16_autocast(bare_llama, dropout):
    """bitsandbytes' CUDA kernels (not its CPU path) under the fused branch."""
    _layer_agrees(_layer(bare_llama, dropout, True, device="cuda"), True)
