"""What the quality levers cost: seconds per optimizer step (forward and backward, ``step.accumulate``), setup
seconds and peak RSS of each variant against plain LoRA, every variant in a fresh process so peaks are its own.

    OMP_NUM_THREADS=2 python benchmarks/levers_cost.py                                  # plain vs DoRA, 4-bit base
    OMP_NUM_THREADS=2 python benchmarks/levers_cost.py --variants plain dora loftq neftune --cache_dequantized true
    OMP_NUM_THREADS=1 python benchmarks/levers_cost.py --slim 1024 --steps 8 --rounds 2    # seconds, not minutes

The job is benchmarks/step_time.py's (the embedded SmolLM2-135M-Instruct, 4-bit NF4 double-quant, LoRA r 16 alpha 32
dropout 0.05 on all linear layers, batch 4, the closed-context rows), in float32 (bf16 false) with checkpointing
off. ``--cache_dequantized false`` keeps the bitsandbytes 4-bit layers (DoRA then runs on peft's Linear4bit and
dequantizes the weight for its norm on every call); ``true`` gives DoRA dense layers. Variants run in the order
given, ``--rounds`` times alternately, so a busy neighbour on a shared machine slows them alike. The first two steps
of each run are warm-up and left out.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data" / "closed_context_64.jsonl"
# Each variant's flags on the job below. plain is LoRA with the loss on the responses only, the baseline every
# lever changes one thing from; prompt_weight trains the prompts too, at weight 0.1 (qlorakit's small-model default).
RESPONSES = ["--prompt_loss_weight", "0"]
VARIANTS = {"plain": RESPONSES, "dora": RESPONSES + ["--use_dora", "true"],
            "loftq": RESPONSES + ["--init_lora_weights", "loftq"], "rslora": RESPONSES + ["--use_rslora", "true"],
            "loraplus": RESPONSES + ["--loraplus_lr_ratio", "16"],
            "neftune": RESPONSES + ["--neftune_noise_alpha", "5"], "prompt_weight": ["--prompt_loss_weight", "0.1"]}


def child(variant: str, steps: int, cache: str, model: str) -> dict:
    """One run of ``variant`` in this process: its step times, setup time and peak RSS."""
    from qlorakit.config import build_config
    from qlorakit.train.loop import Hooks, train
    from _step_timer import timed_accumulate

    seconds: list[float] = []
    timed = timed_accumulate(seconds)

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        cfg = build_config([
            "--model_name_or_path", model, "--dataset", str(DATA), "--dataset_format", "airoboros",
            "--prompt_format", "airoboros", "--bf16", "false", "--gradient_checkpointing", "false",
            "--cache_dequantized", cache, "--lora_r", "16", "--lora_alpha", "32", "--lora_dropout", "0.05",
            "--lora_modules", "all", "--per_device_train_batch_size", "4", "--max_steps", str(steps),
            "--eval_strategy", "no", "--save_strategy", "no", "--seed", "42", "--output_dir", str(Path(out) / "run"),
            *VARIANTS[variant]])
        train(cfg, progress=False, hooks=Hooks(accumulate=timed))
    total = time.perf_counter() - t0
    return {"variant": variant, "step_s": seconds[2:], "setup_s": total - sum(seconds),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


SLIM_VARIANTS = ("plain", "dora", "rslora", "loftq")


def slim_child(variant: str, steps: int, tokens: int) -> dict:
    """``--slim``: a 2-layer LLaMA with SmolLM2-135M's widths (hidden 576, MLP 1536, 9 heads, 3 KV heads; random
    weights, vocabulary 2048) loaded in 4-bit NF4 (bitsandbytes layers kept: no cache_dequantized), LoRA r 16 on
    every linear layer through qlorakit's add_lora; one step = forward and backward of one packed row of ``tokens``
    random tokens. The same per-layer work as the embedded job's, in seconds rather than minutes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlorakit.model.load import load_base_model
    from qlorakit.model.lora import add_lora, target_modules

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(vocab_size=2048, hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                                     num_attention_heads=9, num_key_value_heads=3)).save_pretrained(d)
        base = load_base_model(d, bits=4, bf16=False, device=torch.device("cpu"))
        model = add_lora(base, r=16, alpha=32, dropout=0.05, modules=target_modules(base, "all"), seed=0,
                         dora=variant == "dora", rslora=variant == "rslora",
                         init="loftq" if variant == "loftq" else "default", base_path=d)
    model.train()
    ids = torch.randint(0, 2048, (1, tokens), generator=torch.Generator().manual_seed(0))
    seconds = []
    for _ in range(steps):
        t1 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        seconds.append(time.perf_counter() - t1)
    total = time.perf_counter() - t0
    return {"variant": variant, "step_s": seconds[2:], "setup_s": total - sum(seconds),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=["plain", "dora"], choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=6, help="steps per run, the first two warm-up (default 6)")
    p.add_argument("--rounds", type=int, default=1, help="runs of each variant, alternating (default 1)")
    p.add_argument("--cache_dequantized", choices=("true", "false"), default="false")
    p.add_argument("--model", default="default")
    p.add_argument("--slim", type=int, default=0, metavar="TOKENS",
                   help="instead of the embedded job, slim_child's 2-layer model of SmolLM2's widths, one packed "
                   "row of TOKENS tokens per step (e.g. 1024)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.slim and set(args.variants) - set(SLIM_VARIANTS):
        p.error(f"--slim measures {', '.join(SLIM_VARIANTS)} (the levers of the model, not of the training step)")
    if args.child:
        result = slim_child(args.child, args.steps, args.slim) if args.slim else \
            child(args.child, args.steps, args.cache_dequantized, args.model)
        print("RESULT " + json.dumps(result))
        return 0
    results: dict[str, list[dict]] = {v: [] for v in args.variants}
    for _ in range(args.rounds):
        for v in args.variants:
            cmd = [sys.executable, __file__, "--child", v, "--steps", str(args.steps), "--cache_dequantized",
                   args.cache_dequantized, "--model", args.model, "--slim", str(args.slim)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            results[v].append(json.loads(out.split("RESULT ", 1)[1]))
    base = None
    job = f"slim 2-layer model, {args.slim} tokens" if args.slim else f"cache_dequantized {args.cache_dequantized}"
    print(f"{job}, {args.steps - 2} timed steps per run, {args.rounds} round(s)", flush=True)
    print(f"{'variant':<14}{'s/step':>9}{'x plain':>9}{'setup s':>9}{'peak RSS MiB':>14}{'x plain':>9}")
    for v, runs in results.items():
        step = statistics.median([s for r in runs for s in r["step_s"]])
        rss = max(r["peak_rss_mib"] for r in runs)
        setup = statistics.median(r["setup_s"] for r in runs)
        base = base or (step, rss)
        print(f"{v:<14}{step:>9.2f}{step / base[0]:>9.2f}{setup:>9.1f}{rss:>14.0f}{rss / base[1]:>9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
