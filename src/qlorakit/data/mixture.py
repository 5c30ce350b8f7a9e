"""Which rows of each source a run uses, which are held out for evaluation, and the summary the log and card show.

A source's ``weight`` says how many times each of its rows is used on average: 1 (the default) every row once, 0.5 a
seeded half of them, 2.5 every row twice plus a seeded half a third time. ``max_rows`` takes a seeded sample of at
most that many rows. The held-out split is drawn over the distinct rows the run uses, sources in order, with the
same seeded permutation as ever: one source used whole splits exactly as before mixtures existed. A held-out row is
never trained on, however many times its source repeats it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..errors import UserError
from .sources import SourceSpec


@dataclass
class Use:
    """The rows of one source a run uses: ``pool`` (ascending indices among its rows) and each one's repeats."""

    pool: np.ndarray
    copies: np.ndarray

    @property
    def total(self) -> int:
        return int(self.copies.sum())


def _sample(n: int, k: int, seed: int, salt: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed + 1_000_003 * (salt + 1))
    return np.sort(torch.randperm(n, generator=g)[:k].numpy())


def select_rows(n: int, spec: SourceSpec, seed: int, salt: int) -> Use:
    """The rows of a source of ``n`` rows that ``spec``'s weight or max_rows selects; ``salt`` (its place in the
    list) gives each source its own sample."""
    every = np.arange(n)
    if spec.max_rows is not None and spec.max_rows < n:
        pool = _sample(n, spec.max_rows, seed, salt)
        return Use(pool, np.ones(len(pool), dtype=np.int64))
    if spec.weight is None or spec.weight == 1:
        return Use(every, np.ones(n, dtype=np.int64))
    whole = int(spec.weight)
    extra = _sample(n, int((spec.weight - whole) * n + 0.5), seed, salt)
    if whole == 0:
        if not len(extra):
            raise UserError(f"{spec.origin or spec.path}: weight {spec.weight:g} of {n} rows uses no row; "
                            "raise the weight")
        return Use(extra, np.ones(len(extra), dtype=np.int64))
    copies = np.full(n, whole, dtype=np.int64)
    copies[extra] += 1
    return Use(every, copies)


def held_out(n: int, size: float, seed: int) -> np.ndarray:
    """A mask over ``n`` rows: ``size`` of them held out if >= 1, else that fraction (the split of every qlorakit
    run: the first rows of a seeded permutation)."""
    n_eval = int(size) if size >= 1 else int(round(n * size))
    mask = np.zeros(n, dtype=bool)
    if n_eval == 0:
        return mask
    if n_eval >= n:
        raise UserError(f"eval_dataset_size: {size} leaves no training rows out of {n}")
    g = torch.Generator().manual_seed(seed)
    mask[torch.randperm(n, generator=g)[:n_eval].numpy()] = True
    return mask


def assemble(rows: list[np.ndarray], uses: list[Use], held: np.ndarray) -> tuple[list[np.ndarray],
                                                                                   list[np.ndarray]]:
    """Per source, the store positions of its training examples (each repeat in turn) and of its held-out ones.
    ``rows[s]`` are the store positions of source s's rows; ``held`` covers the sources' pools in order."""
    train, evals, start = [], [], 0
    for pos, use in zip(rows, uses):
        pool = pos[use.pool]
        held_s = held[start:start + len(pool)]
        start += len(pool)
        keep = ~held_s
        train.append(np.concatenate([pool[keep & (use.copies > c)] for c in range(int(use.copies.max(initial=1)))]))
        evals.append(pool[held_s])
    return train, evals


@dataclass
class SourceSummary:
    """One source of a run as the log and the model card name it. Counts of examples include repeats."""

    name: str  # as the user gave it (path, or hub id [subset] (split))
    kind: str  # jsonl, json, parquet, csv, folder, arrow, hub
    format: str  # the row layout read (detected where the format was auto)
    role: str  # train or eval
    rows: int  # rows in the source
    used: int  # distinct rows the run uses
    weight: float | None = None
    max_rows: int | None = None
    train_examples: int = 0
    eval_examples: int = 0
    truncated: int = 0
    dropped: int = 0
    cache: str = ""  # built or loaded
    cache_dir: str = ""
    sha256: dict[str, str] = field(default_factory=dict)  # of each local file

    def selection(self) -> str:
        if self.weight is not None:
            return f"weight {self.weight:g}"
        return f"max_rows {self.max_rows}" if self.max_rows is not None else "all rows"

    def line(self) -> str:
        return (f"mixture: {self.name} ({self.format}): {self.used} of {self.rows} rows, {self.selection()} -> "
                f"{self.train_examples} train, {self.eval_examples} eval examples")

    def to_dict(self) -> dict:
        return asdict(self)
