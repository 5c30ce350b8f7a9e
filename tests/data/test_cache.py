"""The tokenized cache: a second run with the same inputs loads it (no tokenizing), anything that changes the
examples builds anew, ranks that wait load what one rank built, and two builders of one key do the work once."""

from __future__ import annotations

import copy
import multiprocessing
import time

import pytest

from helpers import airoboros_rows, write_jsonl
from qlorakit.data import prepare as prepare_module
from qlorakit.data.cache import cached
from qlorakit.data.formats import DataError
from qlorakit.data.prepare import DataOptions, prepare_data
from qlorakit.data.sources import parse_dataset_arg


def opts(path, **kw) -> DataOptions:
    return DataOptions(tuple(parse_dataset_arg(str(path))), **kw)


def cache_line(data) -> str:
    return next(x for x in data.lines if x.startswith("data cache:"))


def no_tokenizing(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("tokenized although the cache holds these examples")
    monkeypatch.setattr(prepare_module, "tokenize_part", refuse)


def test_a_second_run_loads_the_cache_and_a_change_builds_anew(tmp_path, tokenizer, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", airoboros_rows(10))
    first = prepare_data(opts(path, model_max_len=128, eval_size=2), tokenizer)
    assert "tokenized in" in cache_line(first)
    with monkeypatch.context() as m:
        no_tokenizing(m)
        again = prepare_data(opts(path, model_max_len=128, eval_size=2), tokenizer)
        assert "loaded (tokenized " in cache_line(again)
        assert [e.input_ids for e in again.train] == [e.input_ids for e in first.train]
        assert [e.labels for e in again.eval] == [e.labels for e in first.eval]
        assert again.fingerprint == first.fingerprint
        # the split and the mixture are drawn from the cached rows: no tokenizing for another seed either
        assert prepare_data(opts(path, model_max_len=128, eval_size=2, seed=1), tokenizer).fingerprint != \
            first.fingerprint
    other_tok = copy.deepcopy(tokenizer)
    other_tok.add_tokens(["<extra_token>"])
    changes = [(opts(path, model_max_len=64, eval_size=2), tokenizer), (opts(path, model_max_len=128), other_tok),
               (opts(path, model_max_len=128, prompt_format="chatml"), tokenizer),
               (opts(path, model_max_len=128, train_on_source=True), tokenizer),
               (opts(path, model_max_len=128, truncation="drop"), tokenizer)]
    for options, tok in changes:
        assert "tokenized in" in cache_line(prepare_data(options, tok)), options
    write_jsonl(path, airoboros_rows(10, seed=1))  # the same file, other rows
    assert "tokenized in" in cache_line(prepare_data(opts(path, model_max_len=128), tokenizer))


def _build_later(path, cache_dir, tokenizer):
    time.sleep(1.0)
    prepare_data(DataOptions(tuple(parse_dataset_arg(str(path))), cache_dir=str(cache_dir)), tokenizer)


def test_ranks_that_wait_load_what_one_rank_built(tmp_path, tokenizer, data_cache):
    path = write_jsonl(tmp_path / "d.jsonl", airoboros_rows(6))
    with pytest.raises(DataError, match="waited 0 s for .* to be built by another process"):
        prepare_data(opts(path), tokenizer, mode="wait", wait_timeout_s=0.3)
    builder = multiprocessing.get_context("fork").Process(target=_build_later, args=(path, data_cache, tokenizer))
    builder.start()
    try:
        waited = prepare_data(opts(path), tokenizer, mode="wait", wait_timeout_s=120)
    finally:
        builder.join(120)
    assert builder.exitcode == 0 and "loaded" in cache_line(waited) and len(waited.train) == 6


def _count_build(root, key, log):
    def build(tmp):
        with open(log, "a") as f:
            f.write("built\n")
        time.sleep(0.5)
        (tmp / "x").write_text("x")
        return {"n": 1}
    return cached(root, key, build)[2]


def test_two_builders_of_one_key_build_once_and_a_killed_build_is_swept(tmp_path):
    root, log = tmp_path / "cache", tmp_path / "log"
    (root / ".k1.tmp-99999").mkdir(parents=True)  # what a build killed half-way leaves
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as pool:
        states = pool.starmap(_count_build, [(root, "k1", log), (root, "k1", log)])
    assert sorted(states) == ["built", "loaded"] and log.read_text() == "built\n"
    assert not (root / ".k1.tmp-99999").exists() and (root / "k1" / "meta.json").is_file()


def test_a_build_that_fails_leaves_no_cache(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", airoboros_rows(3) + [{"instruction": "x"}])
    root = tmp_path / "c"
    with pytest.raises(DataError, match="d.jsonl:4: missing field 'response'"):
        prepare_data(opts(path, cache_dir=str(root)), tokenizer)
    assert [p.name for p in root.iterdir() if not p.name.endswith(".lock")] == []


def test_the_sequence_indexes_like_the_list_it_replaces(tmp_path, tokenizer):
    from qlorakit.data.formats import read_jsonl
    from qlorakit.data.tokenize import tokenize_all

    path = write_jsonl(tmp_path / "d.jsonl", airoboros_rows(7))
    seq = prepare_data(opts(path, model_max_len=64), tokenizer).train
    listed, _ = tokenize_all(read_jsonl(path), tokenizer, "airoboros", 64)
    assert len(seq) == len(listed)
    assert seq[-1] == listed[-1] and seq[2:5] == listed[2:5] and list(seq) == listed
    assert [len(seq[i]) for i in range(len(seq))] == list(seq.lengths) == [len(e) for e in listed]
    assert list(seq.n_trained) == [e.n_trained for e in listed]
    assert sorted(seq, key=len) == sorted(listed, key=len)
    with pytest.raises(IndexError):
        seq[len(seq)]
