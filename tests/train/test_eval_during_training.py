"""Evaluation during training: eval rows in metrics.jsonl, a separate eval file, the best adapter left at the root,
early stopping, and the best epoch named in the log and the model card."""

from __future__ import annotations

import logging
import math

from safetensors.torch import load_file

from helpers import airoboros_rows, read_metrics, scripted_eval, train_with, write_jsonl
from qlorakit.cli import main


def test_eval_steps_with_an_eval_file(tiny_llama, tmp_path, caplog):
    data = write_jsonl(tmp_path / "train.jsonl", airoboros_rows(8))
    held = write_jsonl(tmp_path / "held.jsonl", airoboros_rows(3, seed=1))
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="qlorakit"):
        assert main(["train", "--model_name_or_path", str(tiny_llama), "--dataset", str(data), "--eval_dataset",
                     str(held), "--output_dir", str(out), "--eval_strategy", "steps", "--eval_steps", "2",
                     "--max_steps", "5", "--per_device_train_batch_size", "2", "--save_strategy", "no",
                     "--learning_rate", "0.01"]) == 0
    assert f"eval: 3 rows from {held}" in caplog.text
    evals = read_metrics(out, "eval_loss")
    # every eval_steps, and once more at the end (4 steps per epoch)
    assert [(r["step"], r["epoch"]) for r in evals] == [(2, 0.5), (4, 1.0), (5, 1.25)]
    for r in evals:
        assert {"step", "epoch", "eval_loss", "eval_perplexity"} <= set(r)
        assert math.isfinite(r["eval_loss"]) and r["eval_perplexity"] == math.exp(r["eval_loss"])
    assert [r["step"] for r in read_metrics(out, "loss")] == [1, 2, 3, 4, 5]
    best = min(evals, key=lambda r: r["eval_loss"])
    assert (f"best eval loss {best['eval_loss']:.4f} at step {best['step']} (epoch {best['epoch']:.2f})"
            in caplog.text)
    card = (out / "README.md").read_text()
    assert (f"**Best evaluation: epoch {best['epoch']:.2f} (step {best['step']}), eval loss "
            f"{best['eval_loss']:.4f}.**") in card
    for r in evals:
        assert f"| {r['step']} | {r['epoch']:.2f} | {r['eval_loss']:.4f} |" in card


def test_early_stopping_leaves_the_best_adapter_at_the_root(tiny_llama, tmp_path, caplog):
    """The best evaluation (step 2) is not a save step: it is saved anyway, because load_best_model_at_end needs it;
    two evaluations without improvement stop the run at step 4 of 8."""
    data = write_jsonl(tmp_path / "train.jsonl", airoboros_rows(10))
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="qlorakit"):
        result = train_with(["--model_name_or_path", str(tiny_llama), "--dataset", str(data), "--output_dir",
                             str(out), "--eval_dataset_size", "2", "--eval_strategy", "steps", "--eval_steps", "1",
                             "--early_stopping_patience", "2", "--load_best_model_at_end", "true", "--save_strategy",
                             "steps", "--save_steps", "3", "--max_steps", "8", "--per_device_train_batch_size", "2",
                             "--learning_rate", "0.01"], evaluate=scripted_eval([2.0, 1.0, 3.0, 4.0, 5.0]))
    assert (result.stopped, result.best_step, result.best_eval_loss) == ("early_stopping", 2, 1.0)
    assert [r["step"] for r in read_metrics(out, "loss")] == [1, 2, 3, 4]  # stopped early
    assert [r["eval_loss"] for r in read_metrics(out, "eval_loss")] == [2.0, 1.0, 3.0, 4.0]
    assert "early stopping" in caplog.text
    assert (out / "checkpoint-2").is_dir()
    best, root = load_file(out / "checkpoint-2" / "adapter_model.safetensors"), load_file(
        out / "adapter_model.safetensors")
    assert best.keys() == root.keys() and all((best[k] == root[k]).all() for k in best)
    last = load_file(out / "checkpoint-3" / "adapter_model.safetensors")  # a later adapter differs
    assert any((last[k] != root[k]).any() for k in last)
    assert "the adapter at the root is checkpoint-2's (eval loss 1.0000)" in caplog.text
    assert "best eval loss 1.0000 at step 2 (epoch 0.50)" in caplog.text
    card = (out / "README.md").read_text()
    assert "**Best evaluation: epoch 0.50 (step 2), eval loss 1.0000.**" in card
    assert "The run stopped early" in card
