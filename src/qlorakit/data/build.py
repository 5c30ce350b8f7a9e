"""Raw rows -> cached examples: parse each row, render it in the prompt format, tokenize it, apply the length policy.

Runs as a ``datasets`` map over the source's parts, in several processes where that pays, writing Arrow files.
Every row keeps its place: a dropped or blank row is stored with its status and no tokens, and a bad row stores
its message; the first bad row (in file order, whatever process met it) is what the user sees.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .formats import PARSERS, PREFERENCE_LAYOUTS, Conversation, DataError, Fields, detect_format, json_line
from .pairs import PREFERENCE_PARSERS
from .reading import BOM, Part
from .tokenize import (STATUSES, Example, apply_length_policy, bos_ids, preference_policy, tokenize_many,
                       tokenize_preference)

BLANK = len(STATUSES)  # status of a blank JSONL line: not a row
ROWS_PER_PROCESS = 20_000  # below this many rows per process, starting processes costs more than it saves
COLUMNS = ("input_ids", "labels", "line", "status", "full_length", "n_trained", "error", "pref_kind", "prompt_len",
           "chosen_len")  # pref_*: Example.pref of a preference row (0, 0, 0 for a supervised one)


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the examples of a row, besides the row itself (all of it is in the cache key)."""

    layout: str  # airoboros, alpaca, messages; pairs, kto (preference rows)
    fields: Fields  # the source's column mapping (messages say "field" for JSON rows, "column" for tables)
    prompt_format: str
    model_max_len: int
    truncation: str
    train_on_source: bool
    source_max_len: int = 0  # qlora's cut of each prompt and each reply (0 = none): tokenize.cut_spans
    target_max_len: int = 0


def features():
    import datasets

    ids = datasets.List(datasets.Value("int32"))
    return datasets.Features({"input_ids": ids, "labels": ids, "line": datasets.Value("int64"),
                              "status": datasets.Value("int8"), "full_length": datasets.Value("int32"),
                              "n_trained": datasets.Value("int32"), "error": datasets.Value("string"),
                              "pref_kind": datasets.Value("int8"), "prompt_len": datasets.Value("int32"),
                              "chosen_len": datasets.Value("int32")})


def num_processes(rows: int, asked: int) -> int:
    """``asked`` if > 0, else as many processes as there are cores, each with at least ROWS_PER_PROCESS rows."""
    if asked > 0:
        return asked
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, rows // ROWS_PER_PROCESS))


def detect_layout(part: Part, fmt: str, fields: Fields) -> str:
    """The row layout: ``fmt`` unless auto, else guessed from the first row (JSONL) or the column names."""
    if fmt != "auto":
        return fmt
    if part.jsonl:
        i = 0
        for chunk in part.rows.data.column("line").chunks:  # up to the first non-blank line, not the whole file
            for raw in chunk.to_pylist():
                where = f"{part.label}:{i + 1}"
                row = json_line(raw.removeprefix(BOM) if i == 0 else raw, where)
                if row is not None:
                    return _detected(row, where, "fields")
                i += 1
        raise DataError(f"{part.label}: the file has no rows")
    return _detected(dict.fromkeys(part.rows.column_names), part.label, "columns", fields)


def _detected(row: dict, where: str, noun: str, fields: Fields | None = None) -> str:
    if fields is not None and fields.names:  # the dataset's own column names, seen through the mapping
        inverse = {column: name for name, column in fields.names}
        row = {inverse.get(k, k): v for k, v in row.items()}
    fmt = detect_format(row)
    if fmt is None:
        keys = ", ".join(sorted(row)) or "none"
        raise DataError(f"{where}: cannot tell the row layout from its {noun} ({keys}); expected "
                        "instruction+response (airoboros), instruction+input+output (alpaca), messages, "
                        "prompt+chosen+rejected (pairs) or prompt+completion+label (kto); or set the format")
    return fmt


def _without_nulls(row: dict) -> dict:
    """A table row as the parsers expect it: a null cell is a missing field (also inside a list of turns)."""
    out = {}
    for k, v in row.items():
        if v is None:
            continue
        if isinstance(v, list):
            v = [{a: b for a, b in t.items() if b is not None} if isinstance(t, dict) else t for t in v]
        out[k] = v
    return out


