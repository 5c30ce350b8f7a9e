"""Mixtures: several sources with their own format and a weight or a row cap, from YAML or the command line; the
log and the per-source summary account for every row."""

from __future__ import annotations

import pytest
import yaml

from helpers import airoboros_rows, write_jsonl
from qlorakit.config import TrainConfig
from qlorakit.data.formats import DataError
from qlorakit.data.mixture import held_out, select_rows
from qlorakit.data.prepare import DataOptions, prepare_data
from qlorakit.data.sources import SourceSpec, parse_dataset_arg, parse_dataset_list


def test_airoboros_jsonl_and_alpaca_parquet_with_weights_give_the_expected_counts(tmp_path, tokenizer, write_table,
                                                                                   alpaca_rows):
    a = write_jsonl(tmp_path / "a.jsonl", airoboros_rows(20))
    b = write_table(tmp_path / "b.parquet", alpaca_rows(6, seed=2))
    opts = DataOptions(tuple(parse_dataset_arg(f"{a}:0.5,{b}:format=alpaca:weight=2.5")), eval_size=4, seed=3)
    data = prepare_data(opts, tokenizer)
    a_sum, b_sum = data.sources
    assert (a_sum.rows, a_sum.used, a_sum.format, b_sum.rows, b_sum.used, b_sum.format) == \
        (20, 10, "airoboros", 6, 6, "alpaca")
    # 16 distinct rows in the pool, 4 held out; b's rows count 2 or 3 times each (2.5 x 6 = 15 in all)
    assert len(data.eval) == 4 and a_sum.eval_examples + b_sum.eval_examples == 4
    assert a_sum.train_examples == 10 - a_sum.eval_examples
    held_b = b_sum.eval_examples
    assert len(data.train) == a_sum.train_examples + b_sum.train_examples
    assert 2 * (6 - held_b) <= b_sum.train_examples <= 3 * (6 - held_b)
    by_source = data.train.sources()
    assert list(by_source).count(0) == a_sum.train_examples and list(by_source).count(1) == b_sum.train_examples
    assert data.lines[0] == f"data: 20 rows from {a}, 10 used (weight 0.5)"
    assert data.lines[1] == f"data: 6 rows from {b}, 6 used (weight 2.5)"
    assert "eval: 4 of 16 rows held out (seed 3)" in data.lines
    assert f"mixture: {b} (alpaca): 6 of 6 rows, weight 2.5 -> {b_sum.train_examples} train, {held_b} eval " \
        "examples" in data.lines
    assert {e.source.split(":")[0] for e in data.eval} <= {str(a), str(b)}
    train_rows = {e.source for e in data.train}
    assert not train_rows & {e.source for e in data.eval}  # a held-out row is never trained on, repeated or not


def test_eval_sources_of_their_own_leave_the_training_sources_nothing_held_out(tmp_path, tokenizer, write_table,
                                                                              alpaca_rows):
    a = write_jsonl(tmp_path / "a.jsonl", airoboros_rows(6))
    b = write_table(tmp_path / "b.parquet", alpaca_rows(4))
    e = write_jsonl(tmp_path / "e.jsonl", airoboros_rows(3, seed=7))
    for train in (f"{a}", f"{a},{b}"):  # one training source, and two (more than there are eval sources)
        data = prepare_data(DataOptions(tuple(parse_dataset_arg(train)), tuple(parse_dataset_arg(str(e)))),
                            tokenizer)
        *trains, evals = data.sources
        assert [s.eval_examples for s in trains] == [0] * len(trains)
        assert [s.train_examples for s in trains] == [6, 4][:len(trains)]
        assert (evals.role, evals.train_examples, evals.eval_examples) == ("eval", 0, 3) and len(data.eval) == 3
        assert [x.source for x in data.eval] == [f"{e}:{n}" for n in (1, 2, 3)]


def test_weights_and_caps_select_seeded_rows():
    spec = SourceSpec("x.jsonl", weight=2.5)
    use = select_rows(10, spec, seed=1, salt=0)
    assert list(use.pool) == list(range(10)) and sorted(set(use.copies)) == [2, 3] and use.total == 25
    assert list(use.copies) == list(select_rows(10, spec, 1, 0).copies)  # the same seed, the same rows
    capped = select_rows(100, SourceSpec("x.jsonl", max_rows=7), seed=1, salt=0)
    assert len(capped.pool) == 7 and list(capped.pool) == sorted(capped.pool) and capped.total == 7
    assert list(select_rows(100, SourceSpec("x.jsonl", max_rows=7), seed=1, salt=1).pool) != list(capped.pool)
    assert select_rows(5, SourceSpec("x.jsonl", max_rows=7), seed=1, salt=0).total == 5
    assert len(select_rows(10, SourceSpec("x.jsonl", weight=0.3), 1, 0).pool) == 3


def test_held_out_is_the_seeded_permutation_runs_always_drew():
    import torch

    mask = held_out(50, 0.2, seed=5)
    want = torch.randperm(50, generator=torch.Generator().manual_seed(5))[:10].tolist()
    assert sorted(mask.nonzero()[0].tolist()) == sorted(want)
    assert held_out(50, 3, seed=5).sum() == 3 and held_out(50, 0, seed=5).sum() == 0
    with pytest.raises(Exception, match="leaves no training rows out of 50"):
        held_out(50, 50, seed=5)


def test_a_mixture_from_yaml_is_the_one_from_the_command_line(tmp_path, tokenizer, write_table, alpaca_rows):
    a = write_jsonl(tmp_path / "a.jsonl", airoboros_rows(8))
    b = write_table(tmp_path / "b.csv", alpaca_rows(30))
    text = f"""
datasets:
  - path: {a}
    weight: 2
  - path: {b}
    format: alpaca
    max_rows: 5
"""
    listed = parse_dataset_list(yaml.safe_load(text)["datasets"])
    compact = parse_dataset_arg([f"{a}:2", f"{b}:format=alpaca:max_rows=5"])
    assert listed == compact
    x = prepare_data(DataOptions(tuple(listed)), tokenizer)
    y = prepare_data(DataOptions(tuple(compact)), tokenizer)
    assert [e.input_ids for e in x.train] == [e.input_ids for e in y.train]
    assert len(x.train) == 2 * 8 + 5 and [s.used for s in x.sources] == [8, 5]
    assert all("loaded" in line for line in y.lines if line.startswith("data cache:"))


def test_options_from_a_config_and_yaml_mistakes(tmp_path):
    cfg = TrainConfig(dataset="a.jsonl:0.5,b.parquet:max_rows=3", eval_dataset="e.jsonl", eval_dataset_size=0.1)
    opts = DataOptions.from_config(cfg)
    assert [(s.path, s.weight, s.max_rows) for s in opts.sources] == [("a.jsonl", 0.5, None), ("b.parquet", None, 3)]
    assert [s.path for s in opts.eval_sources] == ["e.jsonl"] and opts.model_max_len == cfg.model_max_len
    assert DataOptions.from_config(TrainConfig()).sources[0].path.endswith("sample_airoboros.jsonl")
    for entries, message in [([{"path": "a.jsonl", "wieght": 2}], r"datasets\[0\]: wieght: unknown key"),
                             ([{"format": "alpaca"}], r"datasets\[0\]: path: missing"),
                             ([{"path": "a.jsonl", "weight": -1}], r"datasets\[0\]: weight: must be > 0"),
                             ([{"path": "a.jsonl", "columns": {"answer": "x"}}], "unknown field 'answer'"),
                             ([], "non-empty list")]:
        with pytest.raises(DataError, match=message):
            parse_dataset_list(entries)
