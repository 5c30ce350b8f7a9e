"""Atomic checkpoints and exact resume.

A checkpoint is written whole under a temporary name, every file fsynced, then renamed to ``checkpoint-STEP``:
a kill at any instant leaves either the previous set of checkpoints or the new one, never a half-written folder
under a checkpoint name. Weights are safetensors; other state is loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import UserError
from ..config import TrainConfig, save_config

PREFIX = "checkpoint-"

# Changing any of these changes which examples a step sees or how an update is computed, so a run resumed with
# a different value would not be the run that was checkpointed. num_train_epochs and max_steps may change: they
# set where the run ends, which may not be before the checkpoint (check_total_steps).
RESUME_KEYS = ("model_name_or_path", "dataset", "datasets", "dataset_format", "prompt_format", "model_max_len",
               "truncation", "train_on_source", "group_by_length", "eval_dataset_size", "eval_dataset", "eval_datasets",
               "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
               "lr_scheduler_type", "warmup_ratio", "weight_decay", "max_grad_norm", "optim", "seed", "lora_r",
               "lora_alpha", "lora_dropout", "lora_modules", "bits", "quant_type", "double_quant",
               "data_seed", "source_max_len", "target_max_len", "max_train_samples", "adam_beta1", "adam_beta2",
               "adam_epsilon", "neftune_noise_alpha", "use_rslora", "loraplus_lr_ratio", "init_lora_weights",
               "use_dora", "prompt_loss_weight", "metric_for_best_model")


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message says which and what to do."""


@dataclass
class TrainState:
    """Where the run is. ``step_in_epoch`` counts optimizer steps already taken in ``epoch``."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    total_steps: int = 0
    world_size: int = 1
    nonfinite_in_a_row: int = 0
    skipped_steps: int = 0
    best_eval_loss: float | None = None  # the eval loss at best_step
    best_step: int | None = None
    best_metric: float | None = None  # metric_for_best_model's value at best_step (older checkpoints: best_eval_loss)
    evals_without_improvement: int = 0
    eval_history: list = field(default_factory=list)
    data: dict | None = None  # the data's fingerprint and sources (data_record); None in older checkpoints

    def advance(self, steps_in_epoch: int) -> None:
        """Count one optimizer step taken; the last of an epoch's ``steps_in_epoch`` steps starts the next epoch."""
        self.step += 1
        self.step_in_epoch += 1
        if self.step_in_epoch == steps_in_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for p in path.iterdir():
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# What torch's zip writer raises, as a RuntimeError without an errno, when a write fails (a full disk, an I/O error):
# '[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0', 'PytorchStreamWriter failed writing file
# data/0: file write failed', or its file stream's 'basic_ios::clear: iostream error'.
WRITE_FAILURES = ("inline_container.cc", "PytorchStreamWriter failed", "basic_ios::clear: iostream error")


def _write_failed(e: RuntimeError) -> bool:
    return any(m in str(e) for m in WRITE_FAILURES)


def _torch_save(obj, path: Path) -> None:
    """torch.save, with a failed write raised as the OSError it is (naming the file and the space left); any other
    RuntimeError goes through unchanged."""
    try:
        torch.save(obj, path)
    except RuntimeError as e:
        if not _write_failed(e):
            raise
        free = shutil.disk_usage(path.parent).free
        raise OSError(f"writing {path.name} failed with {free:,} bytes free on its disk (torch: "
                      f"{str(e).splitlines()[0]})") from e


