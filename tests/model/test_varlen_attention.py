"""Packed attention: each example gets the numbers it has alone, with no (T, T) mask and boundaries read on the
host; wrong boundaries (the leak twin) are caught; every backend's adapter computes the same attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import airoboros_rows, random_examples
from qlorakit.data.batching import collate_packed, collate_varlen
from qlorakit.data.formats import Conversation, Message
from qlorakit.data.tokenize import IGNORE, tokenize_all
from qlorakit.model import attention as att

pytestmark = pytest.mark.numerics  # rerun on AVX2 kernels where the CPU has AVX512


def examples(tokenizer, n=3):
    convs = [Conversation((Message("user", r["instruction"]), Message("assistant", r["response"])), f"x:{i}")
             for i, r in enumerate(airoboros_rows(n, seed=3))]
    return tokenize_all(convs, tokenizer, "airoboros", 512)[0]


def per_token_loss(model, batch, grad: bool = False):
    with torch.set_grad_enabled(grad):
        kw = {k: v for k, v in batch.items() if k != "targets"}
        logits = model(**kw, use_cache=False).logits
    t = batch["targets"]
    return F.cross_entropy(logits.flatten(0, 1), t.flatten(), reduction="none", ignore_index=IGNORE).view(t.shape)


@pytest.fixture(scope="module")
def packed_model(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    assert att.use_packed_attention(model) and model.config._attn_implementation == att.NAME
    return model


def _segments(exs):
    start = 0
    for e in exs:
        yield slice(start, start + len(e))
        start += len(e)


def test_packed_row_equals_each_example_alone_without_building_a_dense_mask(packed_model, tokenizer, monkeypatch):
    exs = examples(tokenizer)
    alone = [per_token_loss(packed_model, collate_packed([e]))[0] for e in exs]

    def no_dense_mask(self):
        raise AssertionError("a (T, T) mask was built for a packed row with boundaries")

    deferred = []
    init = att.DeferredMask.__init__
    monkeypatch.setattr(att.DeferredMask, "__init__", lambda self, **kw: deferred.append(1) or init(self, **kw))
    monkeypatch.setattr(att.DeferredMask, "build", no_dense_mask)
    together = per_token_loss(packed_model, collate_varlen(exs))[0]
    assert deferred  # transformers asked for the packed row's mask, and got it deferred
    for seg, a in zip(_segments(exs), alone):
        torch.testing.assert_close(together[seg], a, atol=1e-4, rtol=1e-4)


def test_boundaries_come_from_the_host_ints_and_wrong_ones_leak(packed_model, tokenizer):
    """The host boundaries are what attention uses: claiming the row is one example (the twin of a collator that
    gets them wrong) lets later examples see earlier ones, and the losses move."""
    exs = examples(tokenizer)
    batch = collate_varlen(exs)
    good = per_token_loss(packed_model, batch)[0]
    leaky = per_token_loss(packed_model, batch | {"seq_bounds": (0, batch["input_ids"].shape[1])})[0]
    segs = list(_segments(exs))
    torch.testing.assert_close(leaky[segs[0]], good[segs[0]], atol=1e-4, rtol=1e-4)  # the first sees nothing before
    for seg in segs[1:]:
        assert (leaky[seg] - good[seg]).abs().max() > 1e-3


def test_without_boundaries_a_packed_row_still_gets_its_mask(packed_model, tokenizer):
    """A caller that passes position ids but no boundaries gets the deferred mask built: no leak, just slower."""
    exs = examples(tokenizer)
    alone = [per_token_loss(packed_model, collate_packed([e]))[0] for e in exs]
    plain = {k: v for k, v in collate_packed(exs).items() if k != "cu_seq_lens_q"}
    together = per_token_loss(packed_model, plain)[0]
    for seg, a in zip(_segments(exs), alone):
        torch.testing.assert_close(together[seg], a, atol=1e-4, rtol=1e-4)


def test_gradients_of_a_packed_row_equal_the_sum_over_examples(tiny_llama, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    att.use_packed_attention(model)
    exs = examples(tokenizer)
    grads = []
    for batches in ([collate_varlen(exs)], [collate_varlen([e]) for e in exs]):
        model.zero_grad()
        for b in batches:
            per_token_loss(model, b, grad=True).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for n, g in grads[1].items():
        torch.testing.assert_close(grads[0][n], g, rtol=1e-4, atol=1e-5)


def _qkv(T=37, heads=4, kv_heads=2, dim=16, dtype=torch.float32, device="cpu"):
    g = torch.Generator(device=device).manual_seed(0)
    return [torch.randn(1, h, T, dim, generator=g, dtype=dtype, device=device) for h in (heads, kv_heads, kv_heads)]


BOUNDS = (0, 10, 25, 37)


def test_flex_document_mask_equals_the_sdpa_loop():
    q, k, v = _qkv()
    cu = torch.tensor(BOUNDS, dtype=torch.int32)
    want = att.sdpa_loop(q, k, v, BOUNDS, None, 0.0)
    torch.testing.assert_close(att.flex_varlen(q, k, v, cu, None), want, atol=1e-5, rtol=1e-5)
    broken = torch.tensor([0, 37], dtype=torch.int32)  # the twin: one example over the whole row
    assert (att.flex_varlen(q, k, v, broken, None) - want).abs().max() > 1e-2


def _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale=None):
    """What a varlen kernel computes, on (T, H, D) tensors, from its own arguments (for the adapter tests)."""
    assert q.shape[1] == k.shape[1], "the adapter must expand key/value heads for a kernel without enable_gqa"
    bounds = tuple(cu_q.tolist())
    assert max_q == max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    return att.sdpa_loop(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], bounds, scale,
                         0.0)[0]


def fake_varlen_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, is_causal=False):
    assert is_causal
    return _reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k)


def fake_varlen_2_13(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    assert window_size == (-1, 0) and enable_gqa == (query.shape[1] != key.shape[1])
    rep = query.shape[1] // key.shape[1]
    return _reference_varlen(query, key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1), cu_seq_q,
                             cu_seq_k, max_q, max_k, scale)


@pytest.mark.parametrize("fake", [fake_varlen_2_10, fake_varlen_2_13])
@pytest.mark.parametrize("scaling", [None, 0.3])
def test_torch_varlen_adapter_speaks_each_signature(monkeypatch, fake, scaling):
    """torch's varlen_attn changed its signature between releases (the GPU machine has 2.11, CI 2.13): the adapter
    maps causal, GQA and scale onto whichever it finds. Checked against fakes with those signatures."""
    import torch.nn.attention.varlen as varlen

    monkeypatch.setattr(varlen, "varlen_attn", fake)
    att._varlen_params.cache_clear()
    try:
        q, k, v = _qkv()
        cu = torch.tensor(BOUNDS, dtype=torch.int32)
        got = att.torch_varlen(q, k, v, cu, 15, scaling)
    finally:
        att._varlen_params.cache_clear()
    torch.testing.assert_close(got, att.sdpa_loop(q, k, v, BOUNDS, scaling, 0.0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device_type,dtype,dropout,available,want", [
    ("cpu", torch.bfloat16, 0.0, ("flash_attn", "torch_varlen", "flex", "sdpa_loop"), "sdpa_loop"),
    ("cuda", torch.bfloat16, 0.0, ("flash_attn", "torch_varlen", "flex", "sdpa_loop"), "flash_attn"),
    ("cuda", torch.bfloat16, 0.0, ("torch_varlen", "flex", "sdpa_loop"), "torch_varlen"),
    ("cuda", torch.float32, 0.0, ("torch_varlen", "flex", "sdpa_loop"), "flex"),
    ("cuda", torch.bfloat16, 0.1, ("torch_varlen", "flex", "sdpa_loop"), "sdpa_loop"),
    ("cuda", torch.float32, 0.0, ("sdpa_loop",), "sdpa_loop"),
])
def test_backend_choice(device_type, dtype, dropout, available, want):
    assert att.backend_for(device_type, dtype, dropout, available) == want


def test_models_with_a_sliding_window_keep_sdpa(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    model.config.sliding_window = 16
    assert not att.use_packed_attention(model) and model.config._attn_implementation == "sdpa"


# ------------------------------------------------------------------------------------------------------------
# On a CUDA device (benchmarks/gpu/run.sh runs these there)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["torch_varlen", "flash_attn", "flex"])
def test_cuda_backend_equals_the_sdpa_loop_without_a_host_sync(backend):
    if backend not in att.available_backends():
        pytest.skip(f"{backend} is not installed here")
    dtype = torch.float32 if backend == "flex" else torch.bfloat16
    q, k, v = (t.requires_grad_() for t in _qkv(T=300, heads=8, kv_heads=2, dim=64, dtype=dtype, device="cuda"))
    bounds = (0, 17, 150, 151, 300)
    cu = torch.tensor(bounds, dtype=torch.int32, device="cuda")
    fn = {"torch_varlen": lambda: att.torch_varlen(q, k, v, cu, 133, None),
          "flash_attn": lambda: att.flash_attn_varlen(q, k, v, cu, 133, None),
          "flex": lambda: att.flex_varlen(q, k, v, cu, None)}[backend]
    fn()  # compile / load once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = att.sdpa_loop(q, k, v, bounds, None, 0.0)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    g = torch.randn_like(want)
    grads = torch.autograd.grad(got, (q, k, v), g)
    ref = torch.autograd.grad(want, (q, k, v), g)
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, atol=5 * tol, rtol=5 * tol)


@pytest.mark.cuda
def test_cuda_packed_model_equals_each_example_alone(bare_llama):
    from transformers import AutoModelForCausalLM

    from qlorakit.data.batching import to_device

    model = AutoModelForCausalLM.from_pretrained(bare_llama, dtype=torch.bfloat16, device_map={"": "cuda"}).eval()
    assert att.use_packed_attention(model)
    exs = random_examples([40, 7, 90, 33])
    dev = torch.device("cuda")
    alone = [per_token_loss(model, to_device(collate_varlen([e]), dev))[0] for e in exs]
    together = per_token_loss(model, to_device(collate_varlen(exs), dev))[0]
    for seg, a in zip(_segments(exs), alone):
        torch.testing.assert_close(together[seg].float(), a.float(), atol=5e-2, rtol=5e-2)
