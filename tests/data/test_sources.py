"""Sources through ``datasets``: the same rows in every file type give the same examples as today's JSONL path, and a
bad row names its file, line or row, and field or column, in one line."""

from __future__ import annotations

import pytest

from helpers import airoboros_rows, write_jsonl
from qlorakit.cli import main
from qlorakit.data.formats import DataError, read_jsonl
from qlorakit.data.prepare import DataOptions, prepare_data
from qlorakit.data.sources import parse_dataset_arg
from qlorakit.data.tokenize import tokenize_all


def opts(dataset: str, **kw) -> DataOptions:
    return DataOptions(tuple(parse_dataset_arg(dataset)), **kw)


def tokens(seq) -> list[tuple[list[int], list[int]]]:
    return [(e.input_ids, e.labels) for e in seq]


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".json"])
def test_same_rows_in_every_file_type_give_the_examples_of_jsonl(tmp_path, tokenizer, write_table, suffix):
    rows = airoboros_rows(12) + [{"instruction": "long " * 80, "response": "cut"}]
    jsonl = write_table(tmp_path / "rows.jsonl", rows)
    other = write_table(tmp_path / f"rows{suffix}", rows)
    kw = dict(model_max_len=96, eval_size=3, seed=7)
    a, b = prepare_data(opts(str(jsonl), **kw), tokenizer), prepare_data(opts(str(other), **kw), tokenizer)
    assert len(a.train) + len(a.eval) == 12 and any("no trained token left" in x for x in a.lines)
    assert tokens(a.train) == tokens(b.train) and tokens(a.eval) == tokens(b.eval)
    assert a.train[0].source == f"{jsonl}:1" and b.train[0].source == f"{other}:row 1"
    assert list(a.train.lengths) == [len(e) for e in b.train]


def test_jsonl_examples_and_split_are_exactly_those_of_the_list_path(tmp_path, tokenizer):
    """read_jsonl + the seeded split + tokenize_all, the path every run so far took: same examples, same order,
    same sources, same report, so runs resume identically."""
    import torch

    path = write_jsonl(tmp_path / "d.jsonl", airoboros_rows(30, seed=4))
    data = prepare_data(opts(str(path), eval_size=0.2, seed=11, model_max_len=80), tokenizer)
    convs = read_jsonl(path)
    held = set(torch.randperm(30, generator=torch.Generator().manual_seed(11))[:6].tolist())
    train, rep = tokenize_all([c for i, c in enumerate(convs) if i not in held], tokenizer, "airoboros", 80)
    evals, _ = tokenize_all([c for i, c in enumerate(convs) if i in held], tokenizer, "airoboros", 80)
    assert [(e.input_ids, e.labels, e.source) for e in data.train] == [(e.input_ids, e.labels, e.source)
                                                                        for e in train]
    assert [e.source for e in data.eval] == [e.source for e in evals]
    assert data.lines[:2] == [f"data: 30 rows from {path}", "eval: 6 of 30 rows held out (seed 11)"]
    assert [f"train: {x}" for x in rep.lines()] == [x for x in data.lines if x.startswith("train:")]
    assert list(data.train.n_trained) == [e.n_trained for e in train]


def test_folder_saved_dataset_and_blank_lines(tmp_path, tokenizer, write_table):
    """A folder reads its files in name order; a saved dataset reads its split; blank lines keep line numbers."""
    import datasets

    rows = airoboros_rows(6)
    folder = tmp_path / "parts"
    folder.mkdir()
    (folder / "a.jsonl").write_text("\n" + write_jsonl(tmp_path / "x.jsonl", rows[:4]).read_text() + "\n\n")
    write_table(folder / "b.parquet", rows[4:])
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:2]),
                          "test": datasets.Dataset.from_list(rows[2:])}).save_to_disk(str(saved))
    whole = prepare_data(opts(str(write_jsonl(tmp_path / "all.jsonl", rows))), tokenizer)
    parts = prepare_data(opts(str(folder)), tokenizer)
    assert tokens(parts.train) == tokens(whole.train)
    assert [e.source for e in parts.train] == [f"{folder / 'a.jsonl'}:{n}" for n in (2, 3, 4, 5)] + \
        [f"{folder / 'b.parquet'}:row {n}" for n in (1, 2)]
    assert parts.lines[0] == f"data: 6 rows from {folder}"
    test = prepare_data(opts(f"{saved}:split=test"), tokenizer)
    assert tokens(test.train) == tokens(whole.train)[2:]
    with pytest.raises(DataError, match="no split 'dev' in .*; it has train, test"):
        prepare_data(opts(f"{saved}:split=dev"), tokenizer)


