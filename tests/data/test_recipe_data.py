"""The task set of benchmarks/recipes.py: reproducible from its seeds, and as docs/recipes.md describes it (one
closed-context question in five unanswerable, one to three passages with distractors, disjoint held-out rows)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "make_recipe_data.py"
TRAIN = "benchmarks/data/recipes_train.jsonl"
EVAL = "benchmarks/data/recipes_eval.jsonl"
PAIRS = "benchmarks/data/recipes_pairs.jsonl"
ABSTAIN = "The text does not say."
BLOCK_RE = re.compile(r"BEGININPUT\nBEGINCONTEXT\n((?:[a-z]+: [^\n]+\n)+)ENDCONTEXT\n(.+?)\nENDINPUT\n", re.S)
CLOSED_RE = re.compile(r"\A(?:BEGININPUT\nBEGINCONTEXT\n(?:[a-z]+: [^\n]+\n)+ENDCONTEXT\n.+?\nENDINPUT\n){1,3}"
                       r"BEGININSTRUCTION\n[^\n]+ Cite your source\.\nENDINSTRUCTION\Z", re.S)
REFERENCE_RE = re.compile(r"\n\nReference\(s\):\nurl: (\S+)\ndate: (\d{4}-\d\d-\d\d)\Z")


def load(rel: str) -> list[dict]:
    return [json.loads(line) for line in (ROOT / rel).read_text(encoding="utf-8").splitlines()]


def blocks(instruction: str) -> list[tuple[dict, str]]:
    return [(dict(ln.split(": ", 1) for ln in meta.splitlines()), text) for meta, text in BLOCK_RE.findall(instruction)]


def script_module():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("make_recipe_data", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_regenerating_reproduces_the_files(tmp_path):
    subprocess.run([sys.executable, str(SCRIPT), "--out-root", str(tmp_path)], check=True, cwd=ROOT,
                   capture_output=True)
    for rel in (TRAIN, EVAL, PAIRS):
        assert (tmp_path / rel).read_bytes() == (ROOT / rel).read_bytes(), f"{rel} differs from a fresh run"


@pytest.mark.parametrize("rel,closed,plain", [(TRAIN, 80, 20), (EVAL, 35, 5)])
def test_mix_of_kinds(rel, closed, plain):
    """One closed-context question in five is unanswerable; passage counts 1, 2 and 3 each about a third."""
    rows = load(rel)
    cc = [r for r in rows if r["answerable"] is not None]
    assert (len(cc), len(rows) - len(cc)) == (closed, plain)
    assert sum(r["answerable"] is False for r in cc) == closed // 5
    for n in (1, 2, 3):
        assert abs(sum(r["passages"] == n for r in cc) - closed / 3) <= 1
    # the unanswerable ones come with and without distractors
    assert {r["passages"] for r in cc if r["answerable"] is False} == {1, 2, 3}
    assert len({r["instruction"] for r in rows}) == len(rows)


@pytest.mark.parametrize("rel", [TRAIN, EVAL])
def test_closed_context_rows(rel):
    """Layout; each passage its own url; answerable replies hold the answer and cite exactly the passage that
    states it; distractors state the same attribute with other values; unanswerable replies are the fixed phrase,
    cite nothing, and no passage holds the asked entity's value."""
    n_distracting = 0
    for row in (r for r in load(rel) if r["answerable"] is not None):
        assert CLOSED_RE.match(row["instruction"]), row["instruction"]
        bs = blocks(row["instruction"])
        assert len(bs) == row["passages"] == row["distractors"] + 1
        urls = [m["url"] for m, _ in bs]
        assert len(set(urls)) == len(urls) and all(u.startswith("https://www.example-") for u in urls)
        if row["answerable"]:
            ref = REFERENCE_RE.search(row["response"])
            assert ref and ref[1] == row["source"], row["response"]
            cited = [text for m, text in bs if m["url"] == row["source"]]
            assert len(cited) == 1 and row["answer"] in cited[0]
            assert row["answer"] in row["response"][:ref.start()]
            others = [text for m, text in bs if m["url"] != row["source"]]
            assert not any(row["answer"] in t for t in others), "a distractor holds the answer itself"
            n_distracting += bool(others)
        else:
            assert row["response"] == ABSTAIN and row["answer"] is None and row["source"] is None
            assert "http" not in row["response"]
    assert n_distracting > 0