def _conversation(batch: dict, k: int, index: int, part: Part, recipe: Recipe) -> Conversation | None:
    """Row ``index`` of the part as a conversation, None for a blank line; DataError naming the row otherwise."""
    if part.jsonl:
        where = f"{part.label}:{index + 1}"
        raw = batch["line"][k]
        row = json_line(raw.removeprefix(BOM) if index == 0 else raw, where)
        if row is None:
            return None
    else:
        where = f"{part.label}:row {index + 1}"
        row = _without_nulls({c: batch[c][k] for c in batch})
    fields = recipe.fields if part.jsonl else Fields(recipe.fields.names, "column")
    return {**PARSERS, **PREFERENCE_PARSERS}[recipe.layout](row, where, fields)


def convert_batch(batch: dict, indices: list[int], *, part: Part, recipe: Recipe, tokenizer) -> dict:
    """One batch of raw rows -> the cached columns (COLUMNS), a row for each row in."""
    out: dict[str, list] = {c: [] for c in COLUMNS}
    convs, slots = [], []
    for k, index in enumerate(indices):
        try:
            conv = _conversation(batch, k, index, part, recipe)
            error = None
        except DataError as e:
            conv, error = None, str(e)
        _put(out, index + 1, BLANK if conv is None and error is None else 0, error=error)
        if conv is not None:
            convs.append(conv)
            slots.append(k)
    for slot, example in zip(slots, _tokenized(convs, recipe, tokenizer)):
        if isinstance(example, str):
            out["error"][slot] = example
            continue
        kept, status = _policy(example, recipe, tokenizer)
        out["status"][slot] = STATUSES.index(status)
        out["full_length"][slot] = sequence_length(example)
        if kept is not None:
            out["input_ids"][slot], out["labels"][slot] = kept.input_ids, kept.labels
            out["n_trained"][slot] = kept.n_trained
            if kept.pref:
                out["pref_kind"][slot], out["prompt_len"][slot], out["chosen_len"][slot] = kept.pref
    return out


def _policy(example: Example, recipe: Recipe, tokenizer) -> tuple[Example | None, str]:
    if example.pref:
        return preference_policy(example, recipe.model_max_len, recipe.truncation, recipe.source_max_len,
                                 recipe.target_max_len, len(bos_ids(tokenizer)))
    return apply_length_policy(example, recipe.model_max_len, recipe.truncation, recipe.source_max_len,
                               recipe.target_max_len)


def sequence_length(example: Example) -> int:
    """The longest sequence of an example: itself, or a pair's prompt with its longer completion."""
    if example.pref and example.pref[0] == 1:
        _, p, c = example.pref
        return max(p + c, len(example) - p - c)
    return len(example)


def _put(out: dict, line: int, status: int, error: str | None) -> None:
    for c, v in zip(COLUMNS, ([], [], line, status, 0, 0, error, 0, 0, 0)):
        out[c].append(v)


def _tokenized(convs: list[Conversation], recipe: Recipe, tokenizer) -> list:
    """Examples for ``convs`` in one tokenizer call; where a row cannot be rendered, its message instead."""
    if recipe.layout in PREFERENCE_LAYOUTS:
        args, tokenize = (tokenizer, recipe.prompt_format), tokenize_preference
    else:
        args, tokenize = (tokenizer, recipe.prompt_format, recipe.train_on_source), tokenize_many
    try:
        return tokenize(convs, *args)
    except (ValueError, UserError):
        pass
    out = []
    for conv in convs:  # find the row that cannot be rendered (a system turn that does not come first, ...)
        try:
            out += tokenize([conv], *args)
        except ValueError as e:
            out.append(f"{conv.source}: {e}")
    return out


def tokenize_part(part: Part, recipe: Recipe, tokenizer, out_file: Path, num_proc: int):
    """The part's examples, written to ``out_file`` (and its per-process siblings), memory-mapped back."""
    rows = part.rows
    procs = min(num_processes(len(rows), num_proc), max(1, len(rows)))
    result = rows.map(convert_batch, batched=True, batch_size=500, with_indices=True,
                      remove_columns=rows.column_names, features=features(), num_proc=procs if procs > 1 else None,
                      fn_kwargs={"part": Part(part.label, part.jsonl, None), "recipe": recipe,
                                 "tokenizer": tokenizer},
                      cache_file_name=str(out_file), load_from_cache_file=False,
                      new_fingerprint=out_file.stem, desc=f"tokenizing {part.label}")
    first_error(result)
    return result, procs


def first_error(examples) -> None:
    """Raise the message of the first bad row, in row order."""
    import pyarrow.compute as pc

    errors = examples.data.column("error")
    if errors.null_count == len(errors):
        return
    first = pc.index(pc.is_valid(errors), True).as_py()
    raise DataError(errors[first].as_py())