def test_sharegpt_and_a_column_mapping(tmp_path, tokenizer, write_table):
    """ShareGPT's conversations/from/value rows, and an airoboros table whose columns have other names."""
    rows = airoboros_rows(3)
    plain = prepare_data(opts(str(write_jsonl(tmp_path / "p.jsonl", rows))), tokenizer)
    share = [{"conversations": [{"from": "human", "value": r["instruction"]}, {"from": "gpt", "value": r["response"]}]}
             for r in rows]
    sharegpt = prepare_data(opts(f"{write_table(tmp_path / 's.parquet', share)}:format=sharegpt"), tokenizer)
    assert tokens(sharegpt.train) == tokens(plain.train)
    from qlorakit.data.sources import parse_dataset_list

    renamed = write_table(tmp_path / "q.csv", [{"question": r["instruction"], "answer": r["response"]} for r in rows])
    spec = parse_dataset_list([{"path": str(renamed), "columns": {"instruction": "question", "response": "answer"}}])
    assert tokens(prepare_data(DataOptions(tuple(spec)), tokenizer).train) == tokens(plain.train)
    bad = write_table(tmp_path / "r.csv", [{"question": "q", "answer": " "}])
    spec = parse_dataset_list([{"path": str(bad), "format": "airoboros",
                                "columns": {"instruction": "question", "response": "answer"}}])
    with pytest.raises(DataError, match=r"r.csv:row 1: column 'answer' is blank$"):
        prepare_data(DataOptions(tuple(spec)), tokenizer)


@pytest.mark.parametrize("content,where,what", [
    ('{"instruction": "a", "response": "b"}\n{"instruction": "a", "response": }', ":2:", "invalid JSON"),
    ('{"instruction": "a", "response": "b"}\n{"instruction": "a", "respons": "b"}', ":2:", "response"),
    ('{"instruction": "a", "response": 3}', ":1:", "response"),
    ('{"instruction": "a", "response": "  "}', ":1:", "blank"),
    ('{"instruction": "a", "response": "b"}\n[1, 2]', ":2:", "JSON object"),
    (b'{"instruction": "a", "response": "b"}\n{"instruction": "caf\xe9", "response": "b"}\n', ":2:", "not UTF-8"),
])
def test_bad_jsonl_rows_give_the_message_of_read_jsonl(tmp_path, tokenizer, content, where, what):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError) as listed:
        read_jsonl(p)
    with pytest.raises(DataError) as prepared:
        prepare_data(opts(str(p)), tokenizer)
    assert str(prepared.value) == str(listed.value)
    assert f"bad.jsonl{where}" in str(prepared.value) and what in str(prepared.value)


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
@pytest.mark.parametrize("row,message", [
    ({"instruction": "a", "response": "  "}, "row 3: column 'response' is blank"),
    ({"instruction": "a", "response": None}, "row 3: missing column 'response' (row has: instruction)"),
])
def test_bad_table_rows_name_file_row_and_column(tmp_path, tokenizer, write_table, suffix, row, message):
    if suffix == ".csv" and row["response"] is None:
        row = {**row, "response": ""}  # CSV has no null: an empty cell
        message = "row 3: column 'response' is blank"
    p = write_table(tmp_path / f"bad{suffix}", airoboros_rows(2) + [row] + airoboros_rows(2, seed=1))
    with pytest.raises(DataError) as e:
        prepare_data(opts(str(p)), tokenizer)
    assert str(e.value) == f"{p}:{message}"


def test_a_parquet_column_of_the_wrong_type(tmp_path, tokenizer, write_table):
    p = write_table(tmp_path / "n.parquet", [{"instruction": "a", "response": 3}])
    with pytest.raises(DataError, match=r"n.parquet:row 1: column 'response' must be a string, got int$"):
        prepare_data(opts(str(p), ), tokenizer)


