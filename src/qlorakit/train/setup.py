"""Setup: config -> tokenizer -> examples (the tokenized cache) -> model -> optimizer, schedule and resumed state,
held in one ``Run``.

Everything is checked and reported before the first step: the data sources, split and length policy, the trainable
parameters, the step arithmetic. A resume with changed settings is refused before any time goes into loading the
model; one with other data (its fingerprint) or that would end before its checkpoint, as soon as the examples are
counted, still before the model loads.
"""

from __future__ import annotations

import functools
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .. import devices
from ..config import TrainConfig, save_config
from ..console import log_to_stderr
from ..data.examples import ExampleSequence
from ..data.mixture import SourceSummary
from ..data.prepare import DataOptions, PreparedData, prepare_data
from ..errors import UserError
from ..model.attention import packed_attention_backend, use_packed_attention
from ..model.cuda import check_fsdp_weights
from ..model.fused_lora import cache_lora_casts
from ..model.liger import use_liger_kernel
from ..model.loss import supports_chunked_loss
from ..model.load import (apply_cache_dequantized, enable_gradient_checkpointing, load_base_for_run, model_tokenizer,
                          resolve_model_path)
from ..model.lora import add_lora, target_modules, trainable_report, unwrap
from ..model.neftune import add_neftune
from . import checkpoint as ckpt
from . import processes, schedule
from .distributed import load_adapter, load_optimizer, wrap_model
from .mmlu import MMLU, load_mmlu, mmlu_file
from .objectives import objective_for
from .objectives.sft import SFT
from .optim import build_optimizer, build_scheduler, param_groups, warmup_steps
from .preference_setup import (apply_init_from, check_method_data, disable_dropout, load_init_adapter,
                               prepare_reference)
from .progress import Metrics, Progress
from .recipe import apply_recipe
from .step import accumulate, supports_packing
from .tracking import Trackers, require_trackers, start_trackers
from .validate import eval_answers, eval_loss

log = logging.getLogger("qlorakit")


@dataclass
class Hooks:
    """The collaborators of the loop a caller may replace (the tests do: a scripted eval loss, a poisoned step, a
    device with little free memory). Each has the signature of the function it defaults to."""

    evaluate: Callable[..., dict] = eval_loss  # held-out loss: validate.eval_loss
    answer: Callable[..., dict] = eval_answers  # answers generated and scored (eval_generate): validate.eval_answers
    accumulate: Callable[..., float] = accumulate  # forward and backward of one step's micro-batches: step.accumulate
    free_memory: Callable[[torch.device], int | None] = devices.free_memory  # bytes free on the device


@dataclass
class Run:
    """What the step loop works on: built by ``setup``, advanced by ``fit``, written out by ``finish``."""

    cfg: TrainConfig
    info: processes.DistInfo
    device: torch.device
    out: Path
    model: Any  # the peft model; under torchrun wrapped by DDP or sharded by FSDP2 (model.lora.unwrap)
    tokenizer: Any
    train_ex: ExampleSequence  # memory-mapped examples: train_ex[i] is an Example, train_ex.lengths every length
    eval_ex: ExampleSequence
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
    sources: list[SourceSummary] = field(default_factory=list)  # each data source with the rows it gave (the card)
    mmlu: MMLU | None = None  # do_mmlu_eval's questions, scored at each evaluation
    trackers: Trackers = field(default_factory=Trackers)  # report_to's (rank 0)
    objective: Any = field(default_factory=SFT)  # cfg.method's: how examples become batches and a loss (objectives/)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def ckpt_dir(self) -> Path:
        """Where checkpoint-STEP folders go: working_dir, or the run directory."""
        return self.cfg.checkpoint_dir()

    def epoch_steps(self, epoch: int) -> list[schedule.ScheduledStep]:
        cfg = self.cfg
        if cfg.max_tokens_per_batch:
            return schedule.budget_steps(self.train_ex.lengths.tolist(), epoch, seed=cfg.data_order_seed(),
                                         budget=cfg.max_tokens_per_batch, accum=cfg.gradient_accumulation_steps,
                                         world_size=self.info.world_size, rank=self.info.rank)
        return schedule.epoch_steps(len(self.train_ex), epoch, seed=cfg.data_order_seed(),
                                    micro=cfg.per_device_train_batch_size,
                                    accum=cfg.gradient_accumulation_steps, world_size=self.info.world_size,
                                    rank=self.info.rank,
                                    lengths=self.train_ex.lengths.tolist() if cfg.group_by_length else None)


