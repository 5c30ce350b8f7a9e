"""The training loop, readable top to bottom: setup (config -> rows -> examples -> model -> optimizer and state),
fit (the steps), finish (the run directory)."""

from __future__ import annotations

from ..config import TrainConfig
from .finish import RunResult, finish
from .fit import fit
from .setup import Hooks, setup
from .step import TrainingStopped

__all__ = ["train", "RunResult", "TrainingStopped", "Hooks"]


def train(cfg: TrainConfig, progress: bool = True, hooks: Hooks | None = None) -> RunResult:
    """Train the run ``cfg`` describes. ``hooks``: collaborators to replace (see ``setup.Hooks``)."""
    run = setup(cfg, progress, hooks)
    try:
        return finish(run, fit(run))
    finally:
        run.trackers.finish()  # after an error too (finish has closed them otherwise)