def test_bad_rows_end_the_commands_in_one_line(tmp_path, tiny_llama, write_table, capsys):
    p = write_table(tmp_path / "bad.parquet", airoboros_rows(2) + [{"instruction": "a", "response": " "}])
    assert main(["data", "check", str(p), "--model_name_or_path", str(tiny_llama)]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "bad.parquet:row 3: column 'response' is blank" in err


def test_the_first_bad_row_is_reported_whatever_process_meets_it(tmp_path, tokenizer):
    """Two processes tokenize; the bad rows sit in both halves; the message names the first in the file."""
    rows = airoboros_rows(40)
    rows[30] = {"instruction": "a"}
    rows[25] = {"instruction": "b", "response": 5}
    p = write_jsonl(tmp_path / "two.jsonl", rows)
    with pytest.raises(DataError, match=r"two.jsonl:26: field 'response' must be a string, got int$"):
        prepare_data(opts(str(p), num_proc=2), tokenizer)
    good = write_jsonl(tmp_path / "good.jsonl", airoboros_rows(40))
    one, two = prepare_data(opts(str(good), num_proc=1), tokenizer), prepare_data(
        opts(str(good), num_proc=2, model_max_len=1023), tokenizer)
    assert tokens(one.train) == tokens(two.train) and "with 2 processes" in two.lines[-1]


def test_unknown_files_and_options_are_one_line_errors(tmp_path, tokenizer):
    (tmp_path / "rows.txt").write_text("x")
    for arg, message in [(f"{tmp_path}/none.jsonl", "no such file"), (f"{tmp_path}/rows.txt", "unknown file type"),
                         ("a.jsonl:abc", "'abc' is not a number"), ("a.jsonl:max_rows=1.5", "not a whole number"),
                         ("a.jsonl:0.5:max_rows=3", "a weight or max_rows, not both"),
                         ("a.jsonl:fmt=alpaca", "unknown option 'fmt'"), ("a.jsonl,,b.jsonl", "empty dataset entry"),
                         ("a.jsonl:format=orca", "'orca' is not one of")]:
        with pytest.raises(DataError, match=message):
            prepare_data(opts(arg), tokenizer)


def _cached_hub_dataset(cache_dir, repo_id: str, rows: list[dict], tmp_path):
    """What ``datasets.load_dataset(repo_id)`` leaves in its cache after a download, made from a local parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets.packaged_modules.parquet.parquet import Parquet

    src = tmp_path / "hub.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src)
    namespace, name = repo_id.split("/")
    builder = Parquet(cache_dir=str(cache_dir), dataset_name=f"{namespace}___{name}", data_files={"train": str(src)},
                      config_name="default", config_id="default", hash="0123abcd")
    builder.download_and_prepare()
    folder = next(cache_dir.glob(f"{namespace}___{name}/default/*/0123abcd"))
    (folder / f"{namespace}___{name}-train.arrow").rename(folder / f"{name}-train.arrow")


def test_a_hub_id_is_served_from_the_local_cache_and_ends_in_one_line_when_absent(tmp_path, tokenizer, monkeypatch,
                                                                               capsys, tiny_llama):
    import datasets

    assert datasets.config.HF_HUB_OFFLINE  # tests never reach the network (conftest sets HF_HUB_OFFLINE=1)
    hf_cache = tmp_path / "hf-datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", hf_cache)
    rows = airoboros_rows(5)
    _cached_hub_dataset(hf_cache, "someone/tiny-airoboros", rows, tmp_path)
    local = prepare_data(opts(str(write_jsonl(tmp_path / "l.jsonl", rows))), tokenizer)
    hub = prepare_data(opts("someone/tiny-airoboros:split=train"), tokenizer)
    assert tokens(hub.train) == tokens(local.train)
    assert hub.train[0].source == "someone/tiny-airoboros:row 1" and hub.sources[0].kind == "hub"
    capsys.readouterr()
    assert main(["data", "check", "someone/absent", "--model_name_or_path", str(tiny_llama)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "someone/absent is not in the local Hugging Face cache" in err
    with pytest.raises(DataError, match="someone/tiny-airoboros: Unknown split \"test\""):
        prepare_data(opts("someone/tiny-airoboros:split=test"), tokenizer)
