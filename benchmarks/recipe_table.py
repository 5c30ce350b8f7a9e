"""The one table of benchmarks/recipes.py: each arm's runs (one per seed) reduced to mean and spread per metric.

A run is a dict as recipes.py records it: ``arm``, ``seed``, ``status`` ("ok" or "failed"), ``reason`` (why it
failed), ``metrics`` (``recipe_score.score_rows``), ``eval_loss``, ``seconds_per_step``, ``peak_rss_mib``.

Each cell is ``mean (min–max)`` over the arm's seeds that finished (one seed: the value alone); the ``seeds`` column
says how many finished of how many ran, and every failed seed is listed under the table with its reason. A failed
seed is never averaged in (as a zero or otherwise) and never dropped without a word.
"""

from __future__ import annotations

import statistics

from recipe_score import METRICS

# Columns after arm and seeds: (key, label, format). Keys of METRICS are read from a run's "metrics".
COLUMNS = [(k, label, ".3f") for k, (label, _) in METRICS.items()] + [
    ("eval_loss", "eval loss", ".3f"),
    ("seconds_per_step", "s/step", ".2f"),
    ("peak_rss_mib", "peak RSS MiB", ".0f"),
]


def summarize(values: list[float]) -> dict | None:
    """n, mean, sample standard deviation (None for one value), min and max; None for no values."""
    if not values:
        return None
    return {"n": len(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None, "min": min(values), "max": max(values)}


def value(run: dict, key: str) -> float | None:
    v = run.get("metrics", {}).get(key) if key in METRICS else run.get(key)
    return None if v is None else float(v)


def aggregate(runs: list[dict], arms: list[str]) -> dict:
    """Per arm (in ``arms`` order): its seeds, the failed ones with their reasons, and ``summarize`` of each column
    over the seeds that finished."""
    out = {}
    for arm in arms:
        mine = sorted((r for r in runs if r["arm"] == arm), key=lambda r: r["seed"])
        ok = [r for r in mine if r["status"] == "ok"]
        cols = {}
        for key, _, _ in COLUMNS:
            vals = [v for v in (value(r, key) for r in ok) if v is not None]
            cols[key] = summarize(vals)
        out[arm] = {"seeds": [r["seed"] for r in mine], "ok": [r["seed"] for r in ok],
                    "failed": [(r["seed"], r.get("reason", "")) for r in mine if r["status"] != "ok"],
                    "columns": cols}
    return out


def cell(s: dict | None, spec: str) -> str:
    if s is None:
        return "—"
    if s["n"] == 1:
        return format(s["mean"], spec)
    return f"{format(s['mean'], spec)} ({format(s['min'], spec)}–{format(s['max'], spec)})"


def seeds_cell(a: dict) -> str:
    text = f"{len(a['ok'])}/{len(a['seeds'])}"
    if a["failed"]:
        text += " (failed: " + ", ".join(str(s) for s, _ in a["failed"]) + ")"
    return text


def table(agg: dict, labels: dict[str, str] | None = None) -> str:
    """The markdown table of ``aggregate``'s result, and under it one line per failed seed."""
    labels = labels or {}
    head = ["arm", "seeds"] + [label for _, label, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * len(COLUMNS)]
    notes = []
    for arm, a in agg.items():
        cells = [labels.get(arm, arm), seeds_cell(a)] + [cell(a["columns"][k], spec) for k, _, spec in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
        notes += [f"- {labels.get(arm, arm)}, seed {s} failed: {reason}" for s, reason in a["failed"]]
    return "\n".join(lines + ([""] + notes if notes else []))


def seed_table(runs: list[dict], arms: list[str], labels: dict[str, str] | None = None,
               key: str = "exact_match") -> str:
    """Seed by seed, ``key`` of each arm (columns, ``arms[0]`` first), each later arm's cell with its difference
    from ``arms[0]``'s run of the same seed: what a mean and spread hide (a lever that wins on two seeds and loses
    on the third). A failed run reads ``failed``, one not run ``—``."""
    labels = labels or {}
    by = {(r["arm"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs if r["arm"] in arms})
    spec = next(s for k, _, s in COLUMNS if k == key)

    def get(arm, seed):
        r = by.get((arm, seed))
        return None if r is None or r["status"] != "ok" else value(r, key)

    lines = ["| seed | " + " | ".join(labels.get(a, a) for a in arms) + " |", "|---|" + "---:|" * len(arms)]
    for seed in seeds:
        base, cells = get(arms[0], seed), []
        for i, arm in enumerate(arms):
            v = get(arm, seed)
            text = ("failed" if (arm, seed) in by else "—") if v is None else format(v, spec)
            if i and v is not None and base is not None:
                text += f" ({v - base:+{spec}})"
            cells.append(text)
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
