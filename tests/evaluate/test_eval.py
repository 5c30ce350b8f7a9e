"""qlorakit eval: the base and the tuned model side by side."""

from __future__ import annotations

import json

import pytest

from helpers import airoboros_rows, write_jsonl
from qlorakit.cli import main

KEYS = {"eval_loss", "eval_perplexity", "eval_tokens", "exact_match", "token_f1", "rouge_l", "contains",
        "mmlu_accuracy"}


def test_eval_reports_base_and_tuned(run_dir, tmp_path, capsys):
    """The losses are what train.validate.eval_loss gives for the file's examples with the adapter (tuned) and
    without it (base); the scores are shares; the JSON has the keys 'eval --help' documents, for both sides."""
    from qlorakit.data.formats import read_jsonl
    from qlorakit.data.tokenize import tokenize_all
    from qlorakit.runs import load_run
    from qlorakit.train.step import supports_packing
    from qlorakit.train.validate import eval_loss

    data = write_jsonl(tmp_path / "e.jsonl", airoboros_rows(4, seed=9))
    mmlu = write_jsonl(tmp_path / "m.jsonl", [{"question": "2+2?", "choices": ["3", "4", "5", "6"], "answer": "B"},
                                              {"question": "Sky?", "choices": ["red", "blue", "green", "x"],
                                               "answer": 1}])
    out = tmp_path / "r.json"
    assert main(["eval", str(run_dir), "--dataset", str(data), "--mmlu", str(mmlu), "--generate", "2",
                 "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert set(res) == {"base", "tuned"} and set(res["base"]) == set(res["tuned"]) == KEYS

    model, tok, cfg = load_run(run_dir)
    examples, _ = tokenize_all(read_jsonl(data, cfg.dataset_format), tok, cfg.prompt_format, cfg.model_max_len,
                               cfg.truncation)
    kw = dict(batch_size=cfg.per_device_eval_batch_size, pad_id=tok.pad_token_id, packing=supports_packing(model),
              device=next(model.parameters()).device, use_bf16=cfg.use_bf16())
    tuned = eval_loss(model, examples, **kw)
    with model.disable_adapter():
        base = eval_loss(model, examples, **kw)
    assert base["eval_loss"] != pytest.approx(tuned["eval_loss"], rel=1e-3)  # the adapter matters: sides can't swap
    for side, want in (("tuned", tuned), ("base", base)):
        got = res[side]
        assert got["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-6)
        assert got["eval_perplexity"] == pytest.approx(want["eval_perplexity"], rel=1e-6)
        assert got["eval_tokens"] == want["eval_tokens"] > 0
        assert all(0 <= got[k] <= 1 for k in ("exact_match", "contains", "mmlu_accuracy"))
        assert got["mmlu_accuracy"] * 2 == int(got["mmlu_accuracy"] * 2)  # a share of the 2 questions
        assert got["exact_match"] <= got["contains"]  # an exact match contains the reference
        row = next(ln.split() for ln in printed.splitlines() if ln.startswith("eval_loss "))
        assert float(row[1 if side == "base" else 2]) == pytest.approx(got["eval_loss"], abs=5e-5)


def test_the_output_keys_are_documented(capsys):
    assert main(["eval", "--help"]) == 0
    doc = capsys.readouterr().out
    assert all(k in doc for k in KEYS)


def test_answer_scores_are_the_training_metrics():
    from qlorakit.evaluate.command import answer_scores

    # "the" is an article to SQuAD's normalization (token F1: 1 of 3 tokens, 2/4) but a token to ROUGE-L (1 of 4)
    assert answer_scores(["The answer is 42."], ["42"]) == pytest.approx(
        {"exact_match": 0.0, "token_f1": 0.5, "rouge_l": 0.4, "contains": 1.0})
    assert answer_scores(["42."], ["42"]) == {"exact_match": 1.0, "token_f1": 1.0, "rouge_l": 1.0, "contains": 1.0}
    assert answer_scores(["no", "Paris"], ["yes", "paris"]) == {"exact_match": 0.5, "token_f1": 0.5, "rouge_l": 0.5,
                                                               "contains": 0.5}
