"""``qlorakit eval RUN_DIR --tasks ...``: EleutherAI's lm-evaluation-harness (``lm_eval.simple_evaluate``) on the
run's tuned model: the quantized base the run was trained on with its adapter, in the run's precision. With
``--compare``, the base (the same weights with the adapter off) and other runs are scored on the same tasks.

Tasks: lm-eval's own names (``mmlu``, ``hellaswag``, a group or a tag, ``mmlu_*`` patterns) and paths of task YAML
files in lm-eval's format; qlorakit's offline tasks (``resources/lm_eval_tasks``: ``qlorakit``,
``qlorakit_mmlu_sample``, ``qlorakit_closed_context``) are known by name. Hub datasets are read from the local
datasets cache only: the offline flags are set while tasks load, and a dataset that is not cached is one line.

Prompts: as lm-eval renders them (no chat template) unless ``--apply_chat_template``: then every model scored,
the base included, sees them in RUN_DIR's prompt format (its ``chat_template``), so the sides differ only in
their weights."""

from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..resources import LM_EVAL_TASKS

LM_EVAL_PIN = "lm-eval==0.4.13"


@dataclass
class HarnessSettings:
    tasks: list[str]  # names, patterns or YAML paths, as given
    num_fewshot: int | None = None  # None: each task's own
    limit: float | None = None  # examples per task; below 1: a share of them
    batch_size: int = 8
    apply_chat_template: bool = False
    log_samples: bool = False  # keep lm-eval's per-sample records (the tests compare log-likelihoods)
    verbose: bool = False


def require_lm_eval():
    """The lm_eval package, or a one-line error that says how to install it."""
    try:
        import lm_eval
    except ImportError:
        raise UserError(f"--tasks runs EleutherAI's lm-evaluation-harness, which is not installed here; install it "
                        f"with: pip install 'qlorakit[eval]' (or pip install {LM_EVAL_PIN})") from None
    return lm_eval


@contextlib.contextmanager
def offline_and_quiet(verbose: bool):
    """Hub datasets from the local cache only (the variables, and the flags datasets and huggingface_hub read when
    imported), and lm-eval's log lines off unless ``verbose``; everything restored after."""
    import datasets.config
    import huggingface_hub.constants as hub

    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    saved = (datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE, hub.HF_HUB_OFFLINE)
    log = logging.getLogger("lm_eval")
    level = log.level
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = hub.HF_HUB_OFFLINE = True
    log.setLevel(logging.INFO if verbose else logging.ERROR)
    try:
        yield
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE, hub.HF_HUB_OFFLINE = saved
        log.setLevel(level)


def _is_yaml(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml"))


def task_manager(specs: list[str]):
    """lm-eval's TaskManager over qlorakit's offline tasks and the folders of the YAML files given (so a file can
    include its siblings); and over lm-eval's own tasks where a spec is none of those. Indexing lm-eval's 14,000
    task files takes about half a minute on a 2-core CPU, so the shipped tasks alone skip it."""
    from lm_eval.tasks import TaskManager

    folders = [str(LM_EVAL_TASKS)] + list(dict.fromkeys(str(Path(s).resolve().parent) for s in specs if _is_yaml(s)))
    own = TaskManager(include_path=folders, include_defaults=False)
    if all(_is_yaml(s) or s in own.all_tasks for s in specs):
        return own
    return TaskManager(include_path=folders)


def resolve_tasks(specs: list[str], manager) -> list[str]:
    """The specs lm-eval is given: names it knows, patterns expanded, YAML files that exist (as absolute paths).
    Every spec that is none of these is named in one line, with lm-eval's closest names."""
    import difflib

    known = manager.all_tasks
    out, problems = [], []
    for spec in specs:
        if _is_yaml(spec):
            if not Path(spec).is_file():
                problems.append(f"{spec} is not a file")
            out.append(str(Path(spec).resolve()))
        elif spec in known:
            out.append(spec)
        elif any(c in spec for c in "*?["):
            matched = manager.match_tasks([spec])
            out += matched
            if not matched:
                problems.append(f"no task matches {spec!r}")
        else:
            close = difflib.get_close_matches(spec, known, n=4, cutoff=0.6)
            problems.append(f"unknown task {spec!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    if problems:
        raise UserError("--tasks: " + "; ".join(problems) + f". lm-eval knows {len(known)} tasks, groups and tags "
                        "(lm_eval ls tasks lists them); a task YAML file's path works too")
    return list(dict.fromkeys(out))


NOT_CACHED = re.compile(r"offline|couldn't reach|could not reach|not (?:be )?found|connection|no such file",
                        re.IGNORECASE)


def load_tasks(specs: list[str], manager) -> None:
    """Load each task as lm-eval will (its data included), so a dataset missing from the cache or a broken YAML file
    is one line naming the task, before any model is loaded."""
    for spec in specs:
        try:
            manager.load([spec])
        except Exception as e:  # lm-eval and datasets raise many kinds; each becomes one line naming the task
            raise UserError(task_load_problem(spec, e)) from None


def task_load_problem(spec: str, error: Exception) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    named = re.search(r"['\"]([\w.-]+/[\w.-]+)['\"]", text)
    if NOT_CACHED.search(text) or isinstance(error, (ConnectionError, FileNotFoundError)):
        data = f"its dataset {named.group(1)}" if named else f"its dataset ({text[:200]})"
        return (f"--tasks {spec}: {data} is not in the local datasets cache, and qlorakit eval reads hub data only "
                f"from there; cache it once where the hub is reachable: lm_eval run --model dummy --tasks {spec} "
                "--limit 1")
    return f"--tasks {spec}: lm-eval could not load it: {type(error).__name__}: {text[:300]}"


def harness_lm(model, tokenizer, batch_size: int, use_bf16: bool):
    """lm-eval's HFLM around an already built model (a peft model on its quantized base): the run's precision
    (bf16 autocast where the run trained in bf16, as training did), a fixed batch size."""
    import torch
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                mixed_precision_dtype=torch.bfloat16 if use_bf16 else None)


def evaluate(lm, tasks: list[str], manager, s: HarnessSettings) -> dict:
    """``lm_eval.simple_evaluate`` of one model; its result dict (results, n-shot, n-samples, samples ...)."""
    from lm_eval import simple_evaluate

    return simple_evaluate(model=lm, tasks=tasks, num_fewshot=s.num_fewshot, limit=s.limit,
                           batch_size=s.batch_size, task_manager=manager, log_samples=s.log_samples,
                           apply_chat_template=s.apply_chat_template, fewshot_as_multiturn=s.apply_chat_template,
                           bootstrap_iters=1000)


def metric_rows(out: dict) -> dict[str, dict[str, float]]:
    """``{task: {metric: value, metric_stderr: value}}`` of one lm-eval result, the filter named where it is not
    lm-eval's default ('none'); groups without an aggregate metric give nothing."""
    rows: dict[str, dict[str, float]] = {}
    for task, metrics in out["results"].items():
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if not filt or name.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            label = name if filt == "none" else f"{name} ({filt})"
            stderr = metrics.get(f"{name}_stderr,{filt}")
            rows.setdefault(task, {})[label] = float(value)
            if isinstance(stderr, (int, float)):
                rows[task][f"{label}_stderr"] = float(stderr)
    return rows
