"""qlorakit eval --tasks: lm-evaluation-harness on a run, its base and other runs, with qlorakit's offline tasks."""

from __future__ import annotations

import json
import os
import shutil
import socket

import pytest
from safetensors.torch import load_file, save_file

from qlorakit.cli import main

pytest.importorskip("lm_eval")

LIMIT = "4"  # examples per task: seconds on the tiny run


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model's matrices are too small to share between threads: on a busy 2-core machine each op then
    waits for a second thread (greedy replies were 14 times slower with 2 threads than with 1)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def fresh_copy(run_dir, dest):
    """A copy of the run whose adapter is fresh: every lora_B zero, so the adapter adds exactly nothing."""
    shutil.copytree(run_dir, dest)
    weights = load_file(dest / "adapter_model.safetensors")
    assert any(k for k in weights if "lora_B" in k)
    save_file({k: v.zero_() if "lora_B" in k else v for k, v in weights.items()}, dest / "adapter_model.safetensors")
    return dest


def per_sample(out: dict, task: str) -> list:
    """lm-eval's raw answer per example of ``task``: (log-likelihood, is-greedy) per choice, or the reply."""
    return [s["resps"] for s in sorted(out["samples"][task], key=lambda s: s["doc_id"])]


def test_a_fresh_adapter_scores_exactly_as_the_base(run_dir, tmp_path):
    """Base (the run's model with the adapter off) and a B = 0 adapter give the same log-likelihood for every
    choice of every question, bit for bit, and the same replies; the trained adapter (the broken twin of 'adapter
    off') does not."""
    from qlorakit.evaluate.harness import HarnessSettings
    from qlorakit.evaluate.tasks_command import score

    fresh = fresh_copy(run_dir, tmp_path / "fresh")
    s = HarnessSettings(tasks=["qlorakit"], limit=4, batch_size=3, log_samples=True)
    outs, about = score(run_dir, s, compare=[fresh])
    assert list(outs) == ["base", str(run_dir), str(fresh)]
    base, run, zero = (outs[k] for k in outs)
    mc = "qlorakit_mmlu_sample"
    assert len(per_sample(base, mc)) == 4 and all(len(r) == 4 for r in per_sample(base, mc))  # 4 choices each
    assert per_sample(zero, mc) == per_sample(base, mc)
    assert per_sample(zero, "qlorakit_closed_context") == per_sample(base, "qlorakit_closed_context")
    assert zero["results"] == base["results"]
    assert per_sample(run, mc) != per_sample(base, mc)
    assert about["precision"] == "float32" and about["apply_chat_template"] is False


