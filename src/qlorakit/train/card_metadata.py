"""The model card's metadata, written by ``huggingface_hub``'s ``ModelCardData``: the schema the hub reads (licence,
base model, datasets, tags) and a ``model-index`` with the run's evaluation results, which the hub's evaluation
widgets and leaderboards read.

Results come as one ``{metric: value}`` mapping per dataset (``Scores``), from three places: the evaluation rows of
``metrics.jsonl`` (eval loss, perplexity, the generation metrics: every numeric ``eval_*`` key but counts and times),
qlora's MMLU accuracy, and files in the run directory written by other commands: ``eval_results.json``
(``{DATASET: {METRIC: VALUE}}``, qlorakit's own layout) and ``lm_eval_results.json`` (lm-eval's ``--output_path``
layout: ``{"results": {TASK: {"acc,none": 0.5, "acc_stderr,none": 0.01, ...}}}``)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

Scores = dict[str, dict[str, float]]  # dataset name -> {metric name: value}

TASK_TYPE = "text-generation"
NOT_SCORES = {"eval_tokens", "eval_examples", "eval_rows", "eval_seconds", "eval_runtime", "eval_samples_per_second",
              "eval_steps_per_second", "eval_tokens_per_second",
              "eval_answered"}  # counts and times, not how good the model is
EVAL_RESULTS_FILE = "eval_results.json"
LM_EVAL_FILE = "lm_eval_results.json"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def adapter_eval_row(metrics: list[dict], best_step: int | None, load_best: bool) -> dict | None:
    """The evaluation row of the adapter at the run directory's root: the best one where the run loaded it back
    (load_best_model_at_end), else the last."""
    evals = [m for m in metrics if "eval_loss" in m]
    if load_best and best_step is not None:
        evals = [m for m in evals if m["step"] == best_step] or evals
    return evals[-1] if evals else None


def scores_of_row(row: dict) -> dict[str, float]:
    """The numeric ``eval_*`` values of one evaluation row (loss, perplexity, generation metrics)."""
    return {k: v for k, v in ((k, _number(v)) for k, v in row.items())
            if k.startswith("eval_") and k not in NOT_SCORES and v is not None}


def mmlu_scores(metrics: list[dict]) -> Scores:
    """qlora's MMLU accuracy, the last of each split the run scored."""
    out: Scores = {}
    for m in metrics:
        for k, v in m.items():
            if k.startswith("mmlu_") and k.endswith("_accuracy") and _number(v) is not None:
                out[f"MMLU ({k.split('_')[1]} split)"] = {"accuracy": float(v)}
    return out


def lm_eval_scores(data: dict) -> Scores:
    """lm-eval's results (``{"results": {task: {"acc,none": ...}}}``) as scores: each task's metrics without their
    filter suffix, standard errors left out."""
    out: Scores = {}
    for task, values in (data.get("results") or {}).items():
        if not isinstance(values, dict):
            continue
        kept = {k.split(",")[0]: float(v) for k, v in values.items()
                if "stderr" not in k and k != "alias" and _number(v) is not None}
        if kept:
            out[str(task)] = kept
    return out


def run_dir_scores(out: Path) -> Scores:
    """Scores other commands left in the run directory (module docstring); a file that is not as described is
    skipped, never fatal: the card is written at the end of a run that succeeded."""
    found: Scores = {}
    for name, read in ((EVAL_RESULTS_FILE, lambda d: d), (LM_EVAL_FILE, lm_eval_scores)):
        path = out / name
        try:
            data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except (OSError, ValueError):
            continue
        for dataset, values in (read(data) if isinstance(data, dict) else {}).items():
            if isinstance(values, dict):
                kept = {str(k): float(v) for k, v in values.items() if _number(v) is not None}
                if kept:
                    found.setdefault(str(dataset), {}).update(kept)
    return found


def eval_results(scores: Scores) -> list:
    """``huggingface_hub.EvalResult`` entries, one per metric of each dataset (task: text generation). A dataset's
    type is its hub id where its name is one, else its name."""
    from huggingface_hub import EvalResult

    return [EvalResult(task_type=TASK_TYPE, dataset_type=name if HUB_ID.match(name) else re.sub(r"\W+", "-", name)
                       .strip("-").lower(), dataset_name=name, metric_type=metric, metric_value=value)
            for name, values in scores.items() for metric, value in values.items()]


def card_data(*, license: str, base_model: str | None, datasets: list[str], tags: list[str], model_name: str,
              scores: Scores):
    """The card's metadata as the hub reads it; ``model-index`` only where the run has scores."""
    from huggingface_hub import ModelCardData

    results = eval_results(scores)
    return ModelCardData(license=license, base_model=base_model, datasets=datasets or None, library_name="peft",
                         pipeline_tag=TASK_TYPE, tags=tags, model_name=model_name if results else None,
                         eval_results=results or None)


FRONT_ORDER = ["license", "base_model", "datasets", "library_name", "pipeline_tag", "tags"]


def front_matter(data) -> str:
    """The YAML block of the card (licence first, as before; model-index last)."""
    return "---\n" + data.to_yaml(original_order=FRONT_ORDER) + "\n---"
