"""Training on a CUDA device (skipped where there is none; benchmarks/gpu/run.sh runs them): one bf16 CUDA step
agrees with the float32 CPU step, a checkpoint written on the GPU resumes there as the uninterrupted run goes on,
and Liger's kernels change no number beyond bf16 rounding.

Each run is its own ``python -m qlorakit train`` process, so the CPU one can be given no GPU at all
(CUDA_VISIBLE_DEVICES empty) and each picks its device as a user's run does."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import SGD_ONE_STEP, adapter_weights, airoboros_rows, read_metrics, rel_diff, write_jsonl

pytestmark = pytest.mark.cuda


def train(args: list[str], out: Path, gpu: bool = True) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run([sys.executable, "-m", "qlorakit", "train", *args, "--output_dir", str(out)], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]


def test_a_bf16_cuda_step_agrees_with_the_float32_cpu_step(tiny_llama, tmp_path):
    """With lora_B at zero the first loss is the base model's: bf16 on the GPU within 1% of float32 on the CPU. One
    SGD step later the learned lora_B agree within 5% (bf16 gradients), and the GPU run logged its peak memory."""
    data = write_jsonl(tmp_path / "d.jsonl", airoboros_rows(8))
    common = ["--model_name_or_path", str(tiny_llama), "--dataset", str(data), *SGD_ONE_STEP,
              "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2"]
    train([*common, "--bf16", "false"], tmp_path / "cpu", gpu=False)
    train([*common, "--bf16", "true"], tmp_path / "cuda")
    cpu, cuda = read_metrics(tmp_path / "cpu", "loss")[0], read_metrics(tmp_path / "cuda", "loss")[0]
    assert "peak_allocated_gib" not in cpu and cuda["peak_allocated_gib"] > 0
    assert cuda["loss"] == pytest.approx(cpu["loss"], rel=1e-2)
    assert cuda["trained_tokens"] == cpu["trained_tokens"]
    b_cpu, b_cuda = adapter_weights(tmp_path / "cpu", only_b=True), adapter_weights(tmp_path / "cuda", only_b=True)
    assert rel_diff(b_cpu, b_cuda) < 5e-2


def test_a_gpu_checkpoint_resumes_as_the_run_would_have_gone_on(tiny_llama, tmp_path):
    """Checkpoint-4 of an 8-step GPU run (AdamW, cosine schedule, dropout), resumed in a fresh directory: steps 5-8
    log the uninterrupted run's losses and end at its adapter (to CUDA's run-to-run rounding)."""
    data = write_jsonl(tmp_path / "d.jsonl", airoboros_rows(12))
    common = ["--model_name_or_path", str(tiny_llama), "--dataset", str(data), "--optim", "adamw_torch",
              "--lr_scheduler_type", "cosine", "--warmup_ratio", "0.25", "--lora_dropout", "0.1", "--max_steps", "8",
              "--save_strategy", "steps", "--save_steps", "4", "--per_device_train_batch_size", "2",
              "--learning_rate", "0.01", "--eval_dataset_size", "0", "--bf16", "true"]
    full = tmp_path / "full"
    train(common, full)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-4", resumed / "checkpoint-4")
    train([*common, "--resume_from_checkpoint", "latest"], resumed)
    after = [r for r in read_metrics(resumed, "loss") if r["step"] > 4]
    want = [r for r in read_metrics(full, "loss") if r["step"] > 4]
    assert [r["step"] for r in after] == [5, 6, 7, 8]
    assert [r["loss"] for r in after] == pytest.approx([r["loss"] for r in want], rel=1e-3)
    assert rel_diff(adapter_weights(full), adapter_weights(resumed)) < 1e-3


def test_liger_kernels_change_no_number_beyond_bf16_rounding(tiny_llama, tmp_path):
    """use_liger_kernel true (RMSNorm, SwiGLU, RoPE by Liger's Triton kernels) against false: the same first loss and
    the same learned lora_B after one SGD step, to bf16 rounding."""
    data = write_jsonl(tmp_path / "d.jsonl", airoboros_rows(8))
    common = ["--model_name_or_path", str(tiny_llama), "--dataset", str(data), *SGD_ONE_STEP, "--bf16", "true",
              "--per_device_train_batch_size", "4"]
    train([*common, "--use_liger_kernel", "false"], tmp_path / "stock")
    train([*common, "--use_liger_kernel", "true"], tmp_path / "liger")
    stock, fused = read_metrics(tmp_path / "stock", "loss")[0], read_metrics(tmp_path / "liger", "loss")[0]
    assert fused["loss"] == pytest.approx(stock["loss"], rel=1e-2)
    b_stock = adapter_weights(tmp_path / "stock", only_b=True)
    assert rel_diff(b_stock, adapter_weights(tmp_path / "liger", only_b=True)) < 5e-2