def load_data(opts: DataOptions, tokenizer, info: processes.DistInfo) -> PreparedData:
    """The run's examples from the tokenized cache. Rank 0 (or a single process) builds what the cache lacks, and
    reports a bad row (torchrun then stops the other ranks); the other ranks wait for it, then load."""
    data = prepare_data(opts, tokenizer, mode="build") if info.is_main else None
    processes.barrier(info)
    if data is None:
        data = prepare_data(opts, tokenizer, mode="wait")
    if info.is_main:
        for line in data.lines:
            log.info(line)
    return data


def first_examples(cfg: TrainConfig, train_ex: ExampleSequence, eval_ex: ExampleSequence,
                   info: processes.DistInfo) -> tuple[ExampleSequence, ExampleSequence]:
    """qlora's max_train_samples and max_eval_samples: the first N examples of each split (0: all of them), each
    cut said in a line."""
    cut = []
    for key, n, examples in (("max_train_samples", cfg.max_train_samples, train_ex),
                             ("max_eval_samples", cfg.max_eval_samples, eval_ex)):
        if n and len(examples) > n:
            if info.is_main:
                log.info("%s: the first %d of %d examples (%s)", key.split("_")[1], n, len(examples), key)
            examples = ExampleSequence(examples.store, examples.positions[:n])
        cut.append(examples)
    return cut[0], cut[1]


def check_data_sources(opts: DataOptions) -> None:
    """A source that does not exist, or of an unknown file type, is reported before the tokenizer loads."""
    for spec in (*opts.sources, *opts.eval_sources):
        spec.kind()


def budget_lengths(cfg: TrainConfig, examples: ExampleSequence) -> list[int] | None:
    """Every example's length where a token budget packs the steps (their count then follows the packing)."""
    return examples.lengths.tolist() if cfg.max_tokens_per_batch else None


def tokenizer_and_data(cfg: TrainConfig, info: processes.DistInfo, resume_path: Path | None
                       ) -> tuple[Any, str, PreparedData]:
    """The tokenizer (of the resolved base path, also returned) and the run's examples, checked against the
    checkpoint a resume continues from: all before the model loads, so a bad source or row, changed data or a run
    that would end before its checkpoint cost no model loading."""
    opts = DataOptions.from_config(cfg)  # a malformed dataset spec, in one line
    check_data_sources(opts)
    tokenizer = model_tokenizer(cfg.model_name_or_path, cfg.trust_remote_code)
    data = load_data(opts, tokenizer, info)
    data.train, data.eval = first_examples(cfg, data.train, data.eval, info)
    base_path = resolve_model_path(cfg.model_name_or_path)  # a GGUF's weights are converted (once) only now
    if resume_path is not None:
        if not ckpt.check_data(resume_path, ckpt.data_record(data)) and info.is_main:
            log.info("%s records no data fingerprint (an older qlorakit wrote it): the data is not checked against "
                     "the checkpoint's", resume_path)
        ckpt.check_total_steps(resume_path, cfg, schedule.total_steps(cfg, len(data.train), info.world_size,
                                                                      budget_lengths(cfg, data.train)))
    return tokenizer, base_path, data


def build_model(cfg: TrainConfig, path: str, device: torch.device):
    model = load_base_for_run(path, cfg, device)
    _, why = use_liger_kernel(model, cfg.use_liger_kernel, device.type)
    log.info("liger kernels: %s", why)
    dtype = torch.bfloat16 if cfg.use_bf16() else torch.float32
    # Under FSDP the 4-bit weights are what gets sharded; "auto" keeps them packed there.
    cache_setting = "false" if cfg.fsdp and cfg.cache_dequantized == "auto" else cfg.cache_dequantized
    apply_cache_dequantized(model, cache_setting, cfg.bits, dtype, device)
    modules = target_modules(model, cfg.lora_modules)
    model = add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, modules=modules,
                     seed=cfg.seed, rslora=cfg.use_rslora, dora=cfg.use_dora, init=cfg.init_lora_weights,
                     base_path=path)
    add_neftune(model, cfg.neftune_noise_alpha)
    if cfg.init_from:
        load_init_adapter(model, cfg)
    if cfg.method != "sft" and cfg.disable_dropout and disable_dropout(model):
        log.info("dropout: off (disable_dropout), so the policy equals its reference at step 0")
    return model, modules


