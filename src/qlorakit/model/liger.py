"""Liger-Kernel's Triton kernels for the layers around the LoRA matmuls: RMSNorm, SwiGLU and RoPE, on CUDA, where the
optional extra ``qlorakit[cuda]`` installed them (``use_liger_kernel``).

Each replaces several elementwise kernels and their full-width temporaries with one (Liger reports +20% throughput
and -60% memory on LLaMA-3-8B). Liger's cross-entropy kernels are not applied here: the loss is
``model/loss.py``'s, which takes Liger's fused linear cross-entropy itself on CUDA. Liger patches the model's
modules (and, for RoPE, its architecture's module-level function, so every model of that architecture in the
process); its kernels are Triton, so they run on CUDA only, and ``decide`` never turns them on elsewhere.
"""

from __future__ import annotations

import inspect

from ..errors import UserError

# What to apply: the layers around the matmuls; never Liger's own losses (model/loss.py owns the loss).
KERNELS = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
           "fused_linear_cross_entropy": False}


def apply_function(model_type: str):
    """Liger's patch function for ``model_type``; None where Liger is not installed or has none for it."""
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        return None
    return MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)


def installed() -> bool:
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError:
        return False
    return True


def decide(setting: str, device_type: str, is_installed: bool, model_type: str, has_kernels: bool) -> tuple[bool, str]:
    """Whether to apply the kernels, and why. ``setting``: auto (on CUDA where installed, for architectures Liger
    has kernels for), true (the same, or a one-line error naming what is missing), false."""
    if setting == "false":
        return False, "off (use_liger_kernel false)"
    missing = ("its kernels are Triton, CUDA only, and this run is on " + device_type if device_type != "cuda" else
               "liger-kernel is not installed (pip install 'qlorakit[cuda]')" if not is_installed else
               f"Liger has no kernels for model type {model_type}" if not has_kernels else None)
    if missing is None:
        return True, "RMSNorm, SwiGLU and RoPE by Liger-Kernel's fused kernels"
    if setting == "true":
        raise UserError(f"use_liger_kernel: {missing}; set use_liger_kernel auto or false")
    return False, f"off (auto: {missing})"


def use_liger_kernel(model, setting: str, device_type: str) -> tuple[bool, str]:
    """Apply Liger's RMSNorm, SwiGLU and RoPE kernels to ``model`` (a transformers model, before LoRA is added) where
    ``decide`` says so; returns the decision and its reason, for the log."""
    model_type = getattr(model.config, "model_type", "") or ""
    fn = apply_function(model_type)
    on, why = decide(setting, device_type, installed(), model_type, fn is not None)
    if on:
        params = inspect.signature(fn).parameters
        fn(model=model, **{k: v for k, v in KERNELS.items() if k in params})
    return on, why
