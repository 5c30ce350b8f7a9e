"""``qlorakit train`` on every kind of source and on mixtures: the log and the model card name each source with the
rows it has and the rows the run used, and a second run with the same inputs loads the tokenized cache."""

from __future__ import annotations

import logging
import shlex

import pytest

from helpers import airoboros_rows, read_metrics, write_jsonl
from qlorakit.cli import main
from qlorakit.config import build_config

QUICK = ["--max_steps", "2", "--per_device_train_batch_size", "2", "--learning_rate", "0.01", "--save_strategy", "no",
         "--eval_strategy", "no", "--warmup_ratio", "0"]


@pytest.fixture
def sources(tmp_path):
    """An airoboros JSONL of 8 rows and an alpaca parquet of 6 other rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = write_jsonl(tmp_path / "chat.jsonl", airoboros_rows(8))
    table = tmp_path / "tasks.parquet"
    pq.write_table(pa.Table.from_pylist([{"instruction": r["instruction"], "input": "a note" if i % 2 else "",
                                          "output": r["response"]} for i, r in enumerate(airoboros_rows(6, seed=3))]),
                   table)
    return jsonl, table


def train(caplog, *args) -> str:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="qlorakit"):
        assert main(["train", *args]) == 0
    return caplog.text


def card(run) -> str:
    return (run / "README.md").read_text()


def test_train_on_a_parquet_file(tiny_llama, tmp_path, sources, caplog):
    _, table = sources
    out = tmp_path / "run"
    log = train(caplog, "--model_name_or_path", str(tiny_llama), "--dataset", str(table), "--output_dir", str(out),
                "--data_cache_dir", str(tmp_path / "cache"), *QUICK)
    assert f"data: 6 rows from {table}\n" in log and "train: 6 examples kept" in log
    assert f"data cache: {table} tokenized in " in log and f": {tmp_path / 'cache'}" in log
    assert len(read_metrics(out, "loss")) == 2
    text = card(out)
    assert "datasets:\n- tasks\n" in text and "fine-tuned with qlorakit on `tasks`" in text
    assert "| `tasks.parquet` | train | alpaca | 6 | 6 (all rows) | 6 | 0 |" in text and str(tmp_path) not in text
    assert "`tasks.parquet` (sha256 `" in text.split("## Licence and usage", 1)[1]


def test_a_mixture_trains_and_a_second_run_loads_the_cache(tiny_llama, tmp_path, sources, caplog):
    """JSONL at weight 0.5 and parquet at weight 2 (alpaca), 2 rows held out: the log and the card account for each
    source; the same mixture again, written as a YAML datasets list, loads both sources from the cache."""
    jsonl, table = sources
    cache = tmp_path / "cache"
    common = ["--model_name_or_path", str(tiny_llama), "--data_cache_dir", str(cache), "--eval_dataset_size", "2",
              *QUICK]
    first = tmp_path / "first"
    log = train(caplog, "--dataset", f"{jsonl}:0.5,{table}:2:format=alpaca", "--output_dir", str(first), *common)
    assert f"data: 8 rows from {jsonl}, 4 used (weight 0.5)" in log
    assert f"data: 6 rows from {table}, 6 used (weight 2)" in log
    assert "eval: 2 of 10 rows held out (seed 42)" in log
    lines = [x for x in log.splitlines() if "mixture: " in x]
    assert len(lines) == 2 and f"mixture: {jsonl} (airoboros): 4 of 8 rows, weight 0.5 -> " in lines[0]
    assert f"mixture: {table} (alpaca): 6 of 6 rows, weight 2 -> " in lines[1]
    assert f"data cache: {jsonl} tokenized in " in log and f"data cache: {table} tokenized in " in log

    text = card(first)
    assert "datasets:\n- chat\n- tasks\n" in text and "on `chat`, `tasks` (" in text
    rows = [x for x in text.splitlines() if x.startswith("| `")]
    assert rows[0].startswith("| `chat.jsonl` | train | airoboros | 8 | 4 (weight 0.5) | ")
    assert rows[1].startswith("| `tasks.parquet` | train | alpaca | 6 | 6 (weight 2) | ")
    trained = [int(r.split("|")[6]) for r in rows]
    held = [int(r.split("|")[7]) for r in rows]
    assert sum(held) == 2 and trained[0] == 4 - held[0] and trained[1] == 2 * (6 - held[1])
    licence = text.split("## Licence and usage", 1)[1]
    assert "2 sources, each under its own terms: (1) `chat.jsonl`" in licence and "(2) `tasks.parquet`" in licence

    config = tmp_path / "mix.yaml"
    config.write_text(f"datasets:\n  - path: {jsonl}\n    weight: 0.5\n  - path: {table}\n    format: alpaca\n"
                      "    weight: 2\n")
    second = tmp_path / "second"
    log = train(caplog, str(config), "--output_dir", str(second), *common)
    assert f"data cache: {jsonl} loaded (tokenized " in log and f"data cache: {table} loaded (tokenized " in log
    assert "tokenized in" not in log
    assert [x for x in log.splitlines() if "mixture: " in x] == lines  # the same examples, split the same way
    reproduce = next(x for x in card(second).splitlines() if x.startswith("qlorakit train "))
    named = config.read_text().replace(f"{jsonl}", jsonl.name).replace(f"{table}", table.name)
    assert str(tmp_path) not in reproduce and named != config.read_text()  # the card names files, not paths
    (tmp_path / "named.yaml").write_text(named)
    assert build_config(shlex.split(reproduce)[2:]).datasets == build_config([str(tmp_path / "named.yaml")]).datasets
    losses = [r["loss"] for r in read_metrics(first, "loss")]
    assert len(losses) == 2 and [r["loss"] for r in read_metrics(second, "loss")] == pytest.approx(losses, rel=1e-6)
