"""The training loop, readable top to bottom: config -> rows -> examples -> model -> steps -> run directory."""

from __future__ import annotations

import logging
import math
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import processes
from ..errors import UserError
from ..config import TrainConfig, save_config
from ..data.batching import collate
from ..data.formats import Conversation, read_jsonl
from ..data.tokenize import Example, tokenize_all
from ..devices import device_for_training, free_memory
from ..model.load import (apply_cache_dequantized, enable_gradient_checkpointing, load_base_for_run, load_tokenizer,
                          resolve_model_path)
from ..model.attention import use_packed_attention
from ..model.lora import add_lora, target_modules, trainable_report
from . import checkpoint as ckpt
from .optim import build_optimizer, build_scheduler, warmup_steps
from .progress import Metrics, Progress
from .schedule import epoch_steps
from .step import accumulate, count_trained, supports_packing
from .validate import eval_loss

log = logging.getLogger("qlorakit")


class TrainingStopped(UserError):
    """The run ended early for a reason the user must see (non-finite numbers, a failed save)."""


@dataclass
class RunResult:
    output_dir: Path
    steps: int
    final_loss: float | None
    stopped: str  # "finished", "early_stopping", "interrupted"
    best_step: int | None = None
    best_eval_loss: float | None = None


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


class StopRequest:
    """SIGTERM or a first Ctrl-C asks for a checkpoint at the next step boundary; a second Ctrl-C aborts at once."""

    def __init__(self):
        self.requested: str | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        log.warning("%s received: saving a checkpoint at the end of this step (Ctrl-C again to abort now)",
                    self.requested)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


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


def decide_checkpointing(cfg: TrainConfig, model, examples: list[Example], packing: bool,
                         device: torch.device) -> tuple[bool, str]:
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