def decide_checkpointing(cfg: TrainConfig, model, lengths: np.ndarray, packing: bool, device: torch.device,
                         free_memory: Callable[[torch.device], int | None] = devices.free_memory) -> tuple[bool, str]:
    """Whether to recompute activations in backward, and why. ``auto``: only when the activations the largest
    possible micro-batch saves without it (qlorakit.plan's estimate) exceed half the device's free memory.
    ``lengths``: every training example's length (``ExampleSequence.lengths``, read without the tokens)."""
    if cfg.gradient_checkpointing != "auto":
        return cfg.gradient_checkpointing == "true", "asked for"
    from ..model import memory

    micro = cfg.per_device_train_batch_size
    longest = sorted(lengths.tolist(), reverse=True)[:micro]
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
    if cfg.chunked_loss == "false" or cfg.method != "sft":
        if cfg.chunked_loss == "true" and cfg.method != "sft":
            raise UserError(f"chunked_loss: method {cfg.method} needs each sequence's log-probability, which the "
                            "chunked head does not give; set chunked_loss auto or false")
        return False
    supported = supports_chunked_loss(model)
    if cfg.chunked_loss == "true" and not supported:
        raise UserError(f"chunked_loss: {type(model.get_base_model()).__name__} has no plain output head to chunk "
                        "(supported: LLaMA, Mistral, Qwen2 and Phi-3 families); set chunked_loss false or auto")
    return supported and (cfg.chunked_loss == "true" or device.type == "cuda")


def log_summary(cfg: TrainConfig, info: processes.DistInfo, model, base_path: str, modules: list[str],
                n_examples: int, total_steps: int, packing: bool) -> None:
    """The run's derived numbers, printed once before the first step (the data's lines are printed as it loads)."""
    log.info("model: %s (%s, %d-bit%s), LoRA r=%d alpha=%g on %s", base_path, type(model.get_base_model()).__name__,
             cfg.bits, f" {cfg.quant_type}{' double-quant' if cfg.double_quant else ''}" if cfg.bits == 4 else "",
             cfg.lora_r, cfg.lora_alpha, ", ".join(modules))
    log.info("levers: init %s, rslora %s, dora %s, loraplus_lr_ratio %g, neftune_noise_alpha %g, prompt_loss_weight "
             "%g", cfg.init_lora_weights, cfg.use_rslora, cfg.use_dora, cfg.loraplus_lr_ratio,
             cfg.neftune_noise_alpha, cfg.prompt_loss_weight)
    lines, n_trainable, n_total = trainable_report(model)
    log.info("trainable parameters by module kind:")
    for line in lines:
        log.info(line)
    log.info("trainable %s of %s (%.3f%%)", f"{n_trainable:,}", f"{n_total:,}", 100 * n_trainable / n_total)
    log.info("compute dtype: %s (bf16 %s)", "bfloat16" if cfg.use_bf16() else "float32", cfg.bf16)
    log.info("activation offload: %s", "on (tensors saved for backward wait in host memory)"
             if cfg.offload_activations else "off")
    micro, accum = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    log.info("%d examples, %d per step (%d x %d accumulation x %d processes), %d steps per epoch, %d steps, "
             "%d warmup; %s batches", n_examples, micro * accum * info.world_size, micro, accum, info.world_size,
             schedule.steps_per_epoch(n_examples, micro, accum, info.world_size), total_steps,
             warmup_steps(total_steps, cfg.warmup_ratio), "packed padding-free" if packing else "padded")


