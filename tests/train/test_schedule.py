"""The step schedule: each rank's slice of every step, the triggers for logging, evaluation and saves, and one
optimizer step's result, skipped updates included."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import airoboros_rows, write_jsonl
from qlorakit.config import build_config
from qlorakit.data.batching import collate, epoch_order
from qlorakit.data.tokenize import IGNORE
from qlorakit.train.checkpoint import TrainState
from qlorakit.train.schedule import (epoch_steps, shard_step, should_evaluate, should_evaluate_at_end, should_log,
                                     should_save, steps_per_epoch, total_steps)
from qlorakit.train.objectives.sft import SFT, loss_sum
from qlorakit.train.step import TrainingStopped, accumulate, optimizer_step


# --- which examples each step takes on each rank ---------------------------------------------------------------

@pytest.mark.parametrize("n,world,micro,accum", [(16, 2, 2, 1), (5, 2, 2, 1), (7, 2, 1, 2), (9, 3, 2, 2),
                                                 (1, 4, 1, 1), (13, 2, 3, 2), (6, 2, 2, 1)])
def test_each_rank_reads_its_own_slice(n, world, micro, accum):
    ranks = [epoch_steps(n, 0, seed=3, micro=micro, accum=accum, world_size=world, rank=r) for r in range(world)]
    seen = []
    for steps in zip(*ranks):
        step = steps[0].examples
        assert all(s.examples == step for s in steps)  # every rank plans the same global step
        per_rank = [s.micro_batches for s in steps]
        # every rank runs as many forward/backward passes as rank 0, or DDP/FSDP collectives would wait forever
        assert len({len(b) for b in per_rank}) == 1
        assert all(len(b) <= accum and all(len(mb) <= micro for mb in b) for b in per_rank)
        got = [i for b in per_rank for mb in b for i in mb]
        assert got == step  # rank r holds the r-th consecutive slice of the step
        seen += got
    assert sorted(seen) == list(range(n))  # no example duplicated or dropped
    assert len(ranks[0]) == steps_per_epoch(n, micro, accum, world)


def test_one_process_steps_are_consecutive_micro_batches_of_the_seeded_order():
    """In one process a step is the next batch * accumulation examples of the epoch's order, cut into micro-batches,
    the same for batch k x GA 1 and batch 1 x GA k; another epoch has another order."""
    order = epoch_order(10, seed=3, epoch=1)
    steps = epoch_steps(10, 1, seed=3, micro=2, accum=2)
    assert [s.examples for s in steps] == [order[0:4], order[4:8], order[8:10]]
    assert [s.micro_batches for s in steps] == [[order[0:2], order[2:4]], [order[4:6], order[6:8]], [order[8:10]]]
    assert [s.examples for s in epoch_steps(10, 1, seed=3, micro=4, accum=1)] == [s.examples for s in steps]
    assert [s.examples for s in epoch_steps(10, 0, seed=3, micro=2, accum=2)] != [s.examples for s in steps]


def test_short_last_step_leaves_a_rank_empty_but_in_step():
    assert shard_step([4], 0, 2, 2, 1) == [[4]]
    assert shard_step([4], 1, 2, 2, 1) == [[]]  # no example: one zero-weighted pass
    assert shard_step([4, 5, 6], 0, 2, 1, 2) == [[4], [5]]
    assert shard_step([4, 5, 6], 1, 2, 1, 2) == [[6], []]  # fewer micro-batches: padded to rank 0's count


def test_total_steps_and_epoch_rollover():
    cfg = build_config(["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
                        "--num_train_epochs", "1.5"])
    assert steps_per_epoch(10, 2, 2) == 3 and steps_per_epoch(10, 2, 2, world_size=2) == 2
    assert total_steps(cfg, 10) == 5  # ceil(1.5 x 3)
    assert total_steps(build_config(["--max_steps", "7", "--num_train_epochs", "1"]), 10) == 7  # max_steps wins
    state = TrainState()
    seen = []
    for _ in range(5):
        state.advance(3)
        seen.append((state.step, state.epoch, state.step_in_epoch))
    assert seen == [(1, 0, 1), (2, 0, 2), (3, 1, 0), (4, 1, 1), (5, 1, 2)]


# --- when the loop logs, evaluates and saves: 2 epochs of 3 steps ----------------------------------------------

def steps_where(predicate, cfg, **kw) -> list[int]:
    return [s for s in range(1, 7) if predicate(cfg, s, s % 3 == 0, **kw)]


def test_evaluation_every_eval_steps_or_at_each_epoch_end():
    assert steps_where(should_evaluate, build_config(["--eval_strategy", "steps", "--eval_steps", "2"])) == [2, 4, 6]
    assert steps_where(should_evaluate, build_config(["--eval_strategy", "epoch", "--eval_steps", "2"])) == [3, 6]
    assert steps_where(should_evaluate, build_config(["--eval_strategy", "no"])) == []


def test_saves_every_save_steps_at_epoch_ends_on_a_signal_and_at_the_best_evaluation():
    steps = build_config(["--save_strategy", "steps", "--save_steps", "4"])
    assert steps_where(should_save, steps) == [4]
    assert steps_where(should_save, build_config(["--save_strategy", "epoch"])) == [3, 6]
    never = build_config(["--save_strategy", "no"])
    assert steps_where(should_save, never) == []
    assert steps_where(should_save, never, stopping=True) == [1, 2, 3, 4, 5, 6]  # a signal: save to be resumable
    # load_best_model_at_end must find the best step saved, save step or not; without it the best is not special
    best = build_config(["--save_strategy", "steps", "--save_steps", "4", "--load_best_model_at_end", "true"])
    assert steps_where(should_save, best, best_step=2) == [2, 4]
    assert steps_where(should_save, steps, best_step=2) == [4]


def test_logging_every_logging_steps_and_at_the_last_step():
    assert [s for s in range(1, 8) if should_log(build_config(["--logging_steps", "3"]), s, 7)] == [3, 6, 7]


def test_final_evaluation_unless_off_or_just_done():
    cfg = build_config(["--eval_strategy", "steps"])
    assert should_evaluate_at_end(cfg, 5, None) and should_evaluate_at_end(cfg, 5, 4)
    assert not should_evaluate_at_end(cfg, 5, 5)
    assert not should_evaluate_at_end(build_config(["--eval_strategy", "no"]), 5, None)


# --- one optimizer step ----------------------------------------------------------------------------------------

def adapter(run) -> dict:
    return {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}


def test_optimizer_step_returns_what_it_did_and_skips_a_nonfinite_update(tiny_llama, tmp_path):
    from qlorakit.train.fit import step_parts
    from qlorakit.train.setup import setup

    data = write_jsonl(tmp_path / "d.jsonl", airoboros_rows(6))
    run = setup(build_config(["--model_name_or_path", str(tiny_llama), "--dataset", str(data), "--output_dir",
                              str(tmp_path / "run"), "--per_device_train_batch_size", "2", "--max_steps", "3",
                              "--learning_rate", "0.01", "--warmup_ratio", "0", "--bf16", "false",
                              "--max_nonfinite_steps", "2", "--prompt_loss_weight", "0"]), progress=False)
    first, second = run.epoch_steps(0)[:2]
    before = adapter(run)
    result = optimizer_step(step_parts(run), first)
    examples = [run.train_ex[i] for i in first.examples]
    assert result.trained_tokens == sum(t != IGNORE for e in examples for t in e.labels[1:])  # replies only: a count
    assert result.tokens_seen == sum(len(e) for e in examples)  # packed: no padding to leave out
    assert (result.learning_rate, result.skipped) == (0.01, False)
    assert math.isfinite(result.loss) and result.loss > 0 and result.grad_norm > 0
    assert any(not torch.equal(before[k], v) for k, v in adapter(run).items())  # the adapter moved

    run.hooks.accumulate = lambda *a, **kw: accumulate(*a, **kw) * float("nan")  # a NaN loss, real gradients
    before = adapter(run)
    result = optimizer_step(step_parts(run), second)
    assert result.skipped and math.isnan(result.loss)
    assert all(torch.equal(before[k], v) for k, v in adapter(run).items())  # no update
    assert (run.state.nonfinite_in_a_row, run.state.skipped_steps) == (1, 1)
    with pytest.raises(TrainingStopped, match="2 steps in a row had a non-finite loss"):
        optimizer_step(step_parts(run), second)


def test_optimizer_step_needs_only_its_parts(tiny_llama, tmp_path):
    """No Run, no config: a LoRA model, SGD and a list of examples are a step. Its update is the plain SGD one
    (lr times the gradient of the token-mean loss), and the non-finite stop names the newest checkpoint in
    ``checkpoints`` (where working_dir puts them, not necessarily the run directory)."""
    from transformers import AutoModelForCausalLM

    from helpers import lora_model, random_examples
    from qlorakit.train.processes import DistInfo
    from qlorakit.train.schedule import ScheduledStep
    from qlorakit.train.step import StepParts

    model = lora_model(AutoModelForCausalLM.from_pretrained(tiny_llama, torch_dtype=torch.float32), 0.0, False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    examples, said = random_examples([5, 9, 7]), []
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "trainer_state.json").write_text("{}")
    parts = StepParts(model, params, optimizer, scheduler, SFT(), examples, 0, True, torch.device("cpu"), False,
                      DistInfo(), TrainState(), max_nonfinite_steps=1, checkpoints=tmp_path, say=said.append)
    step = ScheduledStep([0, 1, 2], [[0, 1], [2]])
    before = {id(p): p.detach().clone() for p in params}
    model.zero_grad()
    loss_sum(model, collate([examples[i] for i in range(3)], 0, True), torch.device("cpu"))[0].div(
        sum(len(e) - 1 for e in examples)).backward()
    want = {id(p): before[id(p)] - 0.1 * p.grad for p in params}
    model.zero_grad()
    result = optimizer_step(parts, step)
    assert result.trained_tokens == sum(len(e) - 1 for e in examples) and not result.skipped
    assert all(torch.allclose(p.detach(), want[id(p)], atol=1e-6) for p in params)
    parts.accumulate = lambda *a, **kw: float("nan")
    with pytest.raises(TrainingStopped, match=r"the last good checkpoint is .*checkpoint-3"):
        optimizer_step(parts, step)
    assert said and "non-finite loss nan" in said[0]
