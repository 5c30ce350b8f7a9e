"""Example order, optimizer steps of micro-batches, and collation (padded or padding-free packed).

The order of an epoch is a seeded permutation that does not depend on the batch size, and an optimizer step takes
the next ``batch * accumulation`` examples of it. So batch k with accumulation 1 and batch 1 with accumulation k
see the same examples in every step. ``group_by_length`` trades that property for less padding.

With a token budget (``pack_by_token_budget``) a micro-batch is instead one padding-free row of whole examples up to
``max_tokens`` tokens, packed on the host from the same seeded order; ``collate_varlen`` gives the row its example
boundaries as host integers, so attention never asks the device where an example ends. An optimizer step then takes
``accumulation * processes`` bins, and the loss stays exact as long as the loop divides by the trained tokens of all
of them (``count_trained`` over the collated bins of every rank), as it does for example-count batches.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch

from .tokenize import IGNORE, Example, prompt_weighted


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


def example_targets(e: Example, prompt_weight: float = 0.0) -> tuple[list[int], list[float] | None]:
    """The shifted targets of ``e`` and, with ``prompt_weight`` > 0 (``prompt_loss_weight``), each target's weight
    (0 where nothing is trained): its prompt tokens become targets of that weight (``tokenize.prompt_weighted``)."""
    if prompt_weight <= 0:
        return shifted_targets(e.labels), None
    labels, weights = prompt_weighted(e, prompt_weight)
    return shifted_targets(labels), weights[1:] + [0.0]


def collate_padded(examples: list[Example], pad_id: int, prompt_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """Right-padded batch (B, T) with an attention mask; padding is never attended to nor trained. With
    ``prompt_weight`` > 0 also ``weights`` (B, T), float32: each target's weight in the loss."""
    T = max(len(e) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    weights = torch.zeros((len(examples), T)) if prompt_weight > 0 else None
    for i, e in enumerate(examples):
        n = len(e)
        ids[i, :n] = torch.tensor(e.input_ids)
        these, w = example_targets(e, prompt_weight)
        targets[i, :n] = torch.tensor(these)
        if weights is not None:
            weights[i, :n] = torch.tensor(w)
        mask[i, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "targets": targets}
    return batch if weights is None else batch | {"weights": weights}


def collate_packed(examples: list[Example], prompt_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """One row (1, sum of lengths) with no padding. Positions restart at 0 for each example, which the model's
    attention turns into a block-diagonal causal mask, so no example attends to another. With ``prompt_weight``
    > 0 also ``weights`` (1, T), as in ``collate_padded``."""
    ids, targets, pos, weights = [], [], [], []
    for e in examples:
        ids += e.input_ids
        these, w = example_targets(e, prompt_weight)
        targets += these
        weights += w or []
        pos += range(len(e))
    as_row = lambda xs: torch.tensor(xs, dtype=torch.long)[None]  # noqa: E731  (1, T)
    bounds = torch.tensor([0, *torch.tensor([len(e) for e in examples]).cumsum(0).tolist()], dtype=torch.int32)
    # cu_seq_lens_q: where each example starts and ends, for attention that skips work across examples
    batch = {"input_ids": as_row(ids), "position_ids": as_row(pos), "targets": as_row(targets),
             "cu_seq_lens_q": bounds}
    return batch if prompt_weight <= 0 else batch | {"weights": torch.tensor(weights, dtype=torch.float32)[None]}


def collate(examples: list[Example], pad_id: int, packing: bool, prompt_weight: float = 0.0) -> dict:
    """A padded batch, or with ``packing`` one padding-free row carrying its example boundaries as host ints."""
    if packing:
        return collate_varlen(examples, prompt_weight=prompt_weight)
    return collate_padded(examples, pad_id, prompt_weight)


def trained_weight(batch: dict) -> float | int:
    """What the loss of ``batch`` is normalized by: its trained targets, or with ``weights`` their summed weight
    (prompt_loss_weight: reply tokens 1, prompt tokens the weight; sum_i w_i * ce_i / sum_i w_i over a step)."""
    if "weights" in batch:
        return float(batch["weights"].sum(dtype=torch.float64))  # exact for 0.1s: the same sum in any order
    return int((batch["targets"] != IGNORE).sum())


def padding_waste(batches: list[dict[str, torch.Tensor]]) -> float:
    """Share of token positions in ``batches`` that are padding."""
    total = sum(b["input_ids"].numel() for b in batches)
    real = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches)
    return 1 - real / total if total else 0.0


# ----------------------------------------------------------------------------------------------------------------
# Token-budget packing: each micro-batch is one padding-free row of whole examples, up to ``max_tokens`` tokens.


@dataclass
class BudgetPlan:
    """Micro-batches (bins of example indices) in training order, and what did not fit the budget."""

    bins: list[list[int]]
    truncated: list[int] = field(default_factory=list)  # longer than the budget: alone in a bin, cut to it
    dropped: list[int] = field(default_factory=list)  # longer than the budget, left out (truncation "drop")


def best_fit_decreasing(items: list[tuple[int, int]], capacity: int) -> list[list[int]]:
    """Bins of ``(index, length)`` items, none over ``capacity``: longest first, each into the fullest bin it fits.

    Deterministic: ties in length keep the items' order, ties in room go to the older bin. Every length must be
    at most ``capacity``.
    """
    ranked = sorted(items, key=lambda it: -it[1])  # stable: equal lengths keep the epoch order
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, bin number), sorted
    for index, n in ranked:
        j = bisect.bisect_left(room, (n, -1))
        if j < len(room):
            free, b = room.pop(j)
            bins[b].append(index)
            bisect.insort(room, (free - n, b))
        else:
            bins.append([index])
            bisect.insort(room, (capacity - n, len(bins) - 1))
    return bins


