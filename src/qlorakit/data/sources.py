"""Where training rows come from: one source or a mixture of several, from YAML or a compact command-line string.

A source is a local file (.jsonl, .json, .parquet, .csv), a folder of such files, a dataset saved with
``datasets``' ``save_to_disk``, or a Hugging Face hub id. Each has its own row layout (``format``), an optional
``columns`` mapping for datasets that name the layout's fields differently, and either a ``weight`` or a ``max_rows``
cap that says how many of its rows the run uses (see ``mixture.py``).

Command line, one string (or several, joined): sources separated by ``,``; a source is ``PATH`` followed by
``:OPTION`` parts, each either a bare number (the weight) or ``key=value`` with key one of weight, max_rows,
format, split, subset::

    a.jsonl:0.7,b.parquet:max_rows=500:format=alpaca,org/name:subset=en:split=train
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..resources import SAMPLE_DATASET
from .formats import ALIASES, FIELDS, ROW_LAYOUTS, DataError

FILE_KINDS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
OPTION_KEYS = ("weight", "max_rows", "format", "split", "subset")
YAML_KEYS = ("path", *OPTION_KEYS, "columns")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
FORMAT_NAMES = ("auto", *ROW_LAYOUTS, *ALIASES)


@dataclass(frozen=True)
class SourceSpec:
    """One dataset of a run, as the user named it."""

    path: str
    format: str = "auto"  # auto, airoboros, alpaca, messages, sharegpt
    weight: float | None = None  # how many times each row is used on average: 0.5 = a seeded half, 2 = twice
    max_rows: int | None = None  # at most this many rows, a seeded sample
    split: str = "train"  # hub ids and saved DatasetDicts
    subset: str | None = None  # a hub dataset's configuration ("name" in datasets.load_dataset)
    columns: tuple[tuple[str, str], ...] = ()  # (layout field, the dataset's column)
    origin: str = field(default="", compare=False)  # where the user wrote it, for messages ("--dataset", "datasets[1]")

    @property
    def layout(self) -> str:
        """The parser's name: sharegpt rows are messages rows."""
        return ALIASES.get(self.format, self.format)

    def describe(self) -> str:
        """How the log and the model card name the source."""
        extra = f" [{self.subset}]" if self.subset else ""
        return f"{self.path}{extra}" + (f" ({self.split})" if self.kind() == "hub" and self.split != "train" else "")

    def kind(self) -> str:
        """jsonl, json, parquet, csv (a file), folder, arrow (save_to_disk), or hub (a hub id)."""
        p = Path(self.path)
        if p.is_dir():
            saved = (p / "state.json").is_file() or (p / "dataset_dict.json").is_file()
            return "arrow" if saved else "folder"
        if p.is_file():
            kind = FILE_KINDS.get(p.suffix.lower())
            if kind is None:
                raise DataError(f"{self.path}: unknown file type '{p.suffix}'; give a .jsonl, .json, .parquet or "
                                ".csv file, a folder of them, a saved dataset folder or a hub id")
            return kind
        if HUB_ID.match(self.path) and Path(self.path).suffix.lower() not in FILE_KINDS:
            return "hub"
        raise DataError(f"{self.path}: no such file; check the dataset path")


def _where(origin: str, key: str) -> str:
    return f"{origin}: {key}" if origin else key


def _number(value, key: str, origin: str, whole: bool):
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
        if whole:
            if not number.is_integer():
                raise ValueError
            number = int(number)
    except (TypeError, ValueError):
        want = "a whole number" if whole else "a number"
        raise DataError(f"{_where(origin, key)}: {value!r} is not {want}") from None
    if number <= 0:
        raise DataError(f"{_where(origin, key)}: must be > 0, got {value}")
    return number


