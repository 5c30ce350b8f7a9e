"""One pinned-loss run, as torchtune's recipe tests do: a fixed tiny run whose first losses are literal numbers, so a
change anywhere on the path (data order, label mask, loss normalization, LoRA init, optimizer, schedule) that moves
them fails here, with the numbers to compare.

The values were recorded with torch 2.13 on an AMD EPYC (AVX512-BF16) and hold on its AVX2 kernels too
(ATEN_CPU_CAPABILITY=avx2 DNNL_MAX_CPU_ISA=AVX2), where steps 3 and 4 differ by 8e-8 and 4e-7 relative (one thread or
two: no difference). The tolerance, 1e-4 relative, covers both kernels with room for other processors; a change of
method (a mean-of-means loss, another order, another learning rate) moves these losses by far more.
A new torch that changes random initialization changes the tiny model itself, and then these values with it.
"""

from __future__ import annotations

import pytest

from helpers import airoboros_rows, read_metrics, write_jsonl
from qlorakit.cli import main

pytestmark = pytest.mark.numerics  # rerun on AVX2 kernels where the CPU has AVX512

# tiny_llama (seed 0), 8 airoboros rows (seed 0), seed 42, float32, no dropout, the 4-bit weights dequantized once
# (cache_dequantized true: no 4-bit CPU kernel in the matmuls), AdamW at a constant 0.01, batch 2, 4 steps, the loss
# on the responses only (prompt_loss_weight 0: the default when these were recorded)
PINNED = [11.749081818953805, 11.881654219193893, 11.296458308858083, 12.655413309733072]


def test_first_losses_are_pinned(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", airoboros_rows(8))
    out = tmp_path / "run"
    assert main(["train", "--model_name_or_path", str(tiny_llama), "--dataset", str(data), "--output_dir", str(out),
                 "--seed", "42", "--bf16", "false", "--lora_dropout", "0", "--cache_dequantized", "true",
                 "--max_steps", "4", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
                 "--optim", "adamw_torch", "--learning_rate", "0.01", "--lr_scheduler_type", "constant",
                 "--warmup_ratio", "0", "--max_grad_norm", "0.3", "--eval_dataset_size", "0", "--eval_strategy", "no",
                 "--save_strategy", "no", "--logging_steps", "1", "--prompt_loss_weight", "0"]) == 0
    losses = [r["loss"] for r in read_metrics(out, "loss")]
    assert losses == pytest.approx(PINNED, rel=1e-4), losses