def train(cfg: TrainConfig, progress: bool = True) -> RunResult:
    info = processes.init()
    logging.basicConfig(level=logging.INFO if info.is_main else logging.WARNING, format="qlorakit: %(message)s")
    device = device_for_training()
    use_bf16 = cfg.use_bf16()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if info.is_main:
        ckpt.recover_partial_saves(out)  # what a run killed inside a save left behind
    processes.barrier(info)
    resume_path = None
    if cfg.resume_from_checkpoint:  # refused before any time goes into loading the model
        resume_path = ckpt.resolve_resume(cfg.resume_from_checkpoint, out)
        ckpt.check_resumable(resume_path, cfg)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    train_convs, eval_convs, data_lines = read_data(cfg)
    model, tokenizer, base_path, modules = build_model(cfg, device)
    train_ex, eval_ex, token_lines = tokenize_data(cfg, tokenizer, train_convs, eval_convs)
    data_lines += token_lines
    packing = cfg.packing and supports_packing(model)
    if packing and use_packed_attention(model.get_base_model()) and info.is_main:
        log.info("attention: causal SDPA within each packed example (no work across examples)")
    pad_id = tokenizer.pad_token_id
    checkpointing, why = decide_checkpointing(cfg, model, train_ex, packing, device)
    if checkpointing:
        enable_gradient_checkpointing(model.get_base_model())
    if info.is_main:
        log.info("gradient checkpointing: %s (%s)", "on" if checkpointing else "off", why)

    lines, n_trainable, n_total = trainable_report(model)
    micro, accum = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    per_step = micro * accum * info.world_size
    steps_per_epoch = math.ceil(len(train_ex) / per_step)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)
    if info.is_main:
        for line in data_lines:
            log.info(line)
        log.info("model: %s (%s, %d-bit%s), LoRA r=%d alpha=%g on %s", base_path, type(model.get_base_model()).__name__,
                 cfg.bits, f" {cfg.quant_type}{' double-quant' if cfg.double_quant else ''}" if cfg.bits == 4 else "",
                 cfg.lora_r, cfg.lora_alpha, ", ".join(modules))
        log.info("trainable parameters by module kind:")
        for line in lines:
            log.info(line)
        log.info("trainable %s of %s (%.3f%%)", f"{n_trainable:,}", f"{n_total:,}", 100 * n_trainable / n_total)
        log.info("compute dtype: %s (bf16 %s)", "bfloat16" if use_bf16 else "float32", cfg.bf16)
        log.info("%d examples, %d per step (%d x %d accumulation x %d processes), %d steps per epoch, %d steps, "
                 "%d warmup; %s batches", len(train_ex), per_step, micro, accum, info.world_size, steps_per_epoch,
                 total_steps, warmup_steps(total_steps, cfg.warmup_ratio),
                 "packed padding-free" if packing else "padded")

    from .distributed import (adapter_state, is_fsdp, load_adapter, load_optimizer, optimizer_state,
                              unwrap, wrap_model)
    model = wrap_model(model, cfg, info, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg.optim, params, cfg.learning_rate, cfg.weight_decay)
    scheduler = build_scheduler(optimizer, total_steps, cfg.warmup_ratio, cfg.lr_scheduler_type)

    state = ckpt.TrainState(total_steps=total_steps, world_size=info.world_size)
    resume_step = None
    if resume_path is not None:
        state = ckpt.load_checkpoint(resume_path, unwrap(model), optimizer, scheduler, rank=info.rank,
                                     load_adapter=lambda w: load_adapter(model, w),
                                     load_optimizer=lambda s: load_optimizer(model, optimizer, s))
        if state.world_size != info.world_size:
            raise ckpt.CheckpointError(f"cannot resume from {resume_path}: it was written by {state.world_size} "
                                       f"processes, this run has {info.world_size}; resume with the same number")
        resume_step = state.step
        if info.is_main:
            log.info("resumed from %s at step %d (epoch %d, step %d of it)", resume_path, state.step, state.epoch,
                     state.step_in_epoch)

    if info.is_main:
        save_config(cfg, out / "qlorakit_config.yaml")
    metrics = Metrics(out / "metrics.jsonl", resume_step, enabled=info.is_main)
    bar = Progress(total_steps, state.step, cfg.logging_steps, enabled=progress and info.is_main)
    model.train()
    stopped, last_loss = "finished", None
    tokens_seen, t_last = 0, time.perf_counter()

    def evaluate_now() -> None:
        nonlocal stopped
        if not eval_ex:
            return
        res = eval_loss(model, eval_ex, batch_size=cfg.per_device_eval_batch_size, pad_id=pad_id,
                        packing=packing, device=device, use_bf16=use_bf16)
        row = {"step": state.step, "epoch": round(state.step / steps_per_epoch, 4), **res}
        metrics.write(row)
        state.eval_history.append(row)
        bar.write(f"eval at step {state.step}: loss {res['eval_loss']:.4f} perplexity {res['eval_perplexity']:.2f}")
        if state.best_eval_loss is None or res["eval_loss"] < state.best_eval_loss:
            state.best_eval_loss, state.best_step, state.evals_without_improvement = res["eval_loss"], state.step, 0
        else:
            state.evals_without_improvement += 1
            if cfg.early_stopping_patience and state.evals_without_improvement >= cfg.early_stopping_patience:
                stopped = "early_stopping"
                if info.is_main:
                    log.info("early stopping: no lower eval loss in %d evaluations; the best was at step %d",
                             state.evals_without_improvement, state.best_step)

    def save_now() -> None:
        adapter = adapter_state(model)
        opt_state = optimizer_state(model, optimizer)  # every rank: gathers under FSDP
        rank_rngs = processes.gather_objects(ckpt.rng_state(), info)
        if info.is_main:
            from safetensors import SafetensorError

            try:
                ckpt.save_checkpoint(out, unwrap(model), optimizer, scheduler, state, cfg,
                                            adapter_state=adapter, optimizer_state=opt_state,
                                            rank_rng_states=rank_rngs)
            except (OSError, SafetensorError) as e:  # SafetensorError: an I/O error writing the adapter
                last = ckpt.list_checkpoints(out)
                keep = f"; {last[-1].name} is intact" if last else ""
                why = getattr(e, "strerror", None) or e
                raise TrainingStopped(f"saving checkpoint-{state.step} failed: {why}{keep}") from None
            best = out / f"{ckpt.PREFIX}{state.best_step}" if state.best_step is not None else None
            for gone in ckpt.prune_checkpoints(out, cfg.save_total_limit, best):
                log.info("removed %s (save_total_limit %d)", gone.name, cfg.save_total_limit)
        processes.barrier(info)

    with StopRequest() as stop:
        while state.step < total_steps and stopped == "finished":
            lengths = [len(e) for e in train_ex] if cfg.group_by_length else None
            steps = epoch_steps(len(train_ex), state.epoch, seed=cfg.seed, micro=micro, accum=accum,
                                world_size=info.world_size, rank=info.rank, lengths=lengths)
            for scheduled in steps[state.step_in_epoch:]:
                mine = scheduled.micro_batches
                filler = [min(scheduled.examples, key=lambda i: len(train_ex[i]))]  # for a rank with no example left
                batches = [collate([train_ex[i] for i in (ids or filler)], pad_id, packing) for ids in mine]
                weights = [1.0 if ids else 0.0 for ids in mine]
                real = [b for b, ids in zip(batches, mine) if ids]
                n_tokens = int(processes.all_sum(count_trained(real), info, device))
                loss_sum = accumulate(model, batches, device, use_bf16, n_tokens, grad_scale=info.world_size,
                                      weights=weights)
                loss = processes.all_sum(loss_sum, info, device) / n_tokens
                norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else
                                                      float("inf"))
                lr = scheduler.get_last_lr()[0]
                if math.isfinite(loss) and torch.isfinite(norm):
                    optimizer.step()
                    state.nonfinite_in_a_row = 0
                else:
                    state.nonfinite_in_a_row += 1
                    state.skipped_steps += 1
                    bar.write(f"step {state.step + 1}: non-finite loss {loss} or gradient norm {float(norm)}; "
                              "update skipped")
                    if state.nonfinite_in_a_row >= cfg.max_nonfinite_steps:
                        last = ckpt.list_checkpoints(out)
                        raise TrainingStopped(
                            f"{state.nonfinite_in_a_row} steps in a row had a non-finite loss or gradient (last at "
                            f"step {state.step + 1}); lower learning_rate or check the data"
                            + (f"; the last good checkpoint is {last[-1]}" if last else ""))
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                state.step += 1
                state.step_in_epoch += 1
                if state.step_in_epoch == len(steps):
                    state.epoch, state.step_in_epoch = state.epoch + 1, 0
                last_loss = loss

                tokens_seen += int(processes.all_sum(sum(int(b["input_ids"].numel() if "attention_mask" not in b
                                                        else b["attention_mask"].sum()) for b in real),
                                                info, device))
                epoch_f = round(state.step / steps_per_epoch, 4)
                if state.step % cfg.logging_steps == 0 or state.step == total_steps:
                    elapsed = time.perf_counter() - t_last
                    tok_s = tokens_seen / elapsed if elapsed > 0 else 0.0
                    metrics.write({"step": state.step, "epoch": epoch_f, "loss": loss, "learning_rate": lr,
                                   "grad_norm": float(norm), "tokens_per_second": tok_s,
                                   "trained_tokens": n_tokens})
                    bar.update(state.step, epoch_f, loss, lr, tok_s)
                    tokens_seen, t_last = 0, time.perf_counter()

                epoch_end = state.step_in_epoch == 0
                if (cfg.eval_strategy == "steps" and state.step % cfg.eval_steps == 0) or \
                        (cfg.eval_strategy == "epoch" and epoch_end):
                    evaluate_now()
                # A signal reaches the ranks at different moments: they agree on it, or they would part ways.
                stopping = processes.any_rank(stop.requested is not None, info, device)
                if stopping or (cfg.save_strategy == "steps" and state.step % cfg.save_steps == 0) or \
                        (cfg.save_strategy == "epoch" and epoch_end) or \
                        (cfg.load_best_model_at_end and state.best_step == state.step):  # the best must be kept
                    save_now()
                if stopping:
                    stopped = "interrupted"
                if state.step >= total_steps or stopped != "finished":
                    break
    bar.close()

    if stopped == "interrupted":
        if info.is_main:
            log.warning("stopped by %s at step %d and saved %s; to continue, run the same command with "
                        "--resume_from_checkpoint latest",
                        stop.requested or "a signal to another process", state.step,
                        out / f"{ckpt.PREFIX}{state.step}")
        processes.shutdown(info)
        return RunResult(out, state.step, last_loss, stopped, state.best_step, state.best_eval_loss)

    if cfg.eval_strategy != "no" and eval_ex and (not state.eval_history or state.eval_history[-1]["step"] !=
                                                  state.step):
        evaluate_now()
    adapter = adapter_state(model) if is_fsdp(model) else None  # gathered by every rank
    if info.is_main:
        from .finish import write_run_dir

        write_run_dir(cfg, model, tokenizer, out, state, stopped, adapter_state=adapter)
    processes.barrier(info)
    processes.shutdown(info)
    return RunResult(out, state.step, last_loss, stopped, state.best_step, state.best_eval_loss)
