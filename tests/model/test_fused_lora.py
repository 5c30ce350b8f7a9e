"""The fused LoRA branch computes what peft computes, and its dropout has the right law and the right mask."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import lora_model
from qlorakit.model.fused_lora import KeepMaskDropout, keep_mask, mask_bits, mask_rate
from qlorakit.model.load import load_base_model

pytestmark = pytest.mark.numerics  # rerun on AVX2 kernels where the CPU has AVX512


def _model(path, dropout: float, fused: bool, checkpointing: bool = False):
    from peft.tuners.lora.layer import Linear as LoraLinear

    from qlorakit.model.load import enable_gradient_checkpointing

    base = load_base_model(str(path), bits=16, bf16=False, device=torch.device("cpu"))
    if checkpointing:
        enable_gradient_checkpointing(base)
    model = lora_model(base, dropout, fused)
    assert any(type(m) is LoraLinear for m in model.modules())
    return model


def _loss_and_grads(model, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _seeded(fn):
    torch.manual_seed(11)
    return fn()


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_branch_matches_peft(tiny_llama, tiny_mpt, dropout):
    """Against peft's own forward; with dropout, peft's layers hold KeepMaskDropout and draw the same masks (the
    path a 4-bit base takes), so the two agree to rounding."""
    ids = torch.arange(5, 70)[None]
    for path in (tiny_llama, tiny_mpt):
        (l1, g1), (l2, g2) = (_seeded(lambda: _loss_and_grads(_model(path, dropout, fused), ids))
                              for fused in (True, False))
        torch.testing.assert_close(l1, l2, rtol=1e-6, atol=1e-6)
        assert g1.keys() == g2.keys() and any("lora_A" in n for n in g1)
        for n in g1:
            torch.testing.assert_close(g1[n], g2[n], rtol=1e-4, atol=1e-6)


def test_fused_branch_falls_back_with_adapters_disabled(tiny_llama):
    model = _model(tiny_llama, 0.0, True)
    ids = torch.arange(5, 40)[None]
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        plain = model.get_base_model()
    assert not torch.allclose(tuned, base)  # the adapter is live, and disabling it is honoured
    with torch.no_grad():
        for m in plain.modules():
            if hasattr(m, "lora_A"):
                m.lora_B["default"].weight.zero_()
        torch.testing.assert_close(model(input_ids=ids).logits, base)


@pytest.mark.parametrize("p", [0.05, 0.5, 1e-4])
def test_keep_mask_law(p):
    n = 2_000_000
    kept = keep_mask(torch.Size([n]), p, torch.device("cpu")).double().mean().item()
    assert abs(kept - (1 - mask_rate(p))) < 5 * math.sqrt(p * (1 - p) / n)
    a, b = (keep_mask(torch.Size([1000, 64]), p, torch.device("cpu")) for _ in range(2))
    assert not torch.equal(a, b)  # fresh draws each call
    assert keep_mask(torch.Size([4096]), 0.0, torch.device("cpu")).all()


def test_mask_rate_is_the_asked_rate_to_its_bits():
    """16 random bits where they give the rate to 0.1%, else 32; the applied rate is what the scale divides by."""
    assert mask_bits(0.05) == 16 and mask_rate(0.05) == 3277 / 2 ** 16
    assert mask_bits(0.1) == 16 and abs(mask_rate(0.1) - 0.1) < 1e-3 * 0.1
    assert mask_bits(1e-4) == 32 and abs(mask_rate(1e-4) - 1e-4) < 1e-9  # 7 / 65536 would be 7% off
    x = torch.ones(4096, 64)
    drop = KeepMaskDropout(0.05).train()
    out = drop(x)
    values = out.unique().tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / (1 - mask_rate(0.05)), rel=1e-6)


def test_dropout_mask_is_the_same_in_forward_backward_and_recompute(tiny_llama):
    """Gradient checkpointing replays the forward; the replay must draw the same masks, or gradients go wrong."""
    ids = torch.arange(5, 70)[None]
    grads = []
    for checkpointing in (False, True):
        model = _model(tiny_llama, 0.3, True, checkpointing)
        torch.manual_seed(123)
        grads.append(_loss_and_grads(model, ids))
    (l1, g1), (l2, g2) = grads
    torch.testing.assert_close(l1, l2)
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-5, atol=1e-7)
    # the masks are live: another seed gives other gradients
    model = _model(tiny_llama, 0.3, True)
    torch.manual_seed(321)
    _, g3 = _loss_and_grads(model, ids)
    assert any(not torch.allclose(g1[n], g3[n]) for n in g1)


def test_dropout_backward_matches_its_own_mask():
    """Against autograd on the unfused formula with the same mask: the gradient is masked and scaled like the input."""
    from qlorakit.model.fused_lora import _LoraDelta

    torch.manual_seed(0)
    x = torch.randn(2, 7, 12, requires_grad=True)
    a, b = torch.randn(4, 12, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    base = torch.randn(2, 7, 5)
    p, s = 0.4, 2.0
    state = torch.get_rng_state()
    out = _LoraDelta.apply(base.clone(), x, a, b, a.detach(), b.detach(), s / (1 - p), p, True, torch.float32)
    torch.set_rng_state(state)
    keep = keep_mask(torch.Size([14, 12]), p, torch.device("cpu")).view(2, 7, 12)
    x2, a2, b2 = (t.detach().clone().requires_grad_() for t in (x, a, b))
    ref = base + ((x2 * keep / (1 - p)) @ a2.t()) @ b2.t() * s
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    for got, want in ((x.grad, x2.grad), (a.grad, a2.grad), (b.grad, b2.grad)):
        torch.testing.assert_close(got, want)
    assert (x.grad[~keep] == 0).all() and (x.grad[keep] != 0).all()


def test_dropout_is_unbiased_through_the_layer(tiny_llama):
    """Averaged over masks, a training-mode layer gives its eval-mode output (the 1/(1-p) rescaling is right)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    model = _model(tiny_llama, 0.5, True)
    layer = next(m for m in model.modules() if type(m) is LoraLinear)
    x = torch.randn(1, layer.in_features).expand(40_000, -1)
    with torch.no_grad():
        layer.train()
        trained = layer(x)
        layer.eval()
        want = layer(x[:1])[0]
        base = layer.base_layer(x[:1])[0]
    got = trained.mean(0)
    assert (trained.std(0) > 0).all()
    # error of the mean of the LoRA part, against the size of the LoRA part itself
    assert (got - want).abs().max() < 0.05 * (want - base).abs().max()
