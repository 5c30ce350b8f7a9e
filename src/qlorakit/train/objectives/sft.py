"""SFT: cross entropy summed over the trained (reply) tokens; the optimizer step divides by the trained tokens of all
its micro-batches, so accumulation equals one big batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...data.batching import collate, collate_varlen, to_device, trained_weight
from ...data.tokenize import IGNORE
from ...model.loss import loss_sum_chunked, weighted_cross_entropy_sum
from .forward import accepts


def loss_sum(model, batch: dict[str, torch.Tensor], device: torch.device,
             chunked: bool = False) -> tuple[torch.Tensor, int]:
    """Summed cross entropy over the trained positions of ``batch``, and their count.

    Logits are computed only where a target is trained (``logits_to_keep`` as a boolean mask), which skips the
    vocabulary projection for prompt and padding positions. ``chunked``: the head and the loss run a chunk of
    trained positions at a time (model/loss.py), so full-vocabulary float32 logits never exist.
    """
    inputs = to_device({k: v for k, v in batch.items() if k not in ("targets", "weights")}, device)
    weights = batch.get("weights")  # (B, T) with prompt_loss_weight: the sum is weighted, the count the weight's
    if chunked:
        return loss_sum_chunked(model, inputs, batch["targets"], device, ignore_index=IGNORE, weights=weights)
    targets = batch["targets"].to(device)
    keep = targets != IGNORE  # (B, T)
    if accepts(model, "logits_to_keep"):
        logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits  # (N, V)
        picked = targets[keep]
    else:
        logits = model(**inputs, use_cache=False).logits[keep]
        picked = targets[keep]
    if weights is not None:
        return weighted_cross_entropy_sum(logits, picked, weights.to(device)[keep])
    return F.cross_entropy(logits.float(), picked, reduction="sum"), int(keep.sum())


def count_trained(batches: list[dict[str, torch.Tensor]]) -> int | float:
    """The loss's divisor: trained tokens, or their summed weight with prompt_loss_weight (batching.trained_weight)."""
    return sum(trained_weight(b) for b in batches)


class SFT:
    """The supervised objective: the loss is a sum over trained tokens; the step's unit is the trained token."""

    name = "sft"
    preference = False

    def __init__(self, prompt_loss_weight: float = 0.0):
        self.prompt_loss_weight = prompt_loss_weight  # the weight of prompt tokens (0: replies only)

    def collate(self, examples, ids: list[int], pad_id: int, packing: bool, budget: int = 0,
                split: str = "train") -> dict:
        chosen = [examples[i] for i in ids]
        w = self.prompt_loss_weight if split == "train" else 0.0  # the eval loss stays on replies only
        return collate_varlen(chosen, budget, w) if budget else collate(chosen, pad_id, packing, w)

    def count(self, batches: list[dict]) -> int | float:
        return count_trained(batches)

    def loss(self, model, batch: dict, device: torch.device, chunked: bool = False
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return loss_sum(model, batch, device, chunked)[0], {}