def _columns(value, origin: str, layout: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise DataError(f"{_where(origin, 'columns')}: expected a mapping of layout field: column name, "
                        "e.g. {instruction: question, response: answer}")
    known = FIELDS.get(layout, tuple(f for fs in FIELDS.values() for f in fs))
    unknown = [k for k in value if k not in known]
    if unknown:
        raise DataError(f"{_where(origin, 'columns')}: unknown field '{unknown[0]}' for format {layout}; "
                        f"fields are {', '.join(known)}")
    return tuple(sorted(value.items()))


def spec_from_mapping(entry: dict, origin: str, default_format: str = "auto") -> SourceSpec:
    """A source from one YAML entry (``{path: a.jsonl, format: airoboros, weight: 0.5}``)."""
    if isinstance(entry, str):
        specs = parse_dataset_arg(entry, origin, default_format)
        if len(specs) > 1:
            raise DataError(f"{origin}: {entry!r} names several datasets; give one per entry")
        return specs[0]
    if not isinstance(entry, dict):
        raise DataError(f"{origin}: expected a mapping with at least 'path', got {type(entry).__name__}")
    unknown = [k for k in entry if k not in YAML_KEYS]
    if unknown:
        raise DataError(f"{_where(origin, str(unknown[0]))}: unknown key; a dataset entry takes "
                        f"{', '.join(YAML_KEYS)}")
    if not isinstance(entry.get("path"), str) or not entry["path"].strip():
        raise DataError(f"{_where(origin, 'path')}: missing; give a file, folder or hub id")
    return _build(entry, origin, default_format)


def _build(values: dict, origin: str, default_format: str) -> SourceSpec:
    fmt = str(values.get("format", default_format))
    if fmt not in FORMAT_NAMES:
        raise DataError(f"{_where(origin, 'format')}: {fmt!r} is not one of {', '.join(FORMAT_NAMES)}")
    weight = _number(values["weight"], "weight", origin, False) if values.get("weight") is not None else None
    max_rows = _number(values["max_rows"], "max_rows", origin, True) if values.get("max_rows") is not None else None
    if weight is not None and max_rows is not None:
        raise DataError(f"{origin}: give a weight or max_rows, not both")
    path = str(values["path"])
    spec = SourceSpec(path=str(SAMPLE_DATASET) if path == "default" else path, format=fmt, weight=weight,
                      max_rows=max_rows, split=str(values.get("split") or "train"),
                      subset=str(values["subset"]) if values.get("subset") is not None else None, origin=origin)
    if values.get("columns") is not None:
        layout = ALIASES.get(fmt, fmt)
        spec = SourceSpec(**{**spec.__dict__, "columns": _columns(values["columns"], origin, layout)})
    return spec


def parse_dataset_arg(text: str | list[str] | tuple[str, ...], origin: str = "--dataset",
                      default_format: str = "auto") -> list[SourceSpec]:
    """Sources from the compact syntax (module docstring); a list of strings is read as if joined by commas."""
    parts = [text] if isinstance(text, str) else list(text)
    entries = [e.strip() for part in parts for e in part.split(",")]
    if not entries or any(not e for e in entries):
        raise DataError(f"{origin}: {','.join(parts)!r} has an empty dataset entry; write PATH[:OPTION...] "
                        "separated by commas")
    specs = []
    for entry in entries:
        where = f"{origin} {entry!r}" if len(entries) > 1 or ":" in entry else origin
        path, *options = entry.split(":")
        values: dict = {"path": path}
        for opt in options:
            key, eq, value = opt.partition("=")
            if not eq:
                key, value = "weight", opt
            if key not in OPTION_KEYS:
                raise DataError(f"{where}: unknown option '{key}'; options are a weight (a number) or "
                                f"{'=, '.join(OPTION_KEYS)}=")
            if key in values:
                raise DataError(f"{where}: {key} given twice")
            values[key] = value
        specs.append(_build(values, where, default_format))
    return specs


def parse_dataset_list(entries, origin: str = "datasets", default_format: str = "auto") -> list[SourceSpec]:
    """Sources from a YAML list of mappings (or of compact strings)."""
    if not isinstance(entries, (list, tuple)) or not entries:
        raise DataError(f"{origin}: expected a non-empty list of datasets, each a mapping with 'path'")
    return [spec_from_mapping(e, f"{origin}[{i}]", default_format) for i, e in enumerate(entries)]
