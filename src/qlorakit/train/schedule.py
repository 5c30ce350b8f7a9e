"""The step schedule: which examples each optimizer step takes on each rank, and at which steps the loop logs,
evaluates and saves. Pure functions of the config and the step counter; the loop, the tests and
benchmarks/vs_trl.py all plan steps through ``epoch_steps``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import TrainConfig
from ..data.batching import epoch_order, pack_by_token_budget, plan_steps


@dataclass(frozen=True)
class ScheduledStep:
    """One optimizer step of an epoch: every example of it (all ranks), and this rank's micro-batches."""

    examples: list[int]
    micro_batches: list[list[int]]  # an empty one: this rank has no example left in a short last step


def steps_per_epoch(n_examples: int, micro: int, accum: int, world_size: int = 1) -> int:
    return math.ceil(n_examples / (micro * accum * world_size))


def total_steps(cfg: TrainConfig, n_examples: int, world_size: int = 1, lengths=None) -> int:
    """Optimizer steps of the whole run: ``max_steps`` when set, else ``num_train_epochs`` epochs. Under a token
    budget (``lengths`` given) an epoch's step count follows its packing, so each epoch is counted."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    if cfg.max_tokens_per_batch and lengths is not None:
        whole, part = int(cfg.num_train_epochs), cfg.num_train_epochs % 1
        counts = [len(budget_steps(lengths, e, seed=cfg.seed, budget=cfg.max_tokens_per_batch,
                                   accum=cfg.gradient_accumulation_steps, world_size=world_size))
                  for e in range(whole + (part > 0))]
        return sum(counts[:whole]) + (math.ceil(part * counts[-1]) if part > 0 else 0)
    per_epoch = steps_per_epoch(n_examples, cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps,
                                world_size)
    return math.ceil(cfg.num_train_epochs * per_epoch)


def epoch_steps(n_examples: int, epoch: int, *, seed: int, micro: int, accum: int, world_size: int = 1,
                rank: int = 0, lengths: list[int] | None = None) -> list[ScheduledStep]:
    """The optimizer steps of ``epoch`` in order. Each takes the next ``micro * accum * world_size`` examples of
    the epoch's seeded order (``lengths``: group similar lengths, as ``group_by_length`` does), and rank ``rank``
    reads its own slice of them (``shard_step``)."""
    order = epoch_order(n_examples, seed, epoch, lengths, micro if lengths else None)
    return [ScheduledStep(step, shard_step(step, rank, world_size, micro, accum))
            for (step,) in plan_steps(order, micro * accum * world_size, 1)]


def budget_steps(lengths, epoch: int, *, seed: int, budget: int, accum: int, world_size: int = 1,
                 rank: int = 0) -> list[ScheduledStep]:
    """The optimizer steps of ``epoch`` under a token budget: the seeded epoch order packed into micro-batches of at
    most ``budget`` tokens (``pack_by_token_budget``), ``accum * world_size`` of them per step, rank ``rank``
    taking its ``accum`` consecutive ones. As with ``epoch_steps``, a short last step leaves later ranks empty
    micro-batches to run as zero-weighted fillers."""
    lengths = [int(n) for n in lengths]
    bins = pack_by_token_budget(epoch_order(len(lengths), seed, epoch), lengths, budget, seed=seed,
                                epoch=epoch).bins
    per_step = accum * world_size
    steps = []
    for s in range(0, len(bins), per_step):
        chunk = bins[s:s + per_step]
        mine = shard_step(list(range(len(chunk))), rank, world_size, 1, accum)
        steps.append(ScheduledStep([i for b in chunk for i in b], [[i for k in ids for i in chunk[k]] for ids in mine]))
    return steps


def shard_step(step: list[int], rank: int, world_size: int, micro: int, accum: int) -> list[list[int]]:
    """This rank's micro-batches of one optimizer step (``step``: the example indices of the whole step).

    Rank r takes the r-th slice of ``micro * accum`` consecutive examples. A short last step leaves later ranks
    fewer examples or none; their list is padded with empty micro-batches up to the count of rank 0 (the busiest),
    because every rank must run as many forward and backward passes as the others: DDP all-reduces in the last
    backward and FSDP gathers parameters in every forward. The caller runs an empty micro-batch as a zero-weighted
    forward and backward of some example, which adds nothing to the gradients but joins the collectives.
    """
    per_rank = micro * accum
    mine = step[rank * per_rank:(rank + 1) * per_rank]
    batches = [mine[j:j + micro] for j in range(0, len(mine), micro)]
    busiest = math.ceil(min(len(step), per_rank) / micro)
    return batches + [[] for _ in range(busiest - len(batches))]


# When the loop logs, evaluates and saves: ``step`` is the number of optimizer steps taken, ``epoch_end`` whether
# that step finished an epoch.

def should_log(cfg: TrainConfig, step: int, total: int, epoch_end: bool = False) -> bool:
    """logging_strategy steps: every logging_steps steps and the last; epoch: at each epoch's end and the last."""
    if cfg.logging_strategy == "no":
        return False
    if cfg.logging_strategy == "epoch":
        return epoch_end or step == total
    return step % cfg.logging_steps == 0 or step == total


def should_evaluate(cfg: TrainConfig, step: int, epoch_end: bool) -> bool:
    return (cfg.eval_strategy == "steps" and step % cfg.eval_steps == 0) or \
        (cfg.eval_strategy == "epoch" and epoch_end)


def should_save(cfg: TrainConfig, step: int, epoch_end: bool, *, best_step: int | None = None,
                stopping: bool = False) -> bool:
    """``stopping``: a signal asked the run to stop (it saves to be resumable); ``best_step``: the step of the best
    evaluation so far, which load_best_model_at_end must find saved."""
    return stopping or (cfg.save_strategy == "steps" and step % cfg.save_steps == 0) or \
        (cfg.save_strategy == "epoch" and epoch_end) or (cfg.load_best_model_at_end and best_step == step)


def should_evaluate_at_end(cfg: TrainConfig, step: int, last_eval_step: int | None) -> bool:
    """After the last step: evaluate unless evaluation is off or that step was just evaluated."""
    return cfg.eval_strategy != "no" and last_eval_step != step
