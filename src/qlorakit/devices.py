"""What the machine offers: the training device, whether bf16 is fast on it, and its free memory. No model code:
the config (``bf16 auto``) and every layer above ask here."""

from __future__ import annotations

import os

import torch


def device_for_training() -> torch.device:
    if torch.cuda.is_available():
        rank = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device("cuda", rank)
    return torch.device("cpu")


def bf16_is_fast() -> bool:
    """True where bfloat16 matrix multiplies beat float32: CUDA GPUs with bf16, CPUs with AMX or AVX512-BF16.
    Elsewhere bf16 matmuls are emulated and far slower than float32 (README, Precision, has the measured ratio)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, p, lambda: False)() for p in probes)


def free_memory(device: torch.device) -> int | None:
    """Bytes free now on ``device`` (a CUDA GPU's free memory, or the host's available RAM), None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None