def prepare_output_dir(cfg: TrainConfig, info: processes.DistInfo) -> Path:
    """The run directory (and working_dir, where checkpoints go), created; what a run killed inside a save left
    there is tidied (rank 0)."""
    out = Path(cfg.output_dir)
    for key, where in (("output_dir", out), ("working_dir", cfg.checkpoint_dir())):
        if where.exists() and not where.is_dir():
            raise UserError(f"{key}: {where} is a file, not a directory; give a directory for the run (a new one "
                            "is created) or move the file away")
        try:
            where.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a parent that is a file, no permission
            raise UserError(f"{key}: cannot create {where} ({e.strerror}); give a directory you can write "
                            "to") from None
    if info.is_main:
        ckpt.recover_partial_saves(cfg.checkpoint_dir())  # what a run killed inside a save left behind
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
    cfg = apply_init_from(cfg)  # the starting run's base, adapter shape and prompt format
    info = processes.init()
    log_to_stderr(logging.INFO if info.is_main else logging.WARNING)
    device = devices.device_for_training()
    out = prepare_output_dir(cfg, info)
    if info.is_main:
        require_trackers(cfg.report_to)
    if cfg.do_mmlu_eval:
        mmlu_file(cfg.mmlu_dataset, cfg.mmlu_split)  # a missing MMLU file is refused before the model loads
    cfg, recipe_note = apply_recipe(cfg)  # the defaults by model size, before anything reads them (resume does)
    resume_path = None
    if cfg.resume_from_checkpoint:  # refused before any time goes into loading the model
        resume_path = ckpt.resolve_resume(cfg.resume_from_checkpoint, cfg.checkpoint_dir())
        ckpt.check_resumable(resume_path, cfg)
    check_fsdp_weights(device, cfg.fsdp, cfg.bits, dense_base=cfg.cache_dequantized == "true")
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    tokenizer, base_path, data = tokenizer_and_data(cfg, info, resume_path)
    train_ex, eval_ex = data.train, data.eval
    check_method_data(cfg, train_ex, eval_ex)
    model, modules = build_model(cfg, base_path, device)
    mmlu = load_mmlu(cfg, tokenizer)
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
    checkpointing, why = decide_checkpointing(cfg, model, train_ex.lengths, packing, device, hooks.free_memory)
    if checkpointing:
        enable_gradient_checkpointing(model.get_base_model())
    if info.is_main:
        log.info("gradient checkpointing: %s (%s)", "on" if checkpointing else "off", why)

    objective = objective_for(cfg)
    prepare_reference(cfg, objective, model, data, pad_id=tokenizer.pad_token_id, packing=packing, device=device,
                      use_bf16=cfg.use_bf16(), info=info, cache_root=DataOptions.from_config(cfg).cache_root())
    lengths = budget_lengths(cfg, train_ex)
    total = schedule.total_steps(cfg, len(train_ex), info.world_size, lengths)
    if info.is_main:
        log_summary(cfg, info, model, base_path, modules, len(train_ex), total, packing)
        log.info("%s", recipe_note)
    model = wrap_model(model, cfg, info, device)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = param_groups(model.named_parameters(), cfg.learning_rate, cfg.loraplus_lr_ratio)  # LoRA+: B faster
    optimizer = build_optimizer(cfg.optim, groups, cfg.learning_rate, cfg.weight_decay,
                                betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
    scheduler = build_scheduler(optimizer, total, cfg.warmup_ratio, cfg.lr_scheduler_type)
    cache_lora_casts(unwrap(model), optimizer)  # bf16 copies of the adapters made once per optimizer step
    state = ckpt.TrainState(total_steps=total, world_size=info.world_size)
    if resume_path is not None:
        state = resume(resume_path, model, optimizer, scheduler, info)
        if state.total_steps != total:
            scheduler = reschedule(cfg, optimizer, state, total, info)
    state.data = ckpt.data_record(data)  # what a resume from this run's checkpoints must match
    if info.is_main:
        save_config(cfg, out / "qlorakit_config.yaml")
    trackers = start_trackers(cfg, out, info.is_main)  # last: nothing after it can fail and leave them open
    metrics = Metrics(out / "metrics.jsonl", state.step if resume_path else None, enabled=info.is_main,
                      also=trackers.log)
    bar = Progress(total, state.step, cfg.logging_steps if cfg.logging_strategy == "steps" else 1,
                   enabled=progress and info.is_main)
    per_epoch = (len(schedule.budget_steps(lengths, 0, seed=cfg.data_order_seed(), budget=cfg.max_tokens_per_batch,
                                           accum=cfg.gradient_accumulation_steps, world_size=info.world_size))
                 if lengths else schedule.steps_per_epoch(len(train_ex), cfg.per_device_train_batch_size,
                                                          cfg.gradient_accumulation_steps, info.world_size))
    return Run(cfg=cfg, info=info, device=device, out=out, model=model, tokenizer=tokenizer, train_ex=train_ex,
               eval_ex=eval_ex, packing=packing, use_bf16=cfg.use_bf16(), params=params, optimizer=optimizer,
               scheduler=scheduler, state=state, total_steps=total, steps_per_epoch=per_epoch, metrics=metrics,
               bar=bar, hooks=hooks, chunked_loss=chunked, sources=data.sources, mmlu=mmlu,
               trackers=trackers, objective=objective)
