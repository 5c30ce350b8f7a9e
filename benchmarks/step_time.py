"""Seconds per optimizer step of the closed benchmark job, forward and backward only (``step.accumulate``), for
A/B checks of a change to the loop: run it before and after, on the same core, and compare the sums.

    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/step_time.py               # bf16, checkpointing off
    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/step_time.py --bf16 false --steps 4

The job is benchmarks/vs_trl.py's (the embedded SmolLM2-135M-Instruct, 4-bit NF4 double-quant, LoRA r 16 alpha 32
dropout 0.05 on all linear layers, batch 4, the closed-context rows), run through ``qlorakit.train.loop.train`` with
its ``accumulate`` timed. The first two steps are warm-up and left out of the sum. One core pinned gives steadier
numbers than two on a shared machine (two threads wait for each other whenever one is descheduled).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data" / "closed_context_64.jsonl"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="model_name_or_path (default: the embedded SmolLM2)")
    p.add_argument("--bf16", choices=("true", "false"), default="true")
    p.add_argument("--gradient_checkpointing", choices=("true", "false"), default="false")
    p.add_argument("--steps", type=int, default=8, help="steps to run, the first two warm-up (default 8)")
    args = p.parse_args(argv)

    from qlorakit.config import build_config
    from qlorakit.train.loop import Hooks, train
    from _step_timer import timed_accumulate

    seconds: list[float] = []
    timed = timed_accumulate(seconds)

    with tempfile.TemporaryDirectory() as out:
        cfg = build_config([
            "--model_name_or_path", args.model, "--dataset", str(DATA), "--dataset_format", "airoboros",
            "--prompt_format", "airoboros", "--bf16", args.bf16, "--gradient_checkpointing",
            args.gradient_checkpointing, "--lora_r", "16", "--lora_alpha", "32", "--lora_dropout", "0.05",
            "--lora_modules", "all", "--per_device_train_batch_size", "4", "--max_steps", str(args.steps),
            "--eval_strategy", "no", "--save_strategy", "no", "--logging_steps", "1", "--seed", "42",
            "--prompt_loss_weight", "0", "--output_dir", str(Path(out) / "run")])
        train(cfg, progress=False, hooks=Hooks(accumulate=timed))
    print("seconds per step:", [round(s, 2) for s in seconds])
    print(f"sum after {min(2, len(seconds))} warm-up steps: {sum(seconds[2:]):.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
