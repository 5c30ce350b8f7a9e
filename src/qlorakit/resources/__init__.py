"""Files shipped inside the package: the default training sample, the demo's held-out rows, the planner's
model presets, the offline lm-eval tasks. One home, so a newcomer finds them and the package data list in
pyproject.toml names one folder."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
SAMPLE_DATASET = HERE / "sample_airoboros.jsonl"  # the embedded default job's training rows
HELDOUT_CLOSED_CONTEXT = HERE / "heldout_closed_context.jsonl"  # the demo's unseen closed-context questions
PLAN_PRESETS = HERE / "plans"  # config.json of models the planner knows by name
LM_EVAL_TASKS = HERE / "lm_eval_tasks"  # qlorakit's offline lm-eval tasks (YAML, data, their scoring)


def plan_preset(name: str) -> Path:
    return PLAN_PRESETS / f"{name}.json"
