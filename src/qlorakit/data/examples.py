"""Examples read from memory-mapped Arrow files: a sequence with the interface of a list of ``Example``.

``seq[i]`` is an ``Example`` (input_ids, labels, source, n_trained), ``len(seq[i])`` its length, and
``seq.lengths`` / ``seq.trained`` give every example's length and trained-token count as arrays, without reading
the tokens. Only the positions of the examples are held in memory; the tokens stay in the page cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .tokenize import Example


class _ListColumn:
    """Random access to the rows of an Arrow list<int32> column over all its chunks, zero-copy."""

    def __init__(self, chunked):
        self.starts = np.cumsum([0] + [len(c) for c in chunked.chunks])
        self.offsets = [c.offsets.to_numpy() for c in chunked.chunks]
        self.values = [c.values.to_numpy() for c in chunked.chunks]

    def row(self, r: int) -> list[int]:
        c = int(np.searchsorted(self.starts, r, side="right")) - 1
        j = r - int(self.starts[c])
        o = self.offsets[c]
        return self.values[c][o[j]:o[j + 1]].tolist()


@dataclass
class PartInfo:
    label: str
    jsonl: bool


class ExampleStore:
    """The cached examples of a run's sources, one after another: store row p is row p of their tables."""

    def __init__(self, tables: list, parts: list[list[PartInfo]], part_rows: list[list[int]]):
        import pyarrow as pa

        table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        self._ids = _ListColumn(table.column("input_ids"))
        self._labels = _ListColumn(table.column("labels"))
        col = lambda name: table.column(name).to_numpy()  # noqa: E731  (one array per column, a few bytes a row)
        self.line, self.status = col("line"), col("status")
        self.full_length, self.trained = col("full_length"), col("n_trained")
        self.length = np.concatenate([np.diff(o) for o in self._ids.offsets] or [np.zeros(0, np.int32)])
        # Preference rows (Example.pref); a table cached before they existed has none.
        names = table.column_names
        self.pref_kind, self.prompt_len, self.chosen_len = (
            col(n) if n in names else np.zeros(len(self.line), np.int32) for n in ("pref_kind", "prompt_len",
                                                                                   "chosen_len"))
        self.parts = [p for ps in parts for p in ps]
        counts = [n for rows in part_rows for n in rows]
        self.part = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
        self.source = np.repeat(np.arange(len(part_rows), dtype=np.int32), [sum(r) for r in part_rows])
        self.source_start = np.cumsum([0] + [sum(r) for r in part_rows])

    def __len__(self) -> int:
        return len(self.status)

    def where(self, p: int) -> str:
        """The row's place for messages: file:line for JSONL, file:row N for tables."""
        info = self.parts[int(self.part[p])]
        return f"{info.label}:{int(self.line[p])}" if info.jsonl else f"{info.label}:row {int(self.line[p])}"

    def example(self, p: int) -> Example:
        kind = int(self.pref_kind[p])
        pref = (kind, int(self.prompt_len[p]), int(self.chosen_len[p])) if kind else ()
        return Example(self._ids.row(p), self._labels.row(p), self.where(p), pref=pref)

    def usable(self, pos: np.ndarray) -> np.ndarray:
        """The positions among ``pos`` that training uses (kept whole or truncated)."""
        return pos[self.status[pos] <= 1]

    def policy_counts(self, pos: np.ndarray, max_len: int) -> dict[str, tuple[int, list[str]]]:
        """For each change of the length policy, how many of the rows at ``pos`` it made and the first three.
        A row cut to ``max_len`` and then dropped for having no trained token left counts under both."""
        status = self.status[pos]
        masks = {"truncated": ((self.full_length[pos] > max_len) | (status == 1)) & (status != 2),
                 "dropped_too_long": status == 2, "dropped_no_trained_tokens": status == 3}
        return {k: (int(m.sum()), [self.where(int(p)) for p in pos[m][:3]]) for k, m in masks.items()}


class ExampleSequence(Sequence):
    """Examples at ``positions`` of a store, in that order; indexable like the list the training loop used."""

    def __init__(self, store: ExampleStore | None, positions: np.ndarray):
        self.store, self.positions = store, np.asarray(positions, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"example {i} of {len(self)}")
        return self.store.example(int(self.positions[i]))

    def __iter__(self):
        for p in self.positions:
            yield self.store.example(int(p))

    @property
    def lengths(self) -> np.ndarray:
        """Token count of every example, in order (what ``len(seq[i])`` gives, without reading tokens)."""
        return self.store.length[self.positions] if len(self) else np.zeros(0, dtype=np.int64)

    @property
    def n_trained(self) -> np.ndarray:
        """Trained-token count of every example, in order."""
        return self.store.trained[self.positions] if len(self) else np.zeros(0, dtype=np.int64)

    def sources(self) -> np.ndarray:
        """The index of the source (in the run's list) each example comes from."""
        return self.store.source[self.positions] if len(self) else np.zeros(0, dtype=np.int32)
