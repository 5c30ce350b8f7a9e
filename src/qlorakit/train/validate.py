"""Validation beside the loop: loss and perplexity over held-out examples, token-weighted like training."""

from __future__ import annotations

import math

import torch

from ..data.batching import collate
from ..data.tokenize import Example
from .step import autocast, loss_sum


@torch.no_grad()
def eval_loss(model, examples: list[Example], *, batch_size: int, pad_id: int, packing: bool,
              device: torch.device, use_bf16: bool, objective=None) -> dict[str, float]:
    """Mean loss per trained token over ``examples`` (not a mean of batch means) and its perplexity; for a
    preference ``objective``, its mean loss per example and metrics (``eval_rewards/accuracies``...)."""
    if objective is not None and objective.preference:
        return eval_preference(model, examples, objective, batch_size=batch_size, pad_id=pad_id, packing=packing,
                               device=device, use_bf16=use_bf16)
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    try:
        # Sorted by length so padded batches waste little; the result does not depend on the order.
        ordered = sorted(examples, key=len)
        for s in range(0, len(ordered), batch_size):
            batch = collate(ordered[s:s + batch_size], pad_id, packing)
            with autocast(device, use_bf16):
                loss, n = loss_sum(model, batch, device)
            total += float(loss)
            tokens += n
    finally:
        model.train(was_training)
    mean = total / max(tokens, 1)
    return {"eval_loss": mean, "eval_perplexity": math.exp(min(mean, 50.0)), "eval_tokens": tokens}


@torch.no_grad()
def eval_preference(model, examples, objective, *, batch_size: int, pad_id: int, packing: bool, device: torch.device,
                    use_bf16: bool) -> dict[str, float]:
    """A preference objective's loss and metrics over ``examples``, each a mean per example."""
    was_training = model.training
    model.eval()
    total, sums = 0.0, {}
    try:
        for s in range(0, len(examples), batch_size):
            ids = list(range(s, min(s + batch_size, len(examples))))
            batch = objective.collate(examples, ids, pad_id, packing, split="eval")
            with autocast(device, use_bf16):
                objective.begin_step(model, [batch], device, use_bf16)
                loss, metrics = objective.loss(model, batch, device)
            total += float(loss)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
    finally:
        model.train(was_training)
    n = max(len(examples), 1)
    return {"eval_loss": total / n, **{f"eval_{k}": v / n for k, v in sorted(sums.items())}, "eval_examples": n}
