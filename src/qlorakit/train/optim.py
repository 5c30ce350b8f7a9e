"""Optimizers and learning-rate schedules."""

from __future__ import annotations

import math

import torch


def param_groups(named_params, lr: float, loraplus_lr_ratio: float = 0.0) -> list[dict]:
    """The trainable parameters of ``named_params`` (name, parameter) as the optimizer's groups: one at ``lr``, or
    with LoRA+ (``loraplus_lr_ratio`` > 0; Hayou et al. 2024) two: the LoRA B matrices (``lora_B``) at
    ``lr * loraplus_lr_ratio``, everything else (A, DoRA's magnitudes) at ``lr``. The schedule scales every group's
    rate by the same factor, so B stays at the ratio times A's rate throughout."""
    named = [(n, p) for n, p in named_params if p.requires_grad]
    if not loraplus_lr_ratio:
        return [{"params": [p for _, p in named], "lr": lr}]
    return [{"params": [p for n, p in named if "lora_B" not in n], "lr": lr},
            {"params": [p for n, p in named if "lora_B" in n], "lr": lr * loraplus_lr_ratio}]


def build_optimizer(name: str, params, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999),
                    eps: float = 1e-8) -> torch.optim.Optimizer:
    """``params``: parameters, or groups of them (``param_groups``). ``betas`` and ``eps``: the Adam variants'
    (adam_beta1, adam_beta2, adam_epsilon); SGD has none."""
    params = list(params)
    if name == "adamw_torch":
        from ..model.cuda import adamw_options

        flat = [p for g in params for p in g["params"]] if params and isinstance(params[0], dict) else params
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps,
                                 **adamw_options(flat))
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    import bitsandbytes as bnb

    if name == "paged_adamw_32bit":
        return bnb.optim.PagedAdamW32bit(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
    if name == "paged_adamw_8bit":
        return bnb.optim.PagedAdamW8bit(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
    raise ValueError(f"optim: unknown optimizer {name!r}")


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return math.ceil(total_steps * warmup_ratio)


def lr_factor(step: int, total_steps: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak learning rate for the update made at ``step`` (0-based)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


def build_scheduler(optimizer, total_steps: int, warmup_ratio: float, kind: str, done_steps: int = 0):
    """The schedule of a ``total_steps`` run. ``done_steps`` > 0: the schedule as it stands after that many steps,
    for a resumed run whose length changed; the optimizer's groups must hold their ``initial_lr`` (a checkpoint's
    optimizer state does)."""
    warm = warmup_steps(total_steps, warmup_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warm, kind),
                                             last_epoch=done_steps - 1)
