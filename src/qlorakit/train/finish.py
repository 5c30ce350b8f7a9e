"""Finish: what a run leaves at its output_dir's root (adapter, tokenizer, config, prompt format, card), or, when a
signal stopped it, the line that says how to resume."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from .card import write_card
from ..config import TrainConfig, save_config
from ..data.formats import Message
from ..data.templates import render_text, stop_text
from . import checkpoint as ckpt
from . import processes
from ..model.lora import unwrap
from .distributed import adapter_state as gather_adapter, is_fsdp
from .fit import FitOutcome
from .loss_plot import plot_loss
from .progress import Metrics
from .setup import Run
from .validate import metric_text

log = logging.getLogger("qlorakit")

EXAMPLE = (Message("user", "{instruction}"), Message("assistant", "{response}"))


@dataclass
class RunResult:
    output_dir: Path
    steps: int
    final_loss: float | None
    stopped: str  # "finished", "early_stopping", "interrupted"
    best_step: int | None = None
    best_eval_loss: float | None = None


def finish(run: Run, outcome: FitOutcome) -> RunResult:
    """Write the run directory (rank 0), or after a signal say how to resume; leave the process group."""
    state, info, out = run.state, run.info, run.out
    result = RunResult(out, state.step, outcome.last_loss, outcome.stopped, state.best_step, state.best_eval_loss)
    if outcome.stopped == "interrupted":
        if info.is_main:
            log.warning("stopped by %s at step %d and saved %s; to continue, run the same command with "
                        "--resume_from_checkpoint latest", outcome.signal or "a signal to another process",
                        state.step, run.ckpt_dir / f"{ckpt.PREFIX}{state.step}")
        run.trackers.finish()
        processes.shutdown(info)
        return result
    adapter = gather_adapter(run.model) if is_fsdp(run.model) else None  # gathered by every rank
    if info.is_main:
        write_run_dir(run.cfg, run.model, run.tokenizer, out, state, outcome.stopped, adapter_state=adapter,
                      sources=run.sources)
        run.trackers.finish(out / "README.md")
    processes.barrier(info)
    processes.shutdown(info)
    return result


def prompt_format_record(cfg: TrainConfig, tokenizer) -> dict:
    return {"name": cfg.prompt_format, "example": render_text(EXAMPLE, cfg.prompt_format, tokenizer),
            "stop": stop_text(cfg.prompt_format, tokenizer), "bos": tokenizer.bos_token or ""}


def write_run_dir(cfg: TrainConfig, model, tokenizer, out: Path, state: ckpt.TrainState, stopped: str,
                  adapter_state: dict | None = None, sources: list | None = None) -> None:
    """``adapter_state``: the adapter gathered from the ranks where the model is sharded (FSDP); else None.
    ``sources``: the data's sources with the rows each gave (``PreparedData.sources``), for the model card."""
    peft_model = unwrap(model)
    if cfg.load_best_model_at_end and state.best_step is not None and state.best_step != state.step:  # else: in memory
        best = cfg.checkpoint_dir() / f"{ckpt.PREFIX}{state.best_step}"
        if best.is_dir():
            from peft.utils import set_peft_model_state_dict
            from safetensors.torch import load_file

            best_weights = load_file(best / "adapter_model.safetensors")
            if adapter_state is None:
                set_peft_model_state_dict(peft_model, best_weights)
            else:
                adapter_state = best_weights
            log.info("load_best_model_at_end: the adapter at the root is %s's (%s)", best.name,
                     metric_text(cfg.metric_for_best_model, state.best_metric))
        else:
            log.warning("load_best_model_at_end: %s was not saved (save_strategy %s); keeping the last adapter",
                        best.name, cfg.save_strategy)
    peft_model.save_pretrained(out, state_dict=adapter_state)
    tokenizer.save_pretrained(out)
    save_config(cfg, out / "qlorakit_config.yaml")
    fmt = prompt_format_record(cfg, tokenizer)
    (out / "prompt_format.json").write_text(json.dumps(fmt, indent=2))
    (out / "trainer_state.json").write_text(state.to_json())
    metrics = Metrics(out / "metrics.jsonl", resume_step=state.step).rows()
    plot_loss(metrics, out / "loss.png")
    base_path = peft_model.peft_config["default"].base_model_name_or_path
    write_card(cfg, out, base_path, metrics, state.best_step, stopped, fmt["example"], sources or [])
    log.info("run directory: %s (adapter, tokenizer, qlorakit_config.yaml, metrics.jsonl, README.md)", out)
    if state.best_step is not None:
        best_epoch = next(m["epoch"] for m in state.eval_history if m["step"] == state.best_step)
        log.info("best %s at step %d (epoch %.2f)", metric_text(cfg.metric_for_best_model, state.best_metric),
                 state.best_step, best_epoch)