def save_checkpoint(output_dir: Path, model, optimizer, scheduler, state: TrainState, cfg: TrainConfig,
                    adapter_state: dict | None = None, optimizer_state: dict | None = None,
                    rank_rng_states: list | None = None) -> Path:
    """Write ``checkpoint-{step}`` atomically and return its path.

    Under torchrun rank 0 writes it with the state the ranks gathered for it: ``optimizer_state`` (full tensors
    under FSDP) and ``rank_rng_states``, every rank's RNG (dropout differs per rank), rank r's in rng_state_{r}.pt.
    """
    final = output_dir / f"{PREFIX}{state.step}"
    tmp = output_dir / f".{PREFIX}{state.step}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp, state_dict=adapter_state)
        _torch_save(optimizer.state_dict() if optimizer_state is None else optimizer_state, tmp / "optimizer.pt")
        _torch_save(scheduler.state_dict(), tmp / "scheduler.pt")
        _torch_save(rng_state(), tmp / "rng_state.pt")
        for r, rng in enumerate(rank_rng_states or []):
            if r > 0:
                _torch_save(rng, tmp / f"rng_state_{r}.pt")
        save_config(cfg, tmp / "qlorakit_config.yaml")
        (tmp / "trainer_state.json").write_text(state.to_json())
        _fsync_tree(tmp)
        if final.exists():  # re-saving a step (after a resume): swap, then drop the old copy
            old = output_dir / f".{final.name}.old-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders never match)."""
    found = []
    for p in Path(output_dir).glob(f"{PREFIX}*"):
        m = re.fullmatch(rf"{PREFIX}(\d+)", p.name)
        if m and (p / "trainer_state.json").is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def prune_checkpoints(output_dir: Path, limit: int, keep: Path | None) -> list[Path]:
    """Delete the oldest checkpoints beyond ``limit``, never ``keep`` (the best) nor the newest (what a resume
    continues from), so limit 1 with a best that is not the newest keeps two. Returns what was deleted."""
    if limit <= 0:
        return []
    ckpts = list_checkpoints(output_dir)
    removable = [p for p in ckpts[:-1] if keep is None or p.resolve() != keep.resolve()]
    excess = len(ckpts) - limit
    gone = removable[:max(0, excess)]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def recover_partial_saves(output_dir: Path) -> None:
    """Tidy what a process killed inside ``save_checkpoint`` left: a temporary folder is deleted; the previous copy
    of a re-saved step, moved aside just before the swap, is put back if the new one never took its place."""
    for p in Path(output_dir).glob(f".{PREFIX}*"):
        m = re.fullmatch(rf"\.{PREFIX}(\d+)\.(tmp|old)-\d+", p.name)
        if not m or not p.is_dir():
            continue
        final = p.parent / f"{PREFIX}{m.group(1)}"
        if m.group(2) == "old" and not final.exists() and (p / "trainer_state.json").is_file():
            os.rename(p, final)
        else:
            shutil.rmtree(p, ignore_errors=True)


def resolve_resume(spec: str, output_dir: Path) -> Path:
    if spec == "latest":
        ckpts = list_checkpoints(output_dir)
        if not ckpts:
            raise CheckpointError(f"resume_from_checkpoint: no checkpoint in {output_dir}; "
                                  "train without --resume_from_checkpoint")
        return ckpts[-1]
    p = Path(spec)
    if not (p / "trainer_state.json").is_file():
        raise CheckpointError(f"resume_from_checkpoint: {spec} is not a checkpoint folder (no trainer_state.json); "
                              "give a checkpoint-STEP folder or 'latest'")
    return p


def check_resumable(ckpt: Path, cfg: TrainConfig) -> None:
    """Refuse, by name, config changes that would make the resumed run differ from the checkpointed one."""
    from ..config import load_run_config

    try:
        old = load_run_config(ckpt)
    except Exception as e:
        raise CheckpointError(f"{ckpt}: unreadable config ({e})") from None
    changed = [k for k in RESUME_KEYS if getattr(old, k) != getattr(cfg, k)]
    if changed:
        detail = ", ".join(f"{k} ({getattr(old, k)!r} -> {getattr(cfg, k)!r})" for k in changed)
        raise CheckpointError(f"cannot resume from {ckpt}: changed {detail}; use the checkpoint's values or "
                              "start a new run")


def data_record(data) -> dict:
    """What a checkpoint keeps of its run's data (a ``PreparedData``): the fingerprint a resume must match, and per
    source what a refusal names."""
    def content(sha256: dict) -> str | None:
        return hashlib.sha256(json.dumps(sorted(sha256.items())).encode()).hexdigest()[:16] if sha256 else None

    return {"fingerprint": data.fingerprint, "train_examples": len(data.train), "eval_examples": len(data.eval),
            "sources": [{"name": s.name, "role": s.role, "rows": s.rows, "selection": s.selection(),
                         "content": content(s.sha256), "examples": Path(s.cache_dir).name} for s in data.sources]}


