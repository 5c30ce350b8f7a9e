"""``qlorakit data check FILE``: row count, token-length percentiles, rows over the limit, trained-token share, and
the rendered example with « » around exactly the trained tokens."""

from __future__ import annotations

import re

import pytest

from helpers import write_jsonl
from qlorakit.cli import main
from qlorakit.data.formats import read_jsonl
from qlorakit.data.templates import render_text
from qlorakit.data.tokenize import tokenize_all, tokenize_conversation


@pytest.fixture(scope="module")
def tok(tiny_llama):
    from qlorakit.model.load import load_tokenizer

    return load_tokenizer(str(tiny_llama))


def check(capsys, path, model, *extra) -> str:
    assert main(["data", "check", str(path), "--model_name_or_path", str(model), *extra]) == 0
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err
    return cap.out


def test_data_check_reports_lengths_limit_share_and_marked_example(tiny_llama, tok, tmp_path, capsys):
    rows = [{"instruction": "Say yes.", "response": "Yes indeed."},
            {"instruction": "Name a river.", "response": "The Nile is one of them."},
            {"instruction": "Count.", "response": "one two three four five six seven"},
            {"instruction": "Describe the long river " + "again " * 60, "response": "It is long."},
            {"instruction": "Why?", "response": "Because " + "it rains and " * 12 + "so on."}]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    out = check(capsys, path, tiny_llama, "--model_max_len", "64")

    convs = read_jsonl(path)
    lengths = sorted(len(tokenize_conversation(c, tok, "airoboros")) for c in convs)
    over = [c.source for c in convs if len(tokenize_conversation(c, tok, "airoboros")) > 64]
    assert len(over) == 2  # the long prompt and the long reply
    kept, _ = tokenize_all(convs, tok, "airoboros", 64)
    trained, total = sum(e.n_trained for e in kept), sum(len(e) for e in kept)

    assert "rows: 5\n" in out
    m = re.search(r"tokens per row: p0=(\d+) p50=(\d+) p90=(\d+) p99=(\d+) p100=(\d+)", out)
    assert m, out
    assert [int(x) for x in m.groups()] == [lengths[0], lengths[2], lengths[4], lengths[4], lengths[4]]
    assert f"rows over model_max_len 64: 2 (policy 'truncate'; e.g. {over[0]}, {over[1]})" in out
    assert f"1 dropped: no trained token left (prompt fills model_max_len) (e.g. {convs[3].source})" in out
    assert f"trained tokens: {trained} of {total} ({100 * trained / total:.1f}%)" in out

    example = out.rstrip("\n").split("\n")[-1]
    rendered = render_text(convs[0].messages, "airoboros", tok)
    reply = "Yes indeed." + tok.eos_token
    assert rendered.endswith(reply)
    assert example == rendered[:-len(reply)] + "«" + reply + "»"


def test_data_check_marks_every_reply_of_a_conversation(tiny_llama, tmp_path, capsys):
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q one"},
             {"role": "assistant", "content": "A one"}, {"role": "user", "content": "Q two"},
             {"role": "assistant", "content": "A two"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": turns}])
    out = check(capsys, path, tiny_llama, "--prompt_format", "chatml")
    example = out.split("trained spans between « and »:\n", 1)[1]
    assert re.findall("«(.*?)»", example, flags=re.S) == ["A one<|im_end|>", "A two<|im_end|>"]
    assert example.count("«") == example.count("»") == 2
    assert "Q one" in example and "Be brief." in example


def test_data_check_on_a_parquet_file_and_on_a_mixture(tiny_llama, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from helpers import airoboros_rows

    rows = airoboros_rows(6)
    jsonl = write_jsonl(tmp_path / "a.jsonl", rows)
    table = tmp_path / "b.parquet"
    pq.write_table(pa.Table.from_pylist([{"instruction": r["instruction"], "input": "", "output": r["response"]}
                                         for r in rows[:4]]), table)
    one = check(capsys, jsonl, tiny_llama)
    out = check(capsys, table, tiny_llama)
    assert f"file: {table}\nrows: 4\n" in out and "after the length policy: 4 examples kept" in out
    assert f"example ({table}:row 1), trained spans" in out
    mixed = check(capsys, f"{jsonl}:0.5,{table}:format=alpaca:max_rows=2", tiny_llama)
    blocks = mixed.split("\n\n")
    assert blocks[0] == one.split("\n\n")[0]  # each source's block, as if checked alone
    assert blocks[1].startswith(f"file: {table}\nrows: 4\n")
    assert f"mixture: {jsonl} (airoboros): 3 of 6 rows, weight 0.5 -> 3 train, 0 eval examples" in mixed
    assert f"mixture: {table} (alpaca): 2 of 4 rows, max_rows 2 -> 2 train, 0 eval examples" in mixed


def test_data_check_on_a_yaml_mixture(tiny_llama, tmp_path, capsys, write_table, alpaca_rows):
    """A train config with a datasets list and no FILE: each source's block, the mixture's lines, its eval data;
    a FILE given with the config replaces its training data."""
    from helpers import airoboros_rows

    jsonl = write_table(tmp_path / "a.jsonl", airoboros_rows(6))
    table = write_table(tmp_path / "b.parquet", alpaca_rows(4))
    evals = write_table(tmp_path / "e.csv", airoboros_rows(3, seed=9))
    config = tmp_path / "run.yaml"
    config.write_text(f"model_max_len: 256\ndatasets:\n  - path: {jsonl}\n    weight: 0.5\n  - path: {table}\n"
                      f"    format: alpaca\n    max_rows: 2\neval_datasets:\n  - {evals}\n")
    out = check(capsys, config, tiny_llama)
    blocks = out.split("\n\n")
    assert [b.split("\n")[0] for b in blocks[:3]] == [f"file: {jsonl}", f"file: {table}", f"file: {evals}"]
    assert f"mixture: {jsonl} (airoboros): 3 of 6 rows, weight 0.5 -> 3 train, 0 eval examples" in out
    assert f"mixture: {table} (alpaca): 2 of 4 rows, max_rows 2 -> 2 train, 0 eval examples" in out
    assert f"eval: 3 rows from {evals}" in out
    alone = check(capsys, jsonl, tiny_llama, "--model_max_len", "256")
    replaced = check(capsys, jsonl, tiny_llama, str(config))  # the config's keys, FILE for its training data
    assert replaced.split("\n\n")[0] == alone.split("\n\n")[0]
    assert f"file: {table}" not in replaced and f"file: {evals}" in replaced
    # a training source gives no eval example when the eval data has sources of its own
    assert f"mixture: {jsonl} (airoboros): 6 of 6 rows, all rows -> 6 train, 0 eval examples" in replaced
    assert f"mixture: {evals} (airoboros): 3 of 3 rows, all rows -> 0 train, 3 eval examples" in replaced
