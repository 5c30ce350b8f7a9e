"""Fit: the step loop. Each step is planned by ``schedule``, run by ``step.optimizer_step``, logged, and followed by
the evaluations and saves the schedule's predicates ask for; a signal ends the run with a checkpoint."""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass

from ..metrics import LABELS, METRICS
from ..model.cuda import peak_memory, reset_peak_memory
from ..model.lora import unwrap
from . import checkpoint as ckpt
from . import processes
from .distributed import adapter_state, is_fsdp, optimizer_state
from .mmlu import mmlu_scores
from .schedule import should_evaluate, should_evaluate_at_end, should_log, should_save
from .setup import Run
from .step import StepParts, StepResult, TrainingStopped, optimizer_step
from .validate import improved, metric_key

log = logging.getLogger("qlorakit")


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


@dataclass
class FitOutcome:
    stopped: str = "finished"  # "finished", "early_stopping", "interrupted"
    last_loss: float | None = None
    signal: str | None = None  # the signal that interrupted this process (None: it reached another rank)


class Throughput:
    """Real tokens per second since the last logged step."""

    def __init__(self):
        self.tokens, self.since = 0, time.perf_counter()

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def take(self) -> float:
        """Tokens per second since the last call (or the start), and start counting again."""
        elapsed = time.perf_counter() - self.since
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        self.tokens, self.since = 0, time.perf_counter()
        return rate


def fit(run: Run) -> FitOutcome:
    """Train from ``run.state`` to ``run.total_steps``, or until early stopping or a signal; then evaluate the last
    step unless it was just evaluated (or the run was interrupted)."""
    state, outcome, meter = run.state, FitOutcome(), Throughput()
    reset_peak_memory(run.device)  # the CUDA peak of training, not of loading
    run.model.train()
    with StopRequest() as stop:
        while state.step < run.total_steps and outcome.stopped == "finished":
            steps = run.epoch_steps(state.epoch)
            for scheduled in steps[state.step_in_epoch:]:
                result = optimizer_step(step_parts(run), scheduled)
                state.advance(len(steps))
                outcome.last_loss = result.loss
                log_step(run, result, meter)
                outcome.stopped = evaluate_and_save(run, stop)
                if state.step >= run.total_steps or outcome.stopped != "finished":
                    break
    outcome.signal = stop.requested
    run.bar.close()
    if outcome.stopped != "interrupted" and (run.eval_ex or run.mmlu):
        last_eval = state.eval_history[-1]["step"] if state.eval_history else None
        if should_evaluate_at_end(run.cfg, state.step, last_eval) and evaluate(run):
            outcome.stopped = "early_stopping"
    return outcome


def step_parts(run: Run) -> StepParts:
    """What ``step.optimizer_step`` needs of the run, built at each step (a test may swap ``run.hooks.accumulate``)."""
    cfg = run.cfg
    return StepParts(run.model, run.params, run.optimizer, run.scheduler, run.objective, run.train_ex, run.pad_id,
                     run.packing, run.device, run.use_bf16, run.info, run.state, max_grad_norm=cfg.max_grad_norm,
                     max_nonfinite_steps=cfg.max_nonfinite_steps, max_tokens_per_batch=cfg.max_tokens_per_batch,
                     offload_activations=cfg.offload_activations, chunked_loss=run.chunked_loss,
                     checkpoints=run.ckpt_dir, say=run.bar.write, accumulate=run.hooks.accumulate)


def log_step(run: Run, result: StepResult, meter: Throughput) -> None:
    """A metrics row and a progress line every ``logging_steps`` steps and at the last."""
    meter.add(result.tokens_seen)
    step = run.state.step
    if not should_log(run.cfg, step, run.total_steps, epoch_end=run.state.step_in_epoch == 0):
        return
    epoch, tok_s = round(step / run.steps_per_epoch, 4), meter.take()
    row = {"step": step, "epoch": epoch, "loss": result.loss, "learning_rate": result.learning_rate,
           "grad_norm": result.grad_norm, "tokens_per_second": tok_s,
           "trained_tokens": result.trained_tokens} | result.metrics | peak_memory(run.device)
    run.metrics.write(row)
    run.bar.update(row)


def evaluate_and_save(run: Run, stop: StopRequest) -> str:
    """The evaluation and the checkpoint this step calls for; how the run goes on ("finished": it does)."""
    state, cfg = run.state, run.cfg
    epoch_end = state.step_in_epoch == 0
    stopped = "finished"
    if should_evaluate(cfg, state.step, epoch_end) and evaluate(run):
        stopped = "early_stopping"
    # A signal reaches the ranks at different moments: they agree on it, or they would part ways.
    stopping = processes.any_rank(stop.requested is not None, run.info, run.device)
    if should_save(cfg, state.step, epoch_end, best_step=state.best_step, stopping=stopping):
        save(run)  # the best evaluation is always saved, because load_best_model_at_end must find it
    return "interrupted" if stopping else stopped


