"""Attention for packed rows that does no work across examples, without a T x T mask or a per-layer host sync.

A packed row holds several examples back to back. The stock SDPA path builds a dense (T, T) block-diagonal mask
from the position ids and computes every (query, key) pair of the row: memory and work grow with the square of the
packed length. Here each example attends within its own span. The boundaries come as the keywords transformers'
varlen kernels take (``cu_seq_lens_q``, an int32 device tensor, and ``max_length_q``, a Python int) plus
``seq_bounds``, the same boundaries as Python ints (``data.batching.collate_varlen`` makes all three on the host),
so no layer asks the device where an example ends. Backends, chosen per call (``backend_for``):

* ``flash_attn``: ``flash_attn_varlen_func`` where the flash-attn package is installed (CUDA, fp16/bf16);
* ``torch_varlen``: ``torch.nn.attention.varlen.varlen_attn`` (CUDA, fp16/bf16; torch >= 2.10, whose signature
  changed between releases: ``is_causal`` in 2.10, ``window_size=(-1, 0)`` later, ``enable_gqa`` from 2.13);
* ``flex``: ``flex_attention`` with a document mask (CUDA in fp32, or no varlen kernel), compiled on CUDA;
* ``sdpa_loop``: causal SDPA on each example's span, from the host boundaries (the CPU; attention dropout). On a
  CPU it computes in float32 when the model runs in bfloat16: torch 2.13's CPU flash kernel took 18.4 ms in bf16
  against 14.6 ms in float32, casts included, for one SmolLM2 layer's forward and backward on 4 packed examples of
  about 220 tokens (one AVX512-BF16 core).

Without boundaries the function is the stock SDPA path, so generation and padded batches are unchanged. The mask
transformers would build for a packed row is deferred (``DeferredMask``): built only if a call has no boundaries.
"""

from __future__ import annotations

import functools
import inspect
import math

import torch
import torch.nn.functional as F

NAME = "qlorakit_varlen"
HALF = (torch.float16, torch.bfloat16)


class DeferredMask:
    """The mask transformers asked for, not yet built: packed rows with boundaries never need it."""

    def __init__(self, **mask_kwargs):
        self.mask_kwargs = mask_kwargs

    def build(self):
        from transformers.masking_utils import sdpa_mask

        return sdpa_mask(**self.mask_kwargs)


def deferred_sdpa_mask(*, attention_mask=None, allow_is_causal_skip: bool = True, **kwargs):
    """``sdpa_mask``, except where it would build a full (T, T) mask for an unpadded row (packed sequences found
    from the position ids): then a ``DeferredMask``."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and not allow_is_causal_skip:
        return DeferredMask(attention_mask=None, allow_is_causal_skip=False, **kwargs)
    return sdpa_mask(attention_mask=attention_mask, allow_is_causal_skip=allow_is_causal_skip, **kwargs)


@functools.lru_cache(maxsize=None)
def available_backends() -> tuple[str, ...]:
    """The varlen backends this installation has, in order of preference."""
    found = []
    try:
        import flash_attn  # noqa: F401

        found.append("flash_attn")
    except ImportError:
        pass
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401

        found.append("torch_varlen")
    except ImportError:
        pass
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401

        found.append("flex")
    except ImportError:
        pass
    return tuple(found) + ("sdpa_loop",)


def backend_for(device_type: str, dtype: torch.dtype, dropout: float,
                available: tuple[str, ...] | None = None) -> str:
    """The backend for one call: a fused varlen kernel where the device and dtype allow, else the SDPA loop."""
    available = available_backends() if available is None else available
    if device_type != "cuda" or dropout > 0:
        return "sdpa_loop"  # the varlen kernels here take no attention dropout
    for name in available:
        if name in ("flash_attn", "torch_varlen") and dtype not in HALF:
            continue
        return name
    return "sdpa_loop"


def host_bounds(cu_seq_lens: torch.Tensor, seq_bounds) -> tuple[int, ...]:
    """Example boundaries as Python ints: ``seq_bounds`` when given, else read once per forward and kept on the
    tensor (every layer gets the same one), so at most one device sync per forward, none per layer."""
    if seq_bounds is not None:
        return tuple(seq_bounds)
    cached = getattr(cu_seq_lens, "_qlorakit_host", None)
    if cached is None:
        cached = tuple(int(b) for b in cu_seq_lens.tolist())
        cu_seq_lens._qlorakit_host = cached
    return cached


def sdpa_loop(query, key, value, bounds, scaling, dropout: float):
    """Causal SDPA per example span. query (1, H, T, D), key/value (1, H_kv, T, D) -> (1, T, H, D).

    The spans are cut with ``split``, whose backward concatenates the spans' gradients: slicing each span instead
    gives every span a full-size zero gradient of q, k and v in backward, summed afterwards (3 x T x H x D
    writes per example per layer)."""
    gqa = query.shape[1] != key.shape[1]
    sizes = [e - s for s, e in zip(bounds[:-1], bounds[1:])]  # the spans cover the row (split checks they do)
    cut = zip(query.split(sizes, dim=2), key.split(sizes, dim=2), value.split(sizes, dim=2))
    spans = [F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa)
             for q, k, v in cut]
    return torch.cat(spans, dim=2).transpose(1, 2)


def _tokens_major(t: torch.Tensor) -> torch.Tensor:
    """(1, H, T, D) -> (T, H, D), contiguous, as varlen kernels take it."""
    return t[0].transpose(0, 1).contiguous()


@functools.lru_cache(maxsize=None)
def _varlen_params() -> frozenset:
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def torch_varlen(query, key, value, cu_seq_lens, max_len: int, scaling):
    """torch's varlen attention, whatever its signature in this torch release."""
    from torch.nn.attention.varlen import varlen_attn

    params = _varlen_params()
    q, k, v = _tokens_major(query), _tokens_major(key), _tokens_major(value)
    kwargs = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:  # older signatures: give every query head its own copy of its key/value head
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if scaling is not None and "scale" in params:
        kwargs["scale"] = scaling
    elif scaling is not None:
        q = q * (scaling * math.sqrt(q.shape[-1]))  # the kernel's default scale is 1/sqrt(D)
    out = varlen_attn(q, k, v, cu_seq_lens, cu_seq_lens, max_len, max_len, **kwargs)
    return out[None]  # (1, T, H, D)


