"""Setup: config -> rows -> examples -> model -> optimizer, schedule and resumed state, held in one ``Run``.

Everything is checked and reported before the first step: the data split, the length policy, the trainable
parameters, the step arithmetic. A resume with changed settings is refused before any time goes into loading the
model; one that would end before its checkpoint, as soon as the examples are counted.
"""

from __future__ import annotations

import functools
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .. import devices
from ..config import TrainConfig, save_config
from ..data.formats import Conversation, read_jsonl
from ..data.tokenize import Example, tokenize_all
from ..errors import UserError
from ..model.attention import packed_attention_backend, use_packed_attention
from ..model.cuda import check_fsdp_weights
from ..model.fused_lora import cache_lora_casts
from ..model.loss import supports_chunked_loss
from ..model.load import (apply_cache_dequantized, enable_gradient_checkpointing, load_base_for_run, load_tokenizer,
                          resolve_model_path)
from ..model.lora import add_lora, target_modules, trainable_report
from . import checkpoint as ckpt
from . import processes, schedule
from .distributed import load_adapter, load_optimizer, unwrap, wrap_model
from .optim import build_optimizer, build_scheduler, warmup_steps
from .progress import Metrics, Progress
from .step import accumulate, supports_packing
from .validate import eval_loss

log = logging.getLogger("qlorakit")


@dataclass
class Hooks:
    """The collaborators of the loop a caller may replace (the tests do: a scripted eval loss, a poisoned step, a
    device with little free memory). Each has the signature of the function it defaults to."""

    evaluate: Callable[..., dict] = eval_loss  # held-out loss: validate.eval_loss
    accumulate: Callable[..., float] = accumulate  # forward and backward of one step's micro-batches: step.accumulate
    free_memory: Callable[[torch.device], int | None] = devices.free_memory  # bytes free on the device


@dataclass
class Run:
    """What the step loop works on: built by ``setup``, advanced by ``fit``, written out by ``finish``."""

    cfg: TrainConfig
    info: processes.DistInfo
    device: torch.device
    out: Path
    model: Any  # the peft model; under torchrun wrapped by DDP or sharded by FSDP2 (distributed.unwrap)
    tokenizer: Any
    train_ex: list[Example]
    eval_ex: list[Example]
    packing: bool
    use_bf16: bool
    params: list[torch.nn.Parameter]  # the trainable ones, in the optimizer's order
    optimizer: torch.optim.Optimizer
    scheduler: Any
    state: ckpt.TrainState
    total_steps: int
    steps_per_epoch: int
    metrics: Metrics
    bar: Progress
    hooks: Hooks = field(default_factory=Hooks)
    chunked_loss: bool = False  # the loss by model/loss.py's chunked head (cfg.chunked_loss, decided in setup)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def epoch_steps(self, epoch: int) -> list[schedule.ScheduledStep]:
        cfg = self.cfg
        if cfg.max_tokens_per_batch:
            return schedule.budget_steps([len(e) for e in self.train_ex], epoch, seed=cfg.seed,
                                         budget=cfg.max_tokens_per_batch, accum=cfg.gradient_accumulation_steps,
                                         world_size=self.info.world_size, rank=self.info.rank)
        return schedule.epoch_steps(len(self.train_ex), epoch, seed=cfg.seed, micro=cfg.per_device_train_batch_size,
                                    accum=cfg.gradient_accumulation_steps, world_size=self.info.world_size,
                                    rank=self.info.rank,
                                    lengths=[len(e) for e in self.train_ex] if cfg.group_by_length else None)


def split_eval(convs: list[Conversation], size: float, seed: int) -> tuple[list[Conversation], list[Conversation]]:
    """A seeded held-out split: ``size`` rows if >= 1, else that fraction of the rows. Order is kept."""
    n_eval = int(size) if size >= 1 else int(round(len(convs) * size))
    if n_eval == 0:
        return convs, []
    if n_eval >= len(convs):
        raise UserError(f"eval_dataset_size: {size} leaves no training rows out of {len(convs)}")
    g = torch.Generator().manual_seed(seed)
    held = set(torch.randperm(len(convs), generator=g)[:n_eval].tolist())
    return [c for i, c in enumerate(convs) if i not in held], [c for i, c in enumerate(convs) if i in held]