def scores(run: Run) -> dict:
    """This step's evaluation: the held-out loss (where there is an eval split), answers to eval_generate of its
    examples scored against their references, and MMLU (do_mmlu_eval)."""
    cfg, res = run.cfg, {}
    kw = dict(batch_size=cfg.per_device_eval_batch_size, pad_id=run.pad_id, device=run.device, use_bf16=run.use_bf16)
    if run.eval_ex:
        more = {"objective": run.objective} if run.objective.preference else {}
        res.update(run.hooks.evaluate(run.model, run.eval_ex, packing=run.packing, **kw, **more))
        # answers need a prompt/reply boundary: none with train_on_source; a preference pair is scored by its rewards
        if cfg.eval_generate and not cfg.train_on_source and not run.objective.preference:
            res.update(run.hooks.answer(run.model, run.tokenizer, run.eval_ex, n=cfg.eval_generate,
                                        prompt_format=cfg.prompt_format, max_new_tokens=cfg.eval_max_new_tokens,
                                        batch_size=cfg.per_device_eval_batch_size, info=run.info,
                                        fsdp=is_fsdp(run.model)))
    if run.mmlu is not None:
        res.update(mmlu_scores(run.model, run.mmlu, **kw))
    return res


def eval_line(run: Run, res: dict) -> str:
    """The progress line of an evaluation: loss, the answer metrics, MMLU."""
    shown = [f"loss {res['eval_loss']:.4f}" + (f" perplexity {res['eval_perplexity']:.2f}" if "eval_perplexity" in res
                                                else "")] if "eval_loss" in res else []
    if "eval_rewards/accuracies" in res:  # a preference method's
        shown.append(f"reward accuracy {res['eval_rewards/accuracies']:.4f}")
    shown += [f"{LABELS[m]} {res[metric_key(m)]:.4f}" for m in METRICS if metric_key(m) in res]
    if run.mmlu is not None:
        shown.append(f"MMLU {run.mmlu.split} accuracy {res[f'mmlu_{run.mmlu.split}_accuracy']:.4f}")
    return f"eval at step {run.state.step}: {', '.join(shown)}"


def evaluate(run: Run) -> bool:
    """The held-out scores at this step: a metrics row, a line, the best so far (by metric_for_best_model) updated.
    True when early stopping's patience has run out."""
    state, cfg = run.state, run.cfg
    if not run.eval_ex and run.mmlu is None:
        return False
    res = scores(run)
    row = {"step": state.step, "epoch": round(state.step / run.steps_per_epoch, 4), **res}
    run.metrics.write(row)
    state.eval_history.append(row)
    run.bar.write(eval_line(run, res))
    metric, key = cfg.metric_for_best_model, metric_key(cfg.metric_for_best_model)
    if key not in res:
        return False
    if improved(metric, res[key], state.best_metric):
        state.best_metric, state.best_step, state.evals_without_improvement = res[key], state.step, 0
        state.best_eval_loss = res.get("eval_loss")
        return False
    state.evals_without_improvement += 1
    if not (cfg.early_stopping_patience and state.evals_without_improvement >= cfg.early_stopping_patience):
        return False
    if run.info.is_main:
        better = "lower eval loss" if key == "eval_loss" else f"higher {LABELS[metric]}"
        log.info("early stopping: no %s in %d evaluations; the best was at step %d", better,
                 state.evals_without_improvement, state.best_step)
    return True


def save(run: Run) -> None:
    """``checkpoint-STEP`` (every rank gathers its share; rank 0 writes), then the oldest pruned."""
    adapter = adapter_state(run.model)
    opt_state = optimizer_state(run.model, run.optimizer)  # every rank: gathers under FSDP
    rank_rngs = processes.gather_objects(ckpt.rng_state(), run.info)
    if run.info.is_main:
        write_checkpoint(run, adapter, opt_state, rank_rngs)
    processes.barrier(run.info)


def write_checkpoint(run: Run, adapter: dict, opt_state: dict, rank_rngs: list) -> None:
    """Rank 0's part of ``save``. A failed write ends the run with one line; the previous checkpoint is intact."""
    from safetensors import SafetensorError

    state, out, cfg = run.state, run.ckpt_dir, run.cfg
    try:
        ckpt.save_checkpoint(out, unwrap(run.model), run.optimizer, run.scheduler, state, cfg,
                             adapter_state=adapter, optimizer_state=opt_state, rank_rng_states=rank_rngs)
    except (OSError, SafetensorError) as e:  # SafetensorError: an I/O error writing the adapter
        last = ckpt.list_checkpoints(out)
        keep = f"; {last[-1].name} is intact" if last else ""
        why = getattr(e, "strerror", None) or e
        raise TrainingStopped(f"saving checkpoint-{state.step} failed: {why}{keep}") from None
    best = out / f"{ckpt.PREFIX}{state.best_step}" if state.best_step is not None else None
    for gone in ckpt.prune_checkpoints(out, cfg.save_total_limit, best):
        log.info("removed %s (save_total_limit %d)", gone.name, cfg.save_total_limit)
