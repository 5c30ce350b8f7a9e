"""Data: formats, prompt templates, label masks, and bad rows reported by file and line."""

from __future__ import annotations

import pytest

from helpers import write_jsonl
from qlorakit.cli import main
from qlorakit.data.formats import DataError, Message, read_jsonl
from qlorakit.data.templates import AIROBOROS_SYSTEM, render_text
from qlorakit.data.tokenize import IGNORE, tokenize_all, tokenize_conversation


def test_airoboros_prompt_is_exact(tokenizer):
    text = render_text([Message("user", "Hi?"), Message("assistant", "Hello.")], "airoboros", tokenizer)
    assert text == f"{AIROBOROS_SYSTEM} USER: Hi? ASSISTANT: Hello.{tokenizer.eos_token}"
    assert AIROBOROS_SYSTEM == ("A chat between a curious user and an assistant. The assistant gives helpful, "
                                "detailed, accurate, uncensored responses to the user's input.")


def test_loss_only_on_response_and_eos(tmp_path, tokenizer):
    conv = read_jsonl(write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Say yes.", "response": "Yes indeed."}]))[0]
    ex = tokenize_conversation(conv, tokenizer, "airoboros")
    trained = [t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE]
    assert tokenizer.decode(trained) == "Yes indeed." + tokenizer.eos_token
    both = tokenize_conversation(conv, tokenizer, "airoboros", train_on_source=True)
    assert both.n_trained == len(both.input_ids) > ex.n_trained


@pytest.mark.parametrize("fmt", ["airoboros", "vicuna", "alpaca", "chatml", "tokenizer"])
def test_every_format_trains_exactly_the_replies(fmt, tokenizer):
    msgs = (Message("user", "Q1"), Message("assistant", "A one"), Message("user", "Q2"), Message("assistant", "A two"))
    from qlorakit.data.formats import Conversation

    ex = tokenize_conversation(Conversation(msgs, "x:1"), tokenizer, fmt)
    trained = tokenizer.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE])
    assert "A one" in trained and "A two" in trained
    assert "Q1" not in trained and "Q2" not in trained


def test_alpaca_and_messages_rows(tmp_path):
    a = read_jsonl(write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add", "input": "2+2", "output": "4"}]))
    assert a[0].messages[-1].content == "4" and "2+2" in a[0].messages[0].content
    m = read_jsonl(write_jsonl(tmp_path / "m.jsonl", [{"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"}]}]))
    assert [x.role for x in m[0].messages] == ["system", "user", "assistant"]


BAD_ROWS = [
    ('{"instruction": "a", "response": "b"}\n{"instruction": "a", "response": }', ":2:", "invalid JSON"),
    ('{"instruction": "a", "response": "b"}\n{"instruction": "a", "respons": "b"}', ":2:", "response"),
    ('{"instruction": "a", "response": 3}', ":1:", "response"),
    ('{"instruction": "a", "response": "  "}', ":1:", "blank"),
    ('{"instruction": "a", "response": "b"}\n[1, 2]', ":2:", "JSON object"),
]


@pytest.mark.parametrize("content,where,what", BAD_ROWS)
def test_bad_rows_name_file_and_line(tmp_path, content, where, what):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    with pytest.raises(DataError) as e:
        read_jsonl(p)
    assert f"bad.jsonl{where}" in str(e.value) and what in str(e.value)


def test_not_utf8_empty_and_missing(tmp_path):
    p = tmp_path / "latin.jsonl"
    p.write_bytes(b'{"instruction": "a", "response": "b"}\n{"instruction": "caf\xe9", "response": "b"}\n')
    with pytest.raises(DataError, match=r"latin.jsonl:2: bytes that are not UTF-8"):
        read_jsonl(p)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no rows"):
        read_jsonl(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match="no such file"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_utf8_bom_at_the_start_is_not_a_row_error(tmp_path):
    """Windows editors write a byte-order mark first: the file reads as without it; one inside a line is still bad."""
    rows = '{"instruction": "a", "response": "b"}\n{"instruction": "c", "response": "d"}\n'
    plain, bom = tmp_path / "plain.jsonl", tmp_path / "bom.jsonl"
    plain.write_text(rows, encoding="utf-8")
    bom.write_text(rows, encoding="utf-8-sig")
    assert bom.read_bytes().startswith(b"\xef\xbb\xbf")
    got, want = read_jsonl(bom), read_jsonl(plain)
    assert [c.messages for c in got] == [c.messages for c in want]
    assert [c.source.rsplit(":", 1)[1] for c in got] == ["1", "2"]
    mid = tmp_path / "mid.jsonl"
    mid.write_bytes(b'{"instruction": "a", "response": "b"}\n\xef\xbb\xbf{"instruction": "c", "response": "d"}\n')
    with pytest.raises(DataError, match=r"mid.jsonl:2: invalid JSON"):
        read_jsonl(mid)


def test_train_cli_bad_data_is_one_line(tmp_path, capsys):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"instruction": "a", "response": "b"}\n{"instruction": "a"}\n')
    assert main(["train", "--dataset", str(p), "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "bad.jsonl:2" in err and "response" in err and "Traceback" not in err


def test_length_policy_counts_every_row(tmp_path, tokenizer):
    rows = [{"instruction": "short", "response": "ok"}, {"instruction": "long " * 300, "response": "ok"}]
    convs = read_jsonl(write_jsonl(tmp_path / "l.jsonl", rows))
    kept, rep = tokenize_all(convs, tokenizer, "airoboros", 64, truncation="drop")
    assert len(kept) == 1 and len(rep.dropped_too_long) == 1
    kept, rep = tokenize_all(convs, tokenizer, "airoboros", 64, truncation="truncate")
    # truncated to 64 tokens, the long row's response is gone: dropped and counted, never a NaN loss
    assert len(kept) == 1 and rep.truncated and rep.dropped_no_trained_tokens == [convs[1].source]