def flash_attn_varlen(query, key, value, cu_seq_lens, max_len: int, scaling):
    from flash_attn import flash_attn_varlen_func

    q, k, v = _tokens_major(query), _tokens_major(key), _tokens_major(value)
    out = flash_attn_varlen_func(q, k, v, cu_seq_lens, cu_seq_lens, max_len, max_len, 0.0, softmax_scale=scaling,
                                 causal=True)
    return out[None]


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def document_block_mask(cu_seq_lens: torch.Tensor, total: int):
    """A flex-attention BlockMask: causal within each example. Built once per forward (kept on the tensor)."""
    cached = getattr(cu_seq_lens, "_qlorakit_block_mask", None)
    if cached is not None:
        return cached
    from torch.nn.attention.flex_attention import create_block_mask

    positions = torch.arange(total, device=cu_seq_lens.device)
    doc = torch.searchsorted(cu_seq_lens[1:].to(torch.int64), positions, right=True)  # example of each token

    def same_example_causal(b, h, q, kv):
        return (doc[q] == doc[kv]) & (q >= kv)

    mask = create_block_mask(same_example_causal, None, None, total, total, device=cu_seq_lens.device)
    cu_seq_lens._qlorakit_block_mask = mask
    return mask


def flex_varlen(query, key, value, cu_seq_lens, scaling):
    from torch.nn.attention.flex_attention import flex_attention

    mask = document_block_mask(cu_seq_lens, query.shape[2])
    fn = _compiled_flex() if query.is_cuda else flex_attention
    out = fn(query, key, value, block_mask=mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2)


def packed_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                             cu_seq_lens_q: torch.Tensor | None = None, max_length_q: int | None = None,
                             seq_bounds: tuple[int, ...] | None = None, **kwargs):
    """query (1, H, T, D), key/value (1, H_kv, T, D) -> (1, T, H, D), as transformers' attention functions return."""
    if cu_seq_lens_q is None or query.shape[0] != 1:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if isinstance(attention_mask, DeferredMask):
            attention_mask = attention_mask.build()
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    p = dropout if module.training else 0.0
    backend = backend_for(query.device.type, query.dtype, p)
    if backend == "sdpa_loop":
        bounds = host_bounds(cu_seq_lens_q, seq_bounds)
        if query.device.type == "cpu" and query.dtype in HALF:  # CPU kernels: float32 is faster, and exact-er
            out = sdpa_loop(query.float(), key.float(), value.float(), bounds, scaling, p).to(query.dtype)
        else:
            out = sdpa_loop(query, key, value, bounds, scaling, p)
    elif backend == "flex":
        out = flex_varlen(query, key, value, cu_seq_lens_q, scaling)
    else:
        bounds = None if max_length_q is not None else host_bounds(cu_seq_lens_q, seq_bounds)
        longest = max_length_q if bounds is None else max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
        kernel = flash_attn_varlen if backend == "flash_attn" else torch_varlen
        out = kernel(query, key, value, cu_seq_lens_q, longest, scaling)
    return out.contiguous(), None


def register() -> None:
    """Make ``NAME`` a valid ``attn_implementation``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, packed_attention_forward)
    AttentionMaskInterface.register(NAME, deferred_sdpa_mask)


def use_packed_attention(model) -> bool:
    """Switch ``model`` from SDPA to the packed implementation; False when it does not use SDPA or its attention
    is not plain causal (a sliding window, as Mistral and Gemma configure, is left to SDPA's own mask)."""
    config = model.config
    if getattr(config, "_attn_implementation", None) != "sdpa" or getattr(config, "sliding_window", None):
        return False
    register()
    model.set_attn_implementation(NAME)
    return True


def packed_attention_backend(device: torch.device, dtype: torch.dtype) -> str:
    """The backend packed rows will take on ``device`` in compute ``dtype`` (for the log)."""
    return backend_for(device.type, dtype, 0.0)