def test_compare_lists_base_and_each_run_and_the_card_gets_the_table(run_dir, tmp_path, capsys, monkeypatch):
    """The shipped task runs with no network at all; the table, RUN_DIR/lm_eval_results.json and the card's section
    have a column for the base and for each run, with the same numbers; a second eval replaces the section."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    fresh = fresh_copy(run_dir, tmp_path / "fresh")

    def no_network(*a, **k):
        raise OSError("qlorakit eval used the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    args = ["eval", str(run), "--tasks", "qlorakit_mmlu_sample", "--limit", LIMIT, "--batch_size", "2"]
    assert main([*args, "--compare", str(fresh), "--output", str(tmp_path / "copy.json")]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["task", "metric", "base", str(run), str(fresh)]
    row = next(ln for ln in printed if ln.startswith("qlorakit_mmlu_sample"))
    rep = json.loads((run / "lm_eval_results.json").read_text())
    assert rep == json.loads((tmp_path / "copy.json").read_text())
    assert list(rep["models"]) == ["base", str(run), str(fresh)]
    accs = [rep["models"][m]["results"]["qlorakit_mmlu_sample"]["acc"] for m in rep["models"]]
    assert all(a * 4 == int(a * 4) for a in accs)  # a share of the 4 questions
    assert accs[0] == accs[2]  # the fresh adapter is the base
    assert rep["models"]["base"]["n_samples"] == {"qlorakit_mmlu_sample": 4}
    assert [float(x) for x in row.split()[2::3]] == pytest.approx(accs, abs=5e-5)  # value ± stderr per model

    card = (run / "README.md").read_text()
    assert card.count("## lm-eval results") == 1 and card.index("## lm-eval results") < card.index("## How to use")
    table = [ln for ln in card.splitlines() if ln.startswith("| qlorakit_mmlu_sample | acc |")]
    assert len(table) == 1 and [float(c.split(" ± ")[0]) for c in table[0].split("|")[3:-1]] == \
        pytest.approx(accs, abs=5e-5)
    assert main(args) == 0  # without --compare: the run alone, and the card's section is replaced
    card = (run / "README.md").read_text()
    assert card.count("## lm-eval results") == 1 and f"| `{run}` |" in card and "| base |" not in card


def test_apply_chat_template_renders_every_model_in_the_runs_format(run_dir, tmp_path):
    """With --apply_chat_template, base and run see the same prompt, in the run's format; without it, lm-eval's
    raw prompt (no format)."""
    from qlorakit.data.templates import PROMPT_FORMATS
    from qlorakit.evaluate.harness import HarnessSettings
    from qlorakit.evaluate.tasks_command import score
    from qlorakit.runs import load_run

    fmt = PROMPT_FORMATS[load_run(run_dir)[2].prompt_format]
    user_prefix = fmt.user.split("{content}")[0].strip()
    assert user_prefix

    def contexts(template: bool) -> dict[str, list[str]]:
        s = HarnessSettings(tasks=["qlorakit_mmlu_sample"], limit=2, batch_size=2, log_samples=True,
                            apply_chat_template=template)
        outs, _ = score(run_dir, s, compare=[])
        return {k: [a[0][0] for sample in out["samples"]["qlorakit_mmlu_sample"] for a in [sample["arguments"]]]
                for k, out in outs.items()}

    shown = contexts(True)
    assert shown["base"] == shown[str(run_dir)]
    assert all(user_prefix in c and "Answer:" in c for c in shown["base"])
    raw = contexts(False)
    assert all(user_prefix not in c and c.startswith("The following are multiple choice") for c in raw["base"])


def test_the_shipped_tasks_are_the_packaged_files():
    """All rows load through lm-eval from the package (45 + 5 MMLU-layout questions, 40 closed-context ones)."""
    from qlorakit.evaluate.harness import offline_and_quiet, task_manager
    from qlorakit.resources import HELDOUT_CLOSED_CONTEXT

    with offline_and_quiet(False):
        tasks = task_manager(["qlorakit"]).load(["qlorakit"])["tasks"]
    mc, cc = tasks["qlorakit_mmlu_sample"], tasks["qlorakit_closed_context"]
    assert len(mc.test_docs()) == 45 and len(mc.fewshot_docs()) == 5
    assert all(d["answer"] in range(4) and len(d["choices"]) == 4 for d in mc.test_docs())
    assert [d["answer"] for d in cc.test_docs()] == \
        [json.loads(ln)["answer"] for ln in HELDOUT_CLOSED_CONTEXT.read_text().splitlines()]


def test_closed_context_scores_as_eval_dataset_does():
    """The task scores a reply as answer_scores (qlorakit eval --dataset) and training's evaluation do, by
    qlorakit.metrics: SQuAD's normalization (articles and punctuation dropped: a case the task's old copy, which
    only folded case and spaces, scored 0), token F1 and ROUGE-L as well."""
    import importlib.util

    from qlorakit.evaluate.command import answer_scores
    from qlorakit.resources import LM_EVAL_TASKS

    spec = importlib.util.spec_from_file_location("qlorakit_task_utils", LM_EVAL_TASKS / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    for reply, ref in [("The answer is 42.", "42"), ("42.", "42"), ("no", "yes"), (" PARIS ", "paris"),
                       ("Rutheth  Welira", "Rutheth Welira"), ("The Nile", "Nile"), ("Nile, the river", "the Nile")]:
        assert utils.closed_context_scores({"answer": ref}, [reply]) == answer_scores([reply], [ref]), (reply, ref)
    assert utils.closed_context_scores({"answer": "Nile"}, ["The Nile"])["exact_match"] == 1.0
    got = utils.closed_context_scores({"answer": "the Nile"}, ["Nile, the river"])
    assert got["exact_match"] == 0.0 and got["contains"] == 1.0 and 0 < got["token_f1"] < 1 and 0 < got["rouge_l"] < 1
    import yaml

    listed = [m["metric"] for m in yaml.safe_load(
        (LM_EVAL_TASKS / "qlorakit_closed_context.yaml").read_text().replace("!function", ""))["metric_list"]]
    assert listed == ["exact_match", "token_f1", "rouge_l", "contains"]  # lm-eval aggregates what the scorer gives


def test_mistakes_are_one_line(run_dir, tmp_path, capsys, monkeypatch):
    from lm_eval.tasks import TaskManager

    from qlorakit.errors import UserError
    from qlorakit.evaluate.harness import resolve_tasks
    from qlorakit.resources import LM_EVAL_TASKS

    own = TaskManager(include_path=str(LM_EVAL_TASKS), include_defaults=False)
    with pytest.raises(UserError, match=r"unknown task 'qlorakit_mmlu_sampel' \(did you mean qlorakit_mmlu_sample"):
        resolve_tasks(["qlorakit_mmlu_sampel"], own)
    cases = [
        (["--tasks", str(tmp_path / "nosuch.yaml")], "nosuch.yaml is not a file"),
        (["--dataset", "x.jsonl", "--compare"], "--compare go with --tasks"),
        (["--tasks", "qlorakit", "--mmlu", "m.jsonl"], "not both"),
        ([], "give --tasks"),
    ]
    for args, want in cases:
        assert main(["eval", str(run_dir), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert want in err and "\n" not in err and "Traceback" not in err
    monkeypatch.setitem(__import__("sys").modules, "lm_eval", None)  # lm-eval not installed
    assert main(["eval", str(run_dir), "--tasks", "qlorakit"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'qlorakit[eval]'" in err and "\n" not in err


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("QLORAKIT_RUN_SLOW") != "1",
                    reason="indexes lm-eval's 14,000 task files (about 40 s on 2 cores); set QLORAKIT_RUN_SLOW=1")
def test_builtin_tasks_unknown_or_not_cached_are_one_line(run_dir, capsys):
    assert main(["eval", str(run_dir), "--tasks", "mmlu_anatomyy"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown task 'mmlu_anatomyy' (did you mean mmlu_anatomy" in err and "\n" not in err
    assert main(["eval", str(run_dir), "--tasks", "mmlu_anatomy"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cais/mmlu is not in the local datasets cache" in err and "\n" not in err
