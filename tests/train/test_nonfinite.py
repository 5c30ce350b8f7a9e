"""Non-finite numbers: a step whose loss or gradient is NaN/inf is skipped and logged; max_nonfinite_steps in a row
stop the run with one line, and the last good checkpoint stays intact."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import airoboros_rows, read_metrics, train_with, write_jsonl
from qlorakit.errors import UserError
from qlorakit.train import checkpoint as ckpt
from qlorakit.train.loop import TrainingStopped
from qlorakit.train.step import accumulate


def poison(bad_steps: set[int], kind: str):
    """A step.accumulate that makes the loss (kind 'loss') or one gradient (kind 'grad') non-finite in
    ``bad_steps`` (1-based), for the loop's ``accumulate`` hook; and the trainable parameters as they were at the
    start of each step."""
    before: list[dict] = []

    def poisoned(model, batches, *a, **kw):
        before.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        loss = accumulate(model, batches, *a, **kw)
        if len(before) in bad_steps:
            if kind == "loss":
                return float("nan")
            p = next(p for p in model.parameters() if p.requires_grad and p.grad is not None)
            p.grad.view(-1)[0] = float("inf")
        return loss

    return poisoned, before


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def run_args(model, data, out, *extra):
    return ["--model_name_or_path", str(model), "--dataset", str(data), "--output_dir", str(out),
            "--per_device_train_batch_size", "2", "--learning_rate", "0.01", "--warmup_ratio", "0", *extra]


def test_nonfinite_gradient_skips_one_update_and_training_goes_on(tiny_llama, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", airoboros_rows(6))
    out = tmp_path / "run"
    poisoned, before = poison({2}, "grad")
    result = train_with(run_args(tiny_llama, data, out, "--max_steps", "3", "--save_strategy", "no"),
                        accumulate=poisoned)
    assert (result.stopped, result.steps) == ("finished", 3)
    err = capsys.readouterr().err
    assert "step 2: non-finite" in err and "update skipped" in err, err
    assert not same(before[0], before[1])  # step 1 updated the adapter
    assert same(before[1], before[2])  # step 2 did not
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[1]["grad_norm"] is None  # non-finite is written as JSON null
    assert all(torch.isfinite(v).all() for v in load_file(out / "adapter_model.safetensors").values())


def test_nonfinite_loss_in_a_row_stops_with_last_good_checkpoint(tiny_llama, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", airoboros_rows(12))
    out = tmp_path / "run"
    poisoned, before = poison({3, 4, 5, 6}, "loss")
    with pytest.raises(TrainingStopped) as stopped:
        train_with(run_args(tiny_llama, data, out, "--max_steps", "6", "--save_strategy", "steps", "--save_steps", "2",
                            "--max_nonfinite_steps", "2"), accumulate=poisoned)
    message = str(stopped.value)  # a UserError: the command line prints it as one line and exits with 2
    assert isinstance(stopped.value, UserError) and "\n" not in message
    assert "2 steps in a row had a non-finite loss or gradient (last at step 4)" in message
    assert str(out / "checkpoint-2") in message and "learning_rate" in message
    err = capsys.readouterr().err
    assert "step 3: non-finite loss nan" in err and "step 4: non-finite loss nan" in err
    assert len(before) == 4  # stopped at step 4, never reached step 5
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-2"]
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["step"] == 2
    saved = load_file(out / "checkpoint-2" / "adapter_model.safetensors")
    assert all(torch.isfinite(v).all() for v in saved.values())
    last_good = before[2]  # the adapter at the start of step 3 == after step 2
    assert same(before[2], before[3])  # step 3's update was skipped
    by_key = {k.replace(".default", ""): v for k, v in last_good.items()}
    assert saved.keys() <= by_key.keys() and all(torch.equal(saved[k], by_key[k]) for k in saved)
