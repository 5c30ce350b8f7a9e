"""Fixtures of the data tests: a cache folder of their own, and rows written as JSONL, JSON, parquet or CSV."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import airoboros_rows, write_jsonl


@pytest.fixture(autouse=True)
def data_cache(tmp_path, monkeypatch):
    """Each test's tokenized cache lives in its own folder (never the user's ~/.cache)."""
    folder = tmp_path / "data-cache"
    monkeypatch.setenv("QLORAKIT_DATA_CACHE", str(folder))
    return folder


def _write_table(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        return write_jsonl(path, rows)
    if path.suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
        return path
    import pyarrow as pa

    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        import csv

        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return path


@pytest.fixture()
def write_table():
    """``write_table(path, rows)``: the rows as the file type of the path's suffix (.jsonl, .json, .parquet, .csv)."""
    return _write_table


@pytest.fixture()
def alpaca_rows():
    """``alpaca_rows(n, seed)``: alpaca-layout rows; every other one has an input."""
    def rows(n: int, seed: int = 0) -> list[dict]:
        return [{"instruction": r["instruction"], "input": "more words" if i % 2 else "", "output": r["response"]}
                for i, r in enumerate(airoboros_rows(n, seed))]
    return rows
