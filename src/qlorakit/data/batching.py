"""Example order, optimizer steps of micro-batches, and collation (padded or padding-free packed).

The order of an epoch is a seeded permutation that does not depend on the batch size, and an optimizer step takes
the next ``batch * accumulation`` examples of it. So batch k with accumulation 1 and batch 1 with accumulation k
see the same examples in every step. ``group_by_length`` trades that property for less padding.
"""

from __future__ import annotations

import torch

from .tokenize import IGNORE, Example


def epoch_order(n: int, seed: int, epoch: int, lengths: list[int] | None = None,
                group_size: int | None = None) -> list[int]:
    """Indices of the ``n`` examples in the order of ``epoch``.

    With ``lengths`` and ``group_size``, each window of ``group_size * 50`` shuffled examples is sorted by length
    (longest first) and cut into groups, and the groups are shuffled: similar lengths share a micro-batch.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    if lengths is None or group_size is None:
        return order
    window = group_size * 50
    groups = []
    for start in range(0, n, window):
        chunk = sorted(order[start:start + window], key=lambda i: -lengths[i])
        groups += [chunk[i:i + group_size] for i in range(0, len(chunk), group_size)]
    perm = torch.randperm(len(groups), generator=g).tolist()
    return [i for p in perm for i in groups[p]]


def plan_steps(order: list[int], micro_batch: int, accumulation: int) -> list[list[list[int]]]:
    """Optimizer steps as lists of micro-batches of example indices. A short last step keeps every example."""
    per_step = micro_batch * accumulation
    steps = []
    for s in range(0, len(order), per_step):
        chunk = order[s:s + per_step]
        steps.append([chunk[i:i + micro_batch] for i in range(0, len(chunk), micro_batch)])
    return steps


def shifted_targets(labels: list[int]) -> list[int]:
    """Position t is trained to predict token t+1; the last position of an example predicts nothing."""
    return labels[1:] + [IGNORE]


def collate_padded(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch (B, T) with an attention mask; padding is never attended to nor trained."""
    T = max(len(e) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e)
        ids[i, :n] = torch.tensor(e.input_ids)
        targets[i, :n] = torch.tensor(shifted_targets(e.labels))
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "targets": targets}


def collate_packed(examples: list[Example]) -> dict[str, torch.Tensor]:
    """One row (1, sum of lengths) with no padding. Positions restart at 0 for each example, which the model's
    attention turns into a block-diagonal causal mask, so no example attends to another."""
    ids, targets, pos = [], [], []
    for e in examples:
        ids += e.input_ids
        targets += shifted_targets(e.labels)
        pos += range(len(e))
    as_row = lambda xs: torch.tensor(xs, dtype=torch.long)[None]  # noqa: E731  (1, T)
    bounds = torch.tensor([0, *torch.tensor([len(e) for e in examples]).cumsum(0).tolist()], dtype=torch.int32)
    # cu_seq_lens_q: where each example starts and ends, for attention that skips work across examples
    return {"input_ids": as_row(ids), "position_ids": as_row(pos), "targets": as_row(targets),
            "cu_seq_lens_q": bounds}


def collate(examples: list[Example], pad_id: int, packing: bool) -> dict[str, torch.Tensor]:
    return collate_packed(examples) if packing else collate_padded(examples, pad_id)


def padding_waste(batches: list[dict[str, torch.Tensor]]) -> float:
    """Share of token positions in ``batches`` that are padding."""
    total = sum(b["input_ids"].numel() for b in batches)
    real = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches)
    return 1 - real / total if total else 0.0
