"""One optimizer step's forward and backward, with the loss normalized by trained tokens.

The loss of an optimizer step is the sum of per-token losses over ALL its micro-batches (and ranks) divided by the
number of trained tokens in all of them. Each micro-batch's summed loss is divided by that global count before
backward, so accumulated gradients equal those of one big batch. (The common mean-of-means twin divides each
micro-batch by its own count and weights a short reply's tokens more than a long one's.)
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch
import torch.nn.functional as F

from ..data.tokenize import IGNORE
from .distributed import unwrap


def autocast(device: torch.device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _causal_lm(model):
    """The transformers model under peft/DDP/FSDP wrappers."""
    inner = unwrap(model)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def accepts(model, arg: str) -> bool:
    return arg in _forward_params(type(_causal_lm(model)))


@functools.lru_cache(maxsize=None)
def _forward_params(cls) -> frozenset:
    """Keyword names of a model class's forward, read once per class (loss_sum asks on every micro-batch)."""
    return frozenset(inspect.signature(cls.forward).parameters)


def supports_packing(model) -> bool:
    """Padding-free packing needs position ids that restart per example (RoPE models such as LLaMA). ALiBi models
    such as MPT take no position ids, so they are trained on padded batches."""
    return accepts(model, "position_ids")


def loss_sum(model, batch: dict[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, int]:
    """Summed cross entropy over the trained positions of ``batch``, and their count.

    Logits are computed only where a target is trained (``logits_to_keep`` as a boolean mask), which skips the
    vocabulary projection for prompt and padding positions.
    """
    targets = batch["targets"].to(device)
    keep = targets != IGNORE  # (B, T)
    inputs = {k: v.to(device) for k, v in batch.items() if k != "targets"}
    if accepts(model, "logits_to_keep"):
        logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits  # (N, V)
        picked = targets[keep]
    else:
        logits = model(**inputs, use_cache=False).logits[keep]
        picked = targets[keep]
    return F.cross_entropy(logits.float(), picked, reduction="sum"), int(keep.sum())


def count_trained(batches: list[dict[str, torch.Tensor]]) -> int:
    return sum(int((b["targets"] != IGNORE).sum()) for b in batches)


def accumulate(model, batches: list[dict[str, torch.Tensor]], device: torch.device, use_bf16: bool,
               n_tokens: int, grad_scale: float = 1.0, weights: list[float] | None = None) -> float:
    """Forward and backward every micro-batch of one optimizer step; returns the summed loss (a float).

    ``n_tokens`` is the trained-token count of the whole step (all micro-batches, all ranks). ``grad_scale``
    undoes the averaging DDP and FSDP do across ranks, so gradients stay a sum over the global batch / n_tokens.
    A micro-batch with weight 0 (a rank with no example left in a short last step) runs forward and backward only
    to join the other ranks' collectives: it adds nothing to the gradients nor to the returned loss.
    """
    total = 0.0
    weights = weights or [1.0] * len(batches)
    sync_ctx = getattr(model, "no_sync", None)
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        ctx = sync_ctx() if (sync_ctx is not None and not last) else contextlib.nullcontext()
        with ctx:
            with autocast(device, use_bf16):
                loss, _ = loss_sum(model, batch, device)
            (loss * (weights[i] * grad_scale / n_tokens)).backward()
        total += weights[i] * float(loss.detach())
    return total
