"""The model call every objective shares: logits only at trained positions, and per-sequence log-probabilities."""

from __future__ import annotations

import functools
import inspect

import torch

from ...data.batching import to_device
from ...data.tokenize import IGNORE
from ...model.loss import causal_lm


def accepts(model, arg: str) -> bool:
    return arg in _forward_params(type(causal_lm(model)))


@functools.lru_cache(maxsize=None)
def _forward_params(cls) -> frozenset:
    """Keyword names of a model class's forward, read once per class (loss_sum asks on every micro-batch)."""
    return frozenset(inspect.signature(cls.forward).parameters)


def model_inputs(batch: dict, device: torch.device) -> dict:
    """What the model takes of a batch: everything but the targets and an objective's own ``pref_`` entries."""
    return to_device({k: v for k, v in batch.items() if k != "targets" and not k.startswith("pref_")}, device)


def trained_logits(model, batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, V) at the N trained positions of ``batch`` (row-major), and their targets (N,). Only those
    positions are projected onto the vocabulary (``logits_to_keep`` as a boolean mask) where the model allows."""
    inputs = model_inputs(batch, device)
    targets = batch["targets"].to(device)
    keep = targets != IGNORE  # (B, T)
    if accepts(model, "logits_to_keep"):
        return model(**inputs, logits_to_keep=keep, use_cache=False).logits, targets[keep]
    return model(**inputs, use_cache=False).logits[keep], targets[keep]


def sequence_logps(model, batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability (float32) of each sequence's trained tokens, shape (S,), and their counts (S,).
    ``batch["pref_seq"]`` (N,) names the sequence of each trained position, in the row-major order of the mask."""
    logits, targets = trained_logits(model, batch, device)
    logits = logits.float()
    picked = logits.gather(1, targets[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)  # (N,)
    seq = batch["pref_seq"].to(device)
    n = int(batch["pref_n_seqs"])
    sums = torch.zeros(n, dtype=picked.dtype, device=device).index_add(0, seq, picked)
    return sums, torch.bincount(seq, minlength=n).to(picked.dtype)