def read_data(cfg: TrainConfig) -> tuple[list[Conversation], list[Conversation], list[str]]:
    """Training and eval conversations, validated before any model is loaded, and lines that report the split."""
    path = cfg.dataset_path()
    convs = read_jsonl(path, cfg.dataset_format)
    if cfg.eval_dataset:
        train_convs, eval_convs = convs, read_jsonl(cfg.eval_dataset, cfg.dataset_format)
        split_line = f"eval: {len(eval_convs)} rows from {cfg.eval_dataset}"
    else:
        train_convs, eval_convs = split_eval(convs, cfg.eval_dataset_size, cfg.seed)
        split_line = (f"eval: {len(eval_convs)} of {len(convs)} rows held out (seed {cfg.seed})" if eval_convs
                      else "eval: none (set eval_dataset_size or eval_dataset)")
    return train_convs, eval_convs, [f"data: {len(convs)} rows from {path}", split_line]


def tokenize_data(cfg: TrainConfig, tokenizer, train_convs, eval_convs) -> tuple[list[Example], list[Example],
                                                                                  list[str]]:
    """Examples with the length policy applied, and report lines that account for every row."""
    kw = dict(truncation=cfg.truncation, train_on_source=cfg.train_on_source)
    train_ex, rep = tokenize_all(train_convs, tokenizer, cfg.prompt_format, cfg.model_max_len, **kw)
    lines = [f"train: {x}" for x in rep.lines()]
    eval_ex: list[Example] = []
    if eval_convs:
        eval_ex, erep = tokenize_all(eval_convs, tokenizer, cfg.prompt_format, cfg.model_max_len, **kw)
        lines += [f"eval: {x}" for x in erep.lines()]
    if not train_ex:
        raise UserError("no training example left after applying model_max_len; raise model_max_len or "
                        "check the data with 'qlorakit data check'")
    return train_ex, eval_ex, lines


def build_model(cfg: TrainConfig, device: torch.device):
    path = resolve_model_path(cfg.model_name_or_path)
    tokenizer = load_tokenizer(path, cfg.trust_remote_code)
    model = load_base_for_run(path, cfg, device)
    dtype = torch.bfloat16 if cfg.use_bf16() else torch.float32
    # Under FSDP the 4-bit weights are what gets sharded; "auto" keeps them packed there.
    cache_setting = "false" if cfg.fsdp and cfg.cache_dequantized == "auto" else cfg.cache_dequantized
    apply_cache_dequantized(model, cache_setting, cfg.bits, dtype, device)
    modules = target_modules(model, cfg.lora_modules)
    model = add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, modules=modules,
                     seed=cfg.seed)
    return model, tokenizer, path, modules


def decide_checkpointing(cfg: TrainConfig, model, examples: list[Example], packing: bool, device: torch.device,
                         free_memory: Callable[[torch.device], int | None] = devices.free_memory) -> tuple[bool, str]:
    """Whether to recompute activations in backward, and why. ``auto``: only when the activations the largest
    possible micro-batch saves without it (qlorakit.plan's estimate) exceed half the device's free memory."""
    if cfg.gradient_checkpointing != "auto":
        return cfg.gradient_checkpointing == "true", "asked for"
    from ..model import memory

    micro = cfg.per_device_train_batch_size
    longest = sorted((len(e) for e in examples), reverse=True)[:micro]
    tokens = sum(longest) if packing else micro * longest[0]
    try:
        arch = memory.architecture(model.get_base_model().config.to_dict())
        need = memory.activation_bytes(arch, tokens, longest[0], memory.lora_targets(arch, cfg.lora_modules),
                                     cfg.lora_r, 2 if cfg.use_bf16() else 4, cfg.lora_dropout, False)
    except UserError:
        return True, "auto: no memory estimate for this architecture, so on to be safe"
    free = free_memory(device)
    if free is None:
        return True, "auto: free memory unknown, so on to be safe"
    on = need > free / 2
    return on, (f"auto: the largest micro-batch ({tokens} tokens) saves about {need / 2**30:.2f} GiB of activations "
                f"without it, {free / 2**30:.1f} GiB free")


def use_chunked_loss(cfg: TrainConfig, model, device: torch.device) -> bool:
    """``chunked_loss``: true or false as asked (true refused where the head is not plain); auto = on CUDA, where
    full-vocabulary float32 logits are what fills the memory, for models whose head it can take."""
    if cfg.chunked_loss == "false":
        return False
    supported = supports_chunked_loss(model)
    if cfg.chunked_loss == "true" and not supported:
        raise UserError(f"chunked_loss: {type(model.get_base_model()).__name__} has no plain output head to chunk "
                        "(supported: LLaMA, Mistral, Qwen2 and Phi-3 families); set chunked_loss false or auto")
    return supported and (cfg.chunked_loss == "true" or device.type == "cuda")


