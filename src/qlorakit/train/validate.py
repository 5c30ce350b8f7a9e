"""Validation beside the loop: loss and perplexity over held-out examples, token-weighted like training."""

from __future__ import annotations

import math

import torch

from ..data.batching import collate
from ..data.tokenize import Example
from .step import autocast, loss_sum


@torch.no_grad()
def eval_loss(model, examples: list[Example], *, batch_size: int, pad_id: int, packing: bool,
              device: torch.device, use_bf16: bool) -> dict[str, float]:
    """Mean loss per trained token over ``examples`` (not a mean of batch means) and its perplexity."""
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