def next_fit(items: list[tuple[int, int]], capacity: int) -> list[list[int]]:
    """The naive packing: items in their order, a new bin whenever the next one does not fit."""
    bins: list[list[int]] = []
    used = capacity
    for index, n in items:
        if used + n > capacity:
            bins.append([])
            used = 0
        bins[-1].append(index)
        used += n
    return bins


def pack_by_token_budget(order: list[int], lengths: list[int], max_tokens: int, *, seed: int, epoch: int,
                         window: int = 1024, truncation: str = "truncate") -> BudgetPlan:
    """The micro-batches of an epoch: the epoch ``order`` cut into windows of ``window`` examples, each window
    packed into bins of at most ``max_tokens`` tokens, the bins of a window in a seeded random order.

    A window's bins are the fewer of best-fit decreasing and next-fit in the epoch order, so never more than the
    naive packing of the same examples (best-fit decreasing wins on nearly every window). Which examples share a
    window follows the seeded ``order``, so the plan is a function of (seed, epoch, lengths, max_tokens, window)
    alone: it does not depend on the accumulation or the number of processes. An example longer than
    ``max_tokens`` is, as ``truncation`` says, alone in its bin and cut to ``max_tokens`` by
    ``collate_varlen(..., max_tokens)`` ("truncate"), or left out ("drop"); either way it is listed in the plan.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    if truncation not in ("truncate", "drop"):
        raise ValueError(f"truncation must be 'truncate' or 'drop', got {truncation!r}")
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 0x5EED)
    plan = BudgetPlan(bins=[])
    for start in range(0, len(order), window):
        items, alone = [], []
        for i in order[start:start + window]:
            if lengths[i] <= max_tokens:
                items.append((i, lengths[i]))
            elif truncation == "drop":
                plan.dropped.append(i)
            else:
                plan.truncated.append(i)
                alone.append([i])
        bins = min(best_fit_decreasing(items, max_tokens), next_fit(items, max_tokens), key=len) + alone
        plan.bins += [bins[k] for k in torch.randperm(len(bins), generator=g).tolist()]
    return plan


def collate_varlen(examples: list[Example], max_tokens: int | None = None, prompt_weight: float = 0.0) -> dict:
    """One padding-free row (1, T) of ``examples`` with their boundaries, for attention that works per example.

    Besides ``collate_packed``'s tensors: ``cu_seq_lens_q``/``_k`` (int32, (N+1,)) and ``max_length_q``/``_k``
    (Python ints), the keywords transformers' varlen kernels take, and ``seq_bounds``, the same boundaries as a
    tuple of Python ints: attention reads them on the host, so no layer waits for the device. An example longer
    than ``max_tokens`` is cut to it (its start kept).
    """
    if max_tokens is not None:
        examples = [e if len(e) <= max_tokens else Example(e.input_ids[:max_tokens], e.labels[:max_tokens],
                                                            e.source) for e in examples]
    batch = collate_packed(examples, prompt_weight)
    lengths = [len(e) for e in examples]
    bounds = tuple(int(b) for b in batch["cu_seq_lens_q"].tolist())  # a CPU tensor built here: no device sync
    longest = max(lengths)
    return batch | {"cu_seq_lens_k": batch["cu_seq_lens_q"], "max_length_q": longest, "max_length_k": longest,
                    "seq_bounds": bounds}


def to_device(batch: dict, device: torch.device) -> dict:
    """Tensors of ``batch`` on ``device`` (copied without waiting where the source is pinned); host values as they
    are. ``.to(device)`` on every value would fail on the Python ints of ``collate_varlen``."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