def log_summary(cfg: TrainConfig, info: processes.DistInfo, model, base_path: str, modules: list[str],
                data_lines: list[str], n_examples: int, total_steps: int, packing: bool) -> None:
    """The run's derived numbers, printed once before the first step."""
    for line in data_lines:
        log.info(line)
    log.info("model: %s (%s, %d-bit%s), LoRA r=%d alpha=%g on %s", base_path, type(model.get_base_model()).__name__,
             cfg.bits, f" {cfg.quant_type}{' double-quant' if cfg.double_quant else ''}" if cfg.bits == 4 else "",
             cfg.lora_r, cfg.lora_alpha, ", ".join(modules))
    lines, n_trainable, n_total = trainable_report(model)
    log.info("trainable parameters by module kind:")
    for line in lines:
        log.info(line)
    log.info("trainable %s of %s (%.3f%%)", f"{n_trainable:,}", f"{n_total:,}", 100 * n_trainable / n_total)
    log.info("compute dtype: %s (bf16 %s)", "bfloat16" if cfg.use_bf16() else "float32", cfg.bf16)
    micro, accum = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    log.info("%d examples, %d per step (%d x %d accumulation x %d processes), %d steps per epoch, %d steps, "
             "%d warmup; %s batches", n_examples, micro * accum * info.world_size, micro, accum, info.world_size,
             schedule.steps_per_epoch(n_examples, micro, accum, info.world_size), total_steps,
             warmup_steps(total_steps, cfg.warmup_ratio), "packed padding-free" if packing else "padded")


