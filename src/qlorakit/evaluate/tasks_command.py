"""``qlorakit eval RUN_DIR --tasks ... [--compare [RUN ...]]``: lm-eval scores of a run, beside its base and other
runs; a table (one row per task and metric), ``lm_eval_results.json`` in RUN_DIR and a section of its model card."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import UserError
from .harness import (HarnessSettings, evaluate, harness_lm, load_tasks, metric_rows, offline_and_quiet,
                      require_lm_eval, resolve_tasks, task_manager)

RESULTS_FILE = "lm_eval_results.json"
CARD_HEADING = "## lm-eval results"


def _labels(run_dir: Path, others: list[Path]) -> list[str]:
    """A column name per run: its path as given, made unique."""
    out: list[str] = []
    for p in [run_dir, *others]:
        name = str(p)
        out.append(name if name not in out and name != "base" else f"{name} ({len(out) + 1})")
    return out


def score(run_dir: Path, s: HarnessSettings, compare: list[Path] | None = None) -> tuple[dict[str, dict], dict]:
    """lm-eval's output per model, in column order: ``base`` (RUN_DIR's base with the adapter off) when ``compare``
    is a list, RUN_DIR, then each run of ``compare``; and what the report says about how they were scored."""
    from ..data.templates import chat_template
    from ..runs import load_run

    require_lm_eval()
    with offline_and_quiet(s.verbose):
        manager = task_manager(s.tasks)
        tasks = resolve_tasks(s.tasks, manager)
        load_tasks(tasks, manager)
        model, tok, cfg = load_run(run_dir)
        template = chat_template(cfg.prompt_format, tok) if s.apply_chat_template else None
        if template is not None:
            tok.chat_template = template  # RUN_DIR's format for every model scored: one rendering for all
        lm = harness_lm(model, tok, s.batch_size, cfg.use_bf16())
        outs: dict[str, dict] = {}
        labels = _labels(run_dir, compare or [])
        if compare is not None:
            with model.disable_adapter():
                outs["base"] = evaluate(lm, tasks, manager, s)
        outs[labels[0]] = evaluate(lm, tasks, manager, s)
        base_path = model.peft_config["default"].base_model_name_or_path
        del lm, model
        for label, other in zip(labels[1:], compare or []):
            m, t, _ = load_run(other)
            if m.peft_config["default"].base_model_name_or_path != base_path:
                print(f"qlorakit eval: note: {other} was trained on {m.peft_config['default'].base_model_name_or_path}"
                      f", not on {base_path} (the base column)", file=sys.stderr)
            if template is not None:
                t.chat_template = template
            outs[label] = evaluate(harness_lm(m, t, s.batch_size, cfg.use_bf16()), tasks, manager, s)
            del m
    import lm_eval

    about = {"lm_eval_version": lm_eval.__version__, "tasks": s.tasks, "num_fewshot": s.num_fewshot,
             "limit": s.limit, "batch_size": s.batch_size, "apply_chat_template": s.apply_chat_template,
             "prompt_format": cfg.prompt_format if s.apply_chat_template else None,
             "precision": "bf16" if cfg.use_bf16() else "float32", "base_model": base_path}
    return outs, about


def report(outs: dict[str, dict], about: dict) -> dict:
    """What ``lm_eval_results.json`` holds: how the models were scored, and per model its metrics per task, the
    few-shot count and the number of examples each task was scored on."""
    models = {label: {"results": metric_rows(out), "n_shot": dict(out.get("n-shot", {})),
                      "n_samples": {t: n.get("effective") for t, n in out.get("n-samples", {}).items()}}
              for label, out in outs.items()}
    return {**about, "models": models}


def table_rows(rep: dict) -> list[tuple[str, str, list[float | None], list[float | None]]]:
    """(task, metric, value per model, stderr per model), in the order lm-eval reported them."""
    models = list(rep["models"].values())
    keys = list(dict.fromkeys((task, metric) for m in models for task, metrics in m["results"].items()
                              for metric in metrics if not metric.endswith("_stderr")))
    return [(task, metric, [m["results"].get(task, {}).get(metric) for m in models],
             [m["results"].get(task, {}).get(f"{metric}_stderr") for m in models]) for task, metric in keys]


def cell(value: float | None, stderr: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")


def print_table(rep: dict) -> None:
    names = list(rep["models"])
    rows = [(t, m, [cell(v, e) for v, e in zip(vals, errs)]) for t, m, vals, errs in table_rows(rep)]
    tw = max([len("task")] + [len(t) for t, _, _ in rows])
    mw = max([len("metric")] + [len(m) for _, m, _ in rows])
    cw = [max([len(n)] + [len(c[i]) for _, _, c in rows]) for i, n in enumerate(names)]
    print(f"{'task':<{tw}}  {'metric':<{mw}}  " + "  ".join(f"{n:>{w}}" for n, w in zip(names, cw)))
    for t, m, cells in rows:
        print(f"{t:<{tw}}  {m:<{mw}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(cells, cw)))


def update_card(readme: Path, lines: list[str]) -> bool:
    """Put ``lines`` (a section under CARD_HEADING) into the card in place of an earlier one, else before
    '## How to use', else at the end; False where the folder has no card (a checkpoint-STEP folder)."""
    if not readme.is_file():
        return False
    text = readme.read_text(encoding="utf-8").split("\n")
    if CARD_HEADING in text:
        start = text.index(CARD_HEADING)
        end = next((i for i in range(start + 1, len(text)) if text[i].startswith("## ")), len(text))
        del text[start:end]
    else:
        start = next((i for i, ln in enumerate(text) if ln.startswith("## How to use")), len(text))
    text[start:start] = [*lines, ""]
    readme.write_text("\n".join(text), encoding="utf-8")
    return True


def tasks_main(o) -> int:
    """The --tasks form of ``qlorakit eval`` (``o``: its parsed options)."""
    from ..train.card import lm_eval_lines

    s = HarnessSettings(tasks=[t.strip() for t in o.tasks.split(",") if t.strip()], num_fewshot=o.num_fewshot,
                        limit=o.limit, batch_size=o.batch_size, apply_chat_template=o.apply_chat_template,
                        verbose=o.verbose)
    if not s.tasks:
        raise UserError("--tasks: no task named; give lm-eval task names or YAML files, comma-separated")
    outs, about = score(o.run_dir, s, [Path(p) for p in o.compare] if o.compare is not None else None)
    rep = report(outs, about)
    print_table(rep)
    text = json.dumps(rep, indent=2)
    written = [o.run_dir / RESULTS_FILE] + ([Path(o.output)] if o.output else [])
    for path in written:
        path.write_text(text + "\n", encoding="utf-8")
    if update_card(o.run_dir / "README.md", lm_eval_lines(rep)):
        written.append(o.run_dir / "README.md")
    print(f"qlorakit eval: results written to {', '.join(map(str, written))}", file=sys.stderr)
    return 0
