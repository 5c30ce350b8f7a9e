"""A source opened as ``datasets.Dataset`` parts of raw rows, and the fingerprint of its content.

JSONL files become a table of their raw lines (one row per line, blank lines included), so the parser that runs
over them later names the exact line of a bad row with the same messages as ``read_jsonl``. Parquet, CSV, JSON
arrays, saved datasets and hub datasets are read by ``datasets``; their rows are numbered from 1 (a CSV header is not
a row). Everything is written to (or memory-mapped from) disk, never held as Python lists.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..hub import missing, use_hub
from .formats import DataError
from .sources import FILE_KINDS, SourceSpec

BOM = b"\xef\xbb\xbf"
LINES_PER_BATCH = 8192


@dataclass
class Part:
    """One file (or a hub split) of a source: its raw rows and how messages name them."""

    label: str  # the file path as given, or the hub id: "label:LINE" or "label:row N" in messages
    jsonl: bool  # rows are raw lines (numbered as lines), else table rows
    rows: object  # datasets.Dataset


def data_files(spec: SourceSpec) -> list[Path]:
    """The files a local source reads, in a fixed order (a folder: its data files by relative path)."""
    kind = spec.kind()
    p = Path(spec.path)
    if kind == "hub":
        return []
    if kind in ("folder", "arrow"):
        suffixes = set(FILE_KINDS) if kind == "folder" else {".arrow", ".json"}
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in suffixes
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
        if not files:
            raise DataError(f"{spec.path}: the folder holds no data files (.jsonl, .json, .parquet, .csv)")
        return files
    return [p]


def content_fingerprint(spec: SourceSpec) -> tuple[str, dict[str, str]]:
    """A digest of what the source holds, and the sha256 of each local file (for the model card). A hub
    dataset is named by the fingerprint ``datasets`` gives the cached copy it loads."""
    if spec.kind() == "hub":
        return "hub:" + getattr(_load_hub(spec), "_fingerprint", "unknown"), {}
    digests = {str(f): _sha256(f) for f in data_files(spec)}
    whole = hashlib.sha256(json.dumps(sorted((str(Path(k).relative_to(spec.path)) if Path(spec.path).is_dir()
                                              else "", v) for k, v in digests.items())).encode())
    return whole.hexdigest(), digests


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def open_parts(spec: SourceSpec, workdir: Path) -> list[Part]:
    """The source's raw rows, one part per file (or the hub split). Intermediate files go under ``workdir``."""
    kind = spec.kind()
    if kind != "hub" and kind != "arrow" and spec.split != "train":
        raise DataError(f"{spec.origin or spec.path}: split '{spec.split}' applies to hub ids and saved datasets; "
                        "a file is one split")
    if kind == "hub":
        return [Part(spec.describe(), False, _load_hub(spec))]
    if kind == "arrow":
        return [Part(spec.path, False, _load_saved(spec))]
    files = data_files(spec)
    return [_open_file(f, FILE_KINDS[f.suffix.lower()], workdir / f"raw-{i}") for i, f in enumerate(files)]


def _open_file(path: Path, kind: str, workdir: Path) -> Part:
    label = str(path)
    if kind == "json" and _first_byte(path) != b"[":
        kind = "jsonl"  # JSON Lines in a .json file
    if kind == "jsonl":
        return Part(label, True, _line_table(path, workdir))
    import datasets

    try:
        if kind == "csv":
            names = _csv_header(path)
            features = datasets.Features({n: datasets.Value("string") for n in names})
            rows = datasets.load_dataset("csv", data_files=str(path), split="train", cache_dir=str(workdir),
                                         features=features, keep_default_na=False, na_filter=False,
                                         encoding="utf-8-sig")
        else:
            rows = datasets.load_dataset(kind, data_files=str(path), split="train", cache_dir=str(workdir))
    except Exception as e:  # pyarrow's and pandas' parse errors, wrapped by datasets
        cause = e.__cause__ or e
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise DataError(f"{path}: cannot be read as {kind.upper()} ({first})") from None
    return Part(label, False, rows)


def _first_byte(path: Path) -> bytes:
    with path.open("rb") as f:
        head = f.read(4096).removeprefix(BOM).lstrip()
    return head[:1]


def _csv_header(path: Path) -> list[str]:
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            header = next(csv.reader(f), None)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: bytes that are not UTF-8 at byte {e.start + 1}; re-encode the file as UTF-8") \
            from None
    if not header:
        raise DataError(f"{path}: the file has no rows (not even a header line)")
    return header


def _line_table(path: Path, workdir: Path):
    """Every line of ``path`` (split on \\n, as read_jsonl does), as bytes, in an Arrow file memory-mapped back."""
    import datasets
    import pyarrow as pa

    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / "lines.arrow"
    schema = pa.schema([("line", pa.binary())])
    with path.open("rb") as f, pa.OSFile(str(out), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        batch: list[bytes] = []
        for line in f:
            batch.append(line[:-1] if line.endswith(b"\n") else line)
            if len(batch) == LINES_PER_BATCH:
                writer.write_batch(pa.record_batch([pa.array(batch, pa.binary())], schema=schema))
                batch = []
        if batch:
            writer.write_batch(pa.record_batch([pa.array(batch, pa.binary())], schema=schema))
    return datasets.Dataset.from_file(str(out))


def _load_saved(spec: SourceSpec):
    import datasets

    try:
        loaded = datasets.load_from_disk(spec.path)
    except Exception as e:
        raise DataError(f"{spec.path}: cannot be read as a saved dataset ({str(e).splitlines()[0]})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if spec.split not in loaded:
            raise DataError(f"{spec.origin or spec.path}: no split '{spec.split}' in {spec.path}; it has "
                            f"{', '.join(loaded)}")
        loaded = loaded[spec.split]
    return loaded


def _load_hub(spec: SourceSpec):
    """A hub dataset from the local Hugging Face cache, or from the hub where it can be reached (``hub.use_hub``:
    where it cannot, the cache alone answers at once, and a dataset it lacks is one line)."""
    import datasets

    online = use_hub()
    try:
        return datasets.load_dataset(spec.path, spec.subset, split=spec.split)
    except Exception as e:  # unknown subset or split, a dataset that does not exist
        if not online and isinstance(e, (ConnectionError, FileNotFoundError)):
            raise missing(spec.origin or spec.path, spec.path, "dataset", datasets.config.HF_DATASETS_CACHE) from None
        raise DataError(f"{spec.path}: {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