def prepare_output_dir(cfg: TrainConfig, info: processes.DistInfo) -> Path:
    """The run directory, created; what a run killed inside a save left there is tidied (rank 0)."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir: {out} is a file, not a directory; give a directory for the run (a new one is "
                        "created) or move the file away")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a parent that is a file, no permission
        raise UserError(f"output_dir: cannot create {out} ({e.strerror}); give a directory you can write to") from None
    if info.is_main:
        ckpt.recover_partial_saves(out)  # what a run killed inside a save left behind
    processes.barrier(info)
    return out


def resume(path: Path, model, optimizer, scheduler, info: processes.DistInfo) -> ckpt.TrainState:
    """Load the checkpoint at ``path`` (adapter, optimizer, schedule, RNG) and return its state."""
    state = ckpt.load_checkpoint(path, unwrap(model), optimizer, scheduler, rank=info.rank,
                                 load_adapter=functools.partial(load_adapter, model),
                                 load_optimizer=functools.partial(load_optimizer, model, optimizer))
    if state.world_size != info.world_size:
        raise ckpt.CheckpointError(f"cannot resume from {path}: it was written by {state.world_size} "
                                   f"processes, this run has {info.world_size}; resume with the same number")
    if info.is_main:
        log.info("resumed from %s at step %d (epoch %d, step %d of it)", path, state.step, state.epoch,
                 state.step_in_epoch)
    return state


def reschedule(cfg: TrainConfig, optimizer, state: ckpt.TrainState, total: int, info: processes.DistInfo):
    """The learning-rate schedule of a run resumed with another length (num_train_epochs or max_steps changed):
    rebuilt for the new total and stepped to the resume step, so the next update uses the new schedule's rate.

    For linear or cosine decay that stretches the decay over the new total: at the resume step the rate jumps to
    what the new schedule gives there (a finished linear run of 2 steps resumed for 4: from 0 to half the peak)
    and falls to 0 at the new last step. Warmup is recomputed from warmup_ratio over the new total (a resume step
    inside the new warmup resumes on its ramp); the steps already taken keep the rates they had. A constant
    schedule stays constant."""
    scheduler = build_scheduler(optimizer, total, cfg.warmup_ratio, cfg.lr_scheduler_type, done_steps=state.step)
    if info.is_main:
        log.info("schedule: %d steps in all instead of the checkpoint's %d; the %s learning-rate schedule is rebuilt "
                 "for %d steps and continues at step %d (lr %.2e)", total, state.total_steps, cfg.lr_scheduler_type,
                 total, state.step, scheduler.get_last_lr()[0])
    state.total_steps = total
    return scheduler


def setup(cfg: TrainConfig, progress: bool = True, hooks: Hooks | None = None) -> Run:
    """Everything the first step needs, checked and reported; resumed from a checkpoint where the config says so."""
    hooks = hooks or Hooks()
    info = processes.init()
    logging.basicConfig(level=logging.INFO if info.is_main else logging.WARNING, format="qlorakit: %(message)s")
    device = devices.device_for_training()
    out = prepare_output_dir(cfg, info)
    resume_path = None
    if cfg.resume_from_checkpoint:  # refused before any time goes into loading the model
        resume_path = ckpt.resolve_resume(cfg.resume_from_checkpoint, out)
        ckpt.check_resumable(resume_path, cfg)
    check_fsdp_weights(device, cfg.fsdp, cfg.bits, dense_base=cfg.cache_dequantized == "true")
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    train_convs, eval_convs, data_lines = read_data(cfg)
    model, tokenizer, base_path, modules = build_model(cfg, device)
    train_ex, eval_ex, token_lines = tokenize_data(cfg, tokenizer, train_convs, eval_convs)
    packing = cfg.packing and supports_packing(model)
    if cfg.max_tokens_per_batch and not packing:
        raise UserError(f"max_tokens_per_batch: {type(model.get_base_model()).__name__} takes no position ids, so it "
                        "trains on padded batches; set max_tokens_per_batch 0 and use per_device_train_batch_size")
    if packing and use_packed_attention(model.get_base_model()) and info.is_main:
        log.info("attention: %s within each packed example (no work across examples)",
                 packed_attention_backend(device, torch.bfloat16 if cfg.use_bf16() else torch.float32))
    chunked = use_chunked_loss(cfg, model, device)
    if chunked and info.is_main:
        log.info("loss: by the chunked head, a chunk of trained positions at a time (no full-vocabulary logits)")
    checkpointing, why = decide_checkpointing(cfg, model, train_ex, packing, device, hooks.free_memory)
    if checkpointing:
        enable_gradient_checkpointing(model.get_base_model())
    if info.is_main:
        log.info("gradient checkpointing: %s (%s)", "on" if checkpointing else "off", why)

    lengths = [len(e) for e in train_ex] if cfg.max_tokens_per_batch else None
    total = schedule.total_steps(cfg, len(train_ex), info.world_size, lengths)
    if resume_path is not None:
        ckpt.check_total_steps(resume_path, cfg, total)
    if info.is_main:
        log_summary(cfg, info, model, base_path, modules, data_lines + token_lines, len(train_ex), total, packing)
    model = wrap_model(model, cfg, info, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg.optim, params, cfg.learning_rate, cfg.weight_decay)
    scheduler = build_scheduler(optimizer, total, cfg.warmup_ratio, cfg.lr_scheduler_type)
    cache_lora_casts(unwrap(model), optimizer)  # bf16 copies of the adapters made once per optimizer step
    state = ckpt.TrainState(total_steps=total, world_size=info.world_size)
    if resume_path is not None:
        state = resume(resume_path, model, optimizer, scheduler, info)
        if state.total_steps != total:
            scheduler = reschedule(cfg, optimizer, state, total, info)
    if info.is_main:
        save_config(cfg, out / "qlorakit_config.yaml")
    metrics = Metrics(out / "metrics.jsonl", state.step if resume_path else None, enabled=info.is_main)
    bar = Progress(total, state.step, cfg.logging_steps, enabled=progress and info.is_main)
    per_epoch = (len(schedule.budget_steps(lengths, 0, seed=cfg.seed, budget=cfg.max_tokens_per_batch,
                                           accum=cfg.gradient_accumulation_steps, world_size=info.world_size))
                 if lengths else schedule.steps_per_epoch(len(train_ex), cfg.per_device_train_batch_size,
                                                          cfg.gradient_accumulation_steps, info.world_size))
    return Run(cfg=cfg, info=info, device=device, out=out, model=model, tokenizer=tokenizer, train_ex=train_ex,
               eval_ex=eval_ex, packing=packing, use_bf16=cfg.use_bf16(), params=params, optimizer=optimizer,
               scheduler=scheduler, state=state, total_steps=total, steps_per_epoch=per_epoch, metrics=metrics,
               bar=bar, hooks=hooks, chunked_loss=chunked)