def _data_change(old: dict, new: dict) -> str:
    """What differs between two data records, in words."""
    def names(record: dict) -> list[str]:
        return [f"{s['name']} ({s['role']})" for s in record["sources"]]

    if names(old) != names(new):
        return f"sources {', '.join(names(old))} -> {', '.join(names(new))}"
    for a, b in zip(old["sources"], new["sources"]):
        if a["content"] != b["content"]:
            rows = f", {a['rows']} -> {b['rows']} rows" if a["rows"] != b["rows"] else ""
            return f"{a['name']} changed since the checkpoint (its files' sha256 differ{rows})"
        if a["selection"] != b["selection"]:
            return f"{a['name']}: {a['selection']} -> {b['selection']}"
        if a["examples"] != b["examples"]:
            return (f"{a['name']} gives other examples (the same rows tokenized differently: the tokenizer or "
                    "qlorakit's data code changed)")
    counts = [(k, old[k], new[k]) for k in ("train_examples", "eval_examples") if old[k] != new[k]]
    if counts:
        return ", ".join(f"{k.replace('_', ' ')} {a} -> {b}" for k, a, b in counts)
    return f"fingerprint {old['fingerprint']} -> {new['fingerprint']}"


def check_data(ckpt: Path, record: dict) -> bool:
    """Refuse, in one line naming what changed, a resume whose data differs from the checkpoint's (other examples,
    or another order). False when the checkpoint records no data (older qlorakit): nothing was checked."""
    try:
        old = json.loads((ckpt / "trainer_state.json").read_text()).get("data")
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"checkpoint {ckpt} is damaged ({type(e).__name__}: {str(e)[:120]}); resume from an "
                              "earlier checkpoint") from None
    if old is None:
        return False
    if old.get("fingerprint") != record["fingerprint"]:
        try:
            change = _data_change(old, record)
        except (KeyError, TypeError):
            change = f"fingerprint {old.get('fingerprint')} -> {record['fingerprint']}"
        raise CheckpointError(f"cannot resume from {ckpt}: the training data differs from the checkpoint's: {change}; "
                              "resume with the checkpoint's data or start a new run")
    return True


def check_total_steps(ckpt: Path, cfg: TrainConfig, total_steps: int) -> None:
    """Refuse a run that would end before the checkpoint's step (num_train_epochs or max_steps lowered past it)."""
    try:
        step = json.loads((ckpt / "trainer_state.json").read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {ckpt} is damaged ({type(e).__name__}: {str(e)[:120]}); resume from an "
                              "earlier checkpoint") from None
    if total_steps < step:
        setting = f"max_steps {cfg.max_steps}" if cfg.max_steps > 0 else f"num_train_epochs {cfg.num_train_epochs:g}"
        raise CheckpointError(f"cannot resume from {ckpt}: it is at step {step}, past the {total_steps} steps of "
                              f"this run ({setting}); raise num_train_epochs or max_steps to reach step {step} at "
                              "least, or start a new run")


def load_checkpoint(ckpt: Path, model, optimizer, scheduler, rank: int = 0, load_adapter=None,
                    load_optimizer=None) -> TrainState:
    """Restore adapter weights, optimizer, schedule and RNG from ``ckpt``; return its TrainState.

    Under torchrun every rank reads the checkpoint: its own RNG state, and the adapter and optimizer through
    ``load_adapter(weights)`` and ``load_optimizer(state)`` where the model is sharded (FSDP)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    try:
        weights = load_file(ckpt / "adapter_model.safetensors")
        state = TrainState(**json.loads((ckpt / "trainer_state.json").read_text()))
        if state.best_metric is None:  # written before metric_for_best_model: the best was by eval loss
            state.best_metric = state.best_eval_loss
        opt_state = torch.load(ckpt / "optimizer.pt", weights_only=True, map_location="cpu")
        sched_state = torch.load(ckpt / "scheduler.pt", weights_only=True)
        rng_file = ckpt / f"rng_state_{rank}.pt"
        rng = torch.load(rng_file if rank and rng_file.is_file() else ckpt / "rng_state.pt", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {ckpt} is damaged ({type(e).__name__}: {str(e)[:120]}); resume from an "
                              "earlier checkpoint") from None
    (load_adapter or (lambda w: set_peft_model_state_dict(model, w)))(weights)
    (load_optimizer or optimizer.load_state_dict)(opt_state)
    scheduler.load_state_dict(sched_state)
    set_rng_state(rng)
    return state
