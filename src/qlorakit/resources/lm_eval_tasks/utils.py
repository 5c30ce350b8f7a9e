"""The data and scoring of qlorakit's offline lm-eval tasks (the YAML files beside this one name these functions
with ``!function utils.NAME``). Self-contained, so this folder also works with plain lm-eval:
``lm_eval --include_path PATH/TO/lm_eval_tasks --tasks qlorakit ...``. The files are read from the package, never
from a hub."""

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


def _normalize(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .")


def closed_context_scores(doc: dict, results: list[str]) -> dict[str, float]:
    """exact_match and contains of the greedy reply, as ``qlorakit eval --dataset`` scores answers."""
    reply, answer = _normalize(results[0]), _normalize(doc["answer"])
    return {"exact_match": float(reply == answer), "contains": float(answer in reply)}