@pytest.mark.parametrize("rel", [TRAIN, EVAL])
def test_distractors_state_the_asked_attribute_with_another_value(rel):
    """Each distractor passage states the asked attribute for its own entity, with a value that differs from the
    answer (and from the other distractors'); a row without distractors lists none."""
    n = 0
    for row in (r for r in load(rel) if r["answerable"] is not None):
        values, bs = row["distractor_answers"], blocks(row["instruction"])
        assert len(values) == row["distractors"] and len(set(values)) == len(values)
        assert row["answer"] not in values
        asked_texts = [t for m, t in bs if m["url"] == row["source"]]
        others = [t for m, t in bs if m["url"] != row["source"]]
        for v in values:
            stated = re.compile(rf"(?<![\w,.]){re.escape(v)}(?![\w,])")  # as a whole value: not "4" in "64"
            assert any(stated.search(t) for t in others), (v, others)
            assert not any(stated.search(t) for t in asked_texts), "the asked passage states a distractor's value"
        n += len(values)
    assert n >= 10


def test_heldout_disjoint_from_training():
    train_text = (ROOT / TRAIN).read_text(encoding="utf-8")
    held = load(EVAL)
    for row in held:
        if row["answerable"]:
            assert row["answer"] not in train_text and row["source"] not in train_text
    assert not {r["instruction"] for r in held} & {r["instruction"] for r in load(TRAIN)}
    with contextlib.redirect_stdout(io.StringIO()):
        names = script_module().build_all()["heldout_names"]
    low = train_text.lower()
    assert len(names) > 100 and not [n for n in names if n.lower() in low]


@pytest.mark.parametrize("rel", [TRAIN, EVAL])
def test_every_prefix_holds_each_kind_in_its_share(rel):
    """recipes.py --train-rows/--eval-rows/--quick take the first N rows: those hold each kind in about its share
    (a plain shuffle leaves a prefix of 8 without any unanswerable row about half the time)."""
    rows = load(rel)
    share = {k: sum(r["answerable"] is k for r in rows) / len(rows) for k in (True, False, None)}
    for n in range(8, len(rows) + 1):
        for k, s in share.items():
            assert abs(sum(r["answerable"] is k for r in rows[:n]) - s * n) <= 1, (n, k)


def test_each_pair_is_its_training_row_against_a_mistake_the_scorer_counts():
    """The preference pairs (SFT, then DPO: README): one per closed-context training row, chosen = that row's
    reference reply (the scorer's exact match 1), rejected = a reply the same scorer fails: an invented answer to an
    unanswerable question, a wrong value or url (a distractor's, one character off, or made up), or, on as many
    answerable questions as there are unanswerable ones, the abstention."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from recipe_score import score_rows

    rows = {r["instruction"]: r for r in load(TRAIN) if r["answerable"] is not None}
    pairs = load(PAIRS)
    assert [p["prompt"] for p in pairs] == list(rows) and all(set(p) == {"prompt", "chosen", "rejected"}
                                                              for p in pairs)
    asked = [rows[p["prompt"]] for p in pairs]
    assert [p["chosen"] for p in pairs] == [r["response"] for r in asked]
    assert score_rows(asked, [p["chosen"] for p in pairs])["exact_match"] == 1.0
    abstentions = 0
    for row, pair in zip(asked, pairs):
        wrong = score_rows([row], [pair["rejected"]])
        assert wrong["exact_match"] == 0.0, pair
        if row["answerable"] is False:
            assert wrong["invented_answer"] == 1.0 and REFERENCE_RE.search(pair["rejected"]), pair
        elif wrong["false_abstention"] == 1.0:  # the answer preferred over "The text does not say."
            abstentions += 1
        else:  # the same answer sentence with exactly one thing wrong: the value or the cited url
            assert (wrong["answer_match"], wrong["citation_match"]) in ((0.0, 1.0), (1.0, 0.0)), pair
    # as many pairs reject the abstention as choose it, so preferences do not teach abstaining everywhere
    assert abstentions == sum(r["answerable"] is False for r in asked) == 16
