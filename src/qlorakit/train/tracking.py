"""Trackers that watch a run besides metrics.jsonl (``report_to``): TensorBoard, Weights & Biases, MLflow and
trackio, through accelerate's tracker classes (``accelerate.tracking``), on rank 0 only.

Each gets the resolved config when the run starts, every metrics row (step and eval rows) as metrics.jsonl gets it,
and the model card at the end (its text; MLflow keeps the file as an artifact). Where they write:

* tensorboard: ``OUTPUT_DIR/tensorboard/RUN_NAME/`` (event files);
* wandb: project ``$WANDB_PROJECT`` (else qlorakit), run RUN_NAME, its files under ``OUTPUT_DIR/wandb/``;
  ``WANDB_MODE=offline`` keeps it all on disk (``wandb sync`` uploads it later);
* mlflow: ``$MLFLOW_TRACKING_URI``, else the local store ``OUTPUT_DIR/mlruns``; experiment
  ``$MLFLOW_EXPERIMENT_NAME`` (else qlorakit), run RUN_NAME;
* trackio: the local store (``$TRACKIO_DIR``, else ``$HF_HOME/trackio``), project qlorakit, run RUN_NAME.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from ..compat import TRACKERS, report_to_names
from ..errors import UserError

log = logging.getLogger("qlorakit")

MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}
PROJECT = "qlorakit"


def installed(name: str) -> bool:
    return importlib.util.find_spec(MODULES[name]) is not None


def tracker_names(report_to: str) -> list[str]:
    """The trackers ``report_to`` asks for, in order: none, the ones named, or all = every one installed."""
    names = report_to_names(report_to)
    if "all" in names:
        return [n for n in TRACKERS if installed(n)]
    return list(dict.fromkeys(n for n in names if n != "none"))


def loggable(config: dict) -> dict:
    """The config as trackers take it: numbers, strings and yes/no as they are, anything else (the data lists) as
    JSON text."""
    import json

    return {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v) for k, v in config.items()}


def _make(name: str, run_name: str, out: Path):
    """accelerate's tracker for ``name``, not started."""
    from accelerate import tracking

    if name == "tensorboard":
        return tracking.TensorBoardTracker(run_name, out / "tensorboard")
    if name == "wandb":
        (out / "wandb").mkdir(parents=True, exist_ok=True)
        return tracking.WandBTracker(os.environ.get("WANDB_PROJECT") or PROJECT, name=run_name, dir=str(out))
    if name == "mlflow":
        import mlflow

        if not os.environ.get("MLFLOW_TRACKING_URI"):  # a local store in the run directory, no server needed
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks before using a folder store
            mlflow.set_tracking_uri((out / "mlruns").resolve().as_uri())
        return tracking.MLflowTracker(experiment_name=PROJECT, run_name=run_name)
    return tracking.TrackioTracker(PROJECT, name=run_name, auto_log_cpu=False)


class Trackers:
    """The run's trackers: ``log`` a metrics row, ``finish`` with the model card. Empty: every call does nothing."""

    def __init__(self, trackers: list | None = None):
        self.trackers = trackers or []

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def log(self, row: dict) -> None:
        values = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and v is not None}
        for t in self.trackers:
            t.log(values, step=row.get("step"))

    def finish(self, card: Path | None = None) -> None:
        """Hand each tracker the model card (when the run wrote one), then close it; later calls do nothing."""
        trackers, self.trackers = self.trackers, []
        for t in trackers:
            if card is not None and card.is_file():
                if t.name == "mlflow":
                    t.log_artifact(str(card))
                else:
                    t.log({"model_card": card.read_text(encoding="utf-8")})
            t.finish()


def require_trackers(report_to: str) -> list[str]:
    """The trackers ``report_to`` names; one that is not installed is a one-line error (checked before the model
    loads)."""
    names = tracker_names(report_to)
    missing = [n for n in names if not installed(n)]
    if missing:
        raise UserError(f"report_to: {', '.join(missing)} is not installed; pip install "
                        f"'qlorakit[{','.join(missing)}]', or leave it out of report_to")
    return names


def start_trackers(cfg, out: Path, is_main: bool) -> Trackers:
    """The trackers of ``cfg.report_to``, started with the resolved config (rank 0; elsewhere none)."""
    names = require_trackers(cfg.report_to) if is_main else []
    run_name = cfg.run_name or Path(cfg.output_dir).resolve().name
    if names:
        from accelerate import PartialState

        PartialState()  # accelerate's trackers log through its logger, which needs its process state (it finds ours)
    started = Trackers()
    for name in names:
        try:
            tracker = _make(name, run_name, out)
            tracker.main_process_only = False  # only rank 0 gets here; accelerate need not ask its process state
            tracker.start()
            tracker.store_init_configuration(loggable(cfg.to_dict()))
        except Exception as e:  # a tracker's own setup (login, server, store): one line, and the others closed
            started.finish()
            raise UserError(f"report_to: {name} did not start ({type(e).__name__}: {str(e).splitlines()[0]})") \
                from None
        started.trackers.append(tracker)
        log.info("report_to: %s, run %s", name, run_name)
    return started
