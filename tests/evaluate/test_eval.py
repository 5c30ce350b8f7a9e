"""qlorakit eval: the base and the tuned model side by side."""

from __future__ import annotations

import json


from helpers import airoboros_rows, write_jsonl
from qlorakit.cli import main

def test_eval_reports_base_and_tuned(run_dir, tmp_path, capsys):
    from qlorakit.evaluate.command import answer_scores

    data = write_jsonl(tmp_path / "e.jsonl", airoboros_rows(4, seed=9))
    mmlu = write_jsonl(tmp_path / "m.jsonl", [{"question": "2+2?", "choices": ["3", "4", "5", "6"], "answer": "B"},
                                              {"question": "Sky?", "choices": ["red", "blue", "green", "x"],
                                               "answer": 1}])
    out = tmp_path / "r.json"
    assert main(["eval", str(run_dir), "--dataset", str(data), "--mmlu", str(mmlu), "--generate", "2",
                 "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    for side in ("base", "tuned"):
        assert {"eval_loss", "eval_perplexity", "exact_match", "contains", "mmlu_accuracy"} <= set(res[side])
    assert res["tuned"]["eval_loss"] != res["base"]["eval_loss"]
    assert "tuned" in capsys.readouterr().out
    assert answer_scores(["The answer is 42."], ["42"]) == {"exact_match": 0.0, "contains": 1.0}
    assert answer_scores(["42."], ["42"]) == {"exact_match": 1.0, "contains": 1.0}
