"""What a run on a CUDA device does differently: the fused AdamW, peak-memory readings, and the one combination
refused there (FSDP2 over 4-bit weights). Each function is a no-op or an empty answer on other devices, so the
training loop calls them unconditionally."""

from __future__ import annotations

import torch

from ..errors import UserError

GIB = 2 ** 30


def adamw_options(params) -> dict:
    """Extra keyword arguments for ``torch.optim.AdamW``: ``fused=True`` when every parameter is a floating-point
    CUDA tensor (one kernel per step for all of them instead of a loop of small ones); none elsewhere, where the
    default (foreach) implementation keeps the numbers the CPU suite pins."""
    params = list(params)
    if params and all(p.is_cuda and p.is_floating_point() for p in params):
        return {"fused": True}
    return {}


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (at the first training step, so loading is not counted)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak CUDA memory since the last reset, in GiB: ``peak_allocated_gib`` (tensors alive at once, what the model
    needs) and ``peak_reserved_gib`` (what the caching allocator held, what the device had to have). Empty on other
    devices, so a metrics row can take it as is (``row | peak_memory(device)``)."""
    if device.type != "cuda":
        return {}
    return {"peak_allocated_gib": round(torch.cuda.max_memory_allocated(device) / GIB, 3),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / GIB, 3)}


class UnsupportedOnCuda(UserError):
    """A combination of settings that would train wrongly on this device."""


def check_fsdp_weights(device: torch.device, fsdp: bool, bits: int, dense_base: bool) -> None:
    """Refuse FSDP2 over packed 4-bit weights on CUDA, before any time goes into loading.

    FSDP2 shards a 4-bit layer's packed bytes as bf16 values, and on CUDA the copies it makes canonicalize the bit
    patterns that read as NaN, so the weights come back changed (bitsandbytes issue 1945, open). On a CPU the same
    copies keep the bits, and qlorakit's multi-process tests run FSDP there. ``dense_base``: the 4-bit weights are
    dequantized once to 16-bit layers before wrapping (``cache_dequantized``), which FSDP2 shards correctly.
    """
    if device.type == "cuda" and fsdp and bits == 4 and not dense_base:
        raise UnsupportedOnCuda(
            "fsdp: FSDP2 corrupts packed 4-bit weights on CUDA (bitsandbytes issue 1945); train with DDP "
            "(leave --fsdp off: torchrun replicates the 4-bit model), or keep FSDP with 16-bit base weights "
            "(--cache_dequantized true, or --bits 16)")
