"""The data and scoring of qlorakit's offline lm-eval tasks (the YAML files beside this one name these functions
with ``!function utils.NAME``). The folder also works with plain lm-eval where qlorakit is installed (its answers
are scored by qlorakit.metrics): ``lm_eval --include_path PATH/TO/lm_eval_tasks --tasks qlorakit ...``. The files
are read from the package, never from a hub."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def _json_splits(path: Path, splits: dict[str, str | None]):
    """A DatasetDict of the JSONL file's rows, one split per name: the rows whose ``split`` key is the value (None:
    all rows). Built in memory: nothing is written to the datasets cache."""
    import json

    import datasets

    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({name: datasets.Dataset.from_list([r for r in rows if key is None or r["split"] == key])
                                 for name, key in splits.items()})


def mmlu_sample(**_metadata):
    return _json_splits(HERE / "qlorakit_mmlu_sample.jsonl", {"dev": "dev", "test": "test"})


def closed_context(**_metadata):
    return _json_splits(HERE.parent / "heldout_closed_context.jsonl", {"test": None})


def closed_context_scores(doc: dict, results: list[str]) -> dict[str, float]:
    """exact_match, token_f1, rouge_l and contains of the greedy reply: qlorakit.metrics', as training's evaluation
    and ``qlorakit eval --dataset`` score answers."""
    from qlorakit.metrics import answer_metrics, contains

    reply, answer = results[0], doc["answer"]
    return answer_metrics([reply], [answer]) | {"contains": contains(reply, answer)}
