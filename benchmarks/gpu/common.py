"""What the GPU benchmark's parts share: the model shapes, the job, the data (the same packed rows for every tool),
the FLOP count and the timing summary. Imports nothing heavy at module level; each part is its own process."""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))  # vs_trl.py: the FLOP count both benchmarks use
sys.path.insert(0, str(ROOT / "src"))
os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"})

# Randomly initialised models of these shapes (LlamaConfig keywords). "tiny" is the CPU dry run's.
SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rope_theta=10000.0,
                      rms_norm_eps=1e-5),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                      rms_norm_eps=1e-5),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048, rms_norm_eps=1e-5),
}

# The job, the same for every tool.
JOB = dict(quant="nf4, double quantization, bf16 compute", lora_r=16, lora_alpha=32.0, lora_dropout=0.0,
           lora_modules="all linear layers but the head", precision="bf16 autocast, LoRA weights float32",
           row_tokens=2048, rows_per_step=4, grad_accum=1, optimizer="AdamW (fused on CUDA)", lr=2e-4,
           max_grad_norm=0.3, gradient_checkpointing=True, warmup_steps=2, measured_steps=8, seed=0,
           data="random token ids, example lengths 20-2,048 (log-normal, median ~200), every token trained")


def job_for(tiny: bool) -> dict:
    """The job; the CPU dry run keeps its shape but runs fewer, shorter steps."""
    return {**JOB, "row_tokens": 256, "warmup_steps": 1, "measured_steps": 2} if tiny else dict(JOB)


def example_lengths(n: int, max_len: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [min(max_len, max(20, int(rng.lognormvariate(5.3, 0.9)))) for _ in range(n)]


def packed_steps(vocab: int, job: dict) -> list[list[list[list[int]]]]:
    """The data of every step: steps -> rows (bins of at most ``row_tokens``) -> examples -> token ids.

    Packed once here with qlorakit's token-budget packing (best-fit decreasing) and given to every tool as these
    rows, so all of them train on identical rows in identical order.
    """
    from qlorakit.data.batching import pack_by_token_budget

    steps = job["warmup_steps"] + job["measured_steps"]
    need = steps * job["rows_per_step"]
    n = need * max(4, job["row_tokens"] // 100)
    lengths = example_lengths(n, job["row_tokens"], job["seed"])
    bins = pack_by_token_budget(list(range(n)), lengths, job["row_tokens"], seed=job["seed"], epoch=0).bins
    bins = sorted(bins, key=lambda b: -sum(lengths[i] for i in b))[:need]  # the fullest rows
    rng = random.Random(job["seed"] + 1)
    rows = [[[rng.randrange(3, vocab) for _ in range(lengths[i])] for i in b] for b in bins]
    r = job["rows_per_step"]
    return [rows[s:s + r] for s in range(0, need, r)]


def step_tokens(step) -> int:
    return sum(len(ex) for row in step for ex in row)


def useful_flops(model_dir: str, steps, lora_r: int) -> float:
    """Model FLOPs of ``steps`` that the job needs, the same count for every tool: forward and backward of every
    token, LoRA weight gradients, logits of the trained positions; no recomputation (benchmarks/vs_trl.py)."""
    from vs_trl import job_flops, model_shape

    shape = model_shape(model_dir, lora_r)  # a meta-device model: read once
    examples = [(len(ex), len(ex) - 1) for step in steps for row in step for ex in row]
    return job_flops(shape, examples, "trained", 4, checkpointing=False)


def summarize(step_ends: list[float], t_start: float, steps, warmup: int) -> dict:
    """Tokens per second over the steps after ``warmup`` (from the end of the last warm-up step)."""
    measured = steps[warmup:len(step_ends)]
    if len(step_ends) <= warmup or not measured:
        return {"tokens_per_second": None, "measured_steps": 0}
    t0 = step_ends[warmup - 1] if warmup else t_start
    seconds = step_ends[len(step_ends) - 1] - t0
    tokens = sum(step_tokens(s) for s in measured)
    return {"tokens_per_second": tokens / seconds, "measured_steps": len(measured), "measured_seconds": seconds,
            "measured_tokens": tokens, "step_seconds": [b - a for a, b in zip([t_start] + step_ends, step_ends)]}


def job_parser(doc: str) -> argparse.ArgumentParser:
    """The options every part that trains takes: --model, --out, --device, --tiny."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="the CPU dry run's short job")
    return p


class StepClock:
    """One tool's timed run: ``start`` before the first step, ``step_done`` after every step (PART.json is rewritten
    each time, so a hang leaves what was done), ``finish`` after the last. Keeps the timing, the peak memory and the
    FLOP rate in ``result``, the same way for every tool."""

    def __init__(self, args, tool: str):
        from transformers import AutoConfig

        self.t_start = time.perf_counter()
        self.args, self.job = args, job_for(args.tiny)
        self.steps = packed_steps(AutoConfig.from_pretrained(args.model).vocab_size, self.job)
        self.result = {"tool": tool, "device": args.device, "versions": versions(), "job": self.job}
        self.ends: list[float] = []
        self.t0 = 0.0

    def start(self) -> None:
        import torch

        from qlorakit.model.cuda import reset_peak_memory

        self.result["setup_seconds"] = time.perf_counter() - self.t_start
        reset_peak_memory(torch.device(self.args.device))
        self.t0 = now(self.args.device)

    def step_done(self, losses: list[float]) -> None:
        import torch

        from qlorakit.model.cuda import peak_memory

        self.ends.append(now(self.args.device))
        self.result.update(losses=losses, step0_loss=losses[0] if losses else None,
                           **peak_memory(torch.device(self.args.device)),
                           **summarize(self.ends, self.t0, self.steps, self.job["warmup_steps"]))
        write_json(self.args.out, self.result)

    def finish(self, **more) -> dict:
        """The whole run's figures (``more`` added), written to PART.json; returns the result."""
        r, warmup = self.result, self.job["warmup_steps"]
        flops = useful_flops(self.args.model, self.steps[warmup:], self.job["lora_r"])
        r |= more | {"useful_flops_per_second": flops / r["measured_seconds"],
                     "tokens_per_step": [step_tokens(s) for s in self.steps],
                     "wall_seconds": time.perf_counter() - self.t_start}
        if "peak_allocated_gib" in r:
            r["peak_memory_gib"] = r["peak_allocated_gib"]
        write_json(self.args.out, r)
        return r


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def now(device: str) -> float:
    sync(device)
    return time.perf_counter()


def write_json(path: str | Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "trl", "datasets", "liger-kernel", "triton",
                 "accelerate", "flash-attn"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out
