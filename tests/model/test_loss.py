"""The chunked head loss equals the plain one (loss and gradients, float32 and bf16 autocast) without ever holding a
full (N, V) logits tensor; a wrong normalization would be caught; Liger's kernel agrees on CUDA."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from qlorakit.data.batching import collate_packed
from qlorakit.data.tokenize import IGNORE, Example
from qlorakit.model.loss import (chunked_linear_cross_entropy, linear_cross_entropy_sum, loss_sum_chunked,
                                 supports_chunked_loss)

pytestmark = pytest.mark.numerics  # rerun on AVX2 kernels where the CPU has AVX512


def _data(n=45, d=24, vocab=300, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, d, generator=g, device=device) * 0.3).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=g, device=device)
    targets[::7] = IGNORE
    return hidden, weight, targets


def _plain(hidden, weight, targets):
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=IGNORE, reduction="sum")


def _loss_and_grads(fn, hidden, weight, targets, autocast: bool, scale: float = 0.37):
    hidden.grad = weight.grad = None
    ctx = torch.autocast(hidden.device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        loss = fn(hidden, weight, targets)
    (loss * scale).backward()  # as the step does: the sum divided by the step's trained tokens
    return loss.detach(), hidden.grad.clone(), weight.grad.clone()


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("chunk_rows", [7, 45, 1000])
def test_chunked_equals_plain_loss_and_gradients(autocast, chunk_rows):
    hidden, weight, targets = _data()
    chunked = _loss_and_grads(lambda h, w, t: chunked_linear_cross_entropy(h, w, t, chunk_rows=chunk_rows),
                              hidden, weight, targets, autocast)
    plain = _loss_and_grads(_plain, hidden, weight, targets, autocast)
    tol = dict(rtol=2e-2, atol=1e-3) if autocast else dict(rtol=1e-5, atol=1e-6)
    for a, b in zip(chunked, plain):
        torch.testing.assert_close(a, b, **tol)


def test_a_wrong_normalization_is_caught():
    """The twin: each chunk's mean instead of its sum (a per-micro-batch mean one level down) is far off."""
    hidden, weight, targets = _data()

    def chunk_means(h, w, t, rows=7):
        return sum(F.cross_entropy(F.linear(h[s:s + rows], w).float(), t[s:s + rows], ignore_index=IGNORE)
                   for s in range(0, len(t), rows))

    plain = _plain(hidden, weight, targets)
    assert abs(float(chunk_means(hidden, weight, targets) - plain)) > 0.5 * float(plain)
    assert float(chunked_linear_cross_entropy(hidden, weight, targets, chunk_rows=7)) == pytest.approx(float(plain),
                                                                                                   rel=1e-5)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_full_vocabulary_logits_in_forward_or_backward():
    hidden, weight, targets = _data(n=64, d=16, vocab=500)
    n, vocab = 64, 500
    with LargestTensor() as plain:
        _plain(hidden, weight, targets).backward()
    with LargestTensor() as chunked:
        chunked_linear_cross_entropy(hidden, weight, targets, chunk_rows=8).backward()
    assert plain.largest >= n * vocab  # the plain path holds (N, V) logits
    assert chunked.largest <= max(8 * vocab, vocab * 16) < n * vocab  # a chunk of logits, or the head's gradient


def _examples():
    ex = [Example(list(range(5, 45)), [IGNORE] * 20 + list(range(25, 45))),
          Example(list(range(50, 80)), [IGNORE] * 3 + list(range(53, 80)))]
    return collate_packed(ex)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_model_loss_equals_the_plain_step_loss(tiny_llama, autocast):
    """Against train.step.loss_sum (logits of the trained positions, float32 cross entropy): loss and LoRA grads."""
    from qlorakit.model.load import load_base_model
    from qlorakit.model.lora import add_lora, target_modules
    from qlorakit.train.step import loss_sum

    base = load_base_model(str(tiny_llama), bits=16, bf16=autocast, device=torch.device("cpu"))
    model = add_lora(base, r=4, alpha=8, dropout=0.0, modules=target_modules(base, "all"), seed=0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(3))
    assert supports_chunked_loss(model)
    batch = _examples()
    cpu = torch.device("cpu")
    results = []
    for chunked in (True, False):
        model.zero_grad()
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with ctx:
            if chunked:
                inputs = {k: v for k, v in batch.items() if k != "targets"}
                loss, n = loss_sum_chunked(model, inputs, batch["targets"], cpu)
            else:
                loss, n = loss_sum(model, batch, cpu)
        (loss / n).backward()
        results.append((loss.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters()
                                           if p.grad is not None}))
    (l1, n1, g1), (l2, n2, g2) = results
    assert n1 == n2 == 47
    tol = dict(rtol=1e-2, atol=1e-3) if autocast else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(l1, l2, **tol)
    assert g1.keys() == g2.keys() and g1
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], **(dict(rtol=5e-2, atol=5e-3) if autocast else tol))


def test_only_plain_heads_are_chunked(tiny_llama, tiny_mpt):
    from transformers import AutoModelForCausalLM

    llama = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert supports_chunked_loss(llama)
    llama.config.model_type = "gemma2"  # a head with logit softcapping: the plain loss is used
    assert not supports_chunked_loss(llama)
    assert not supports_chunked_loss(AutoModelForCausalLM.from_pretrained(tiny_mpt))


@pytest.mark.cuda
def test_cuda_liger_and_chunked_equal_the_plain_loss():
    hidden, weight, targets = _data(n=1000, d=256, vocab=5000, dtype=torch.bfloat16, device="cuda")
    plain = _loss_and_grads(_plain, hidden, weight, targets, False)
    backends = ["chunked"] + (["liger"] if _liger() else [])
    for backend in backends:
        got = _loss_and_grads(lambda h, w, t: linear_cross_entropy_sum(h, w, t, backend=backend), hidden, weight,
                              targets, False)
        for a, b in zip(got, plain):
            torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def _liger() -> bool:
    from qlorakit.model.loss import liger_available

    return liger_available()
