"""qlorakit vs TRL's SFTTrainer on the same QLoRA job: time, throughput, memory, loss, padding, MFU.

    python benchmarks/vs_trl.py                       # both workloads, the embedded SmolLM2-135M-Instruct, float32
    python benchmarks/vs_trl.py --workload closed     # one workload
    python benchmarks/vs_trl.py --model DIR --rows 8  # a quick check on another (tiny) model

For each workload, each tool runs the whole job as its own process, one after the other: qlorakit as
``python -m qlorakit train ...``, TRL 1.16 as ``python benchmarks/_trl_job.py ...`` (SFTTrainer + peft +
bitsandbytes). Same model directory, rows, text, hyperparameters and compute precision:

  4-bit NF4 + double quantization; LoRA r 16, alpha 32, dropout 0.05 on every linear layer but the head (TRL/peft:
  target_modules="all-linear"); batch 4, accumulation 1; AdamW, lr 2e-4 constant, no warmup, no weight decay;
  1 epoch; gradient checkpointing; max grad norm 0.3; seed 42; max length 1024 (longer rows cut, start kept);
  airoboros prompt format, loss on responses only; float32 compute unless --bf16 (an AVX2-only CPU runs bfloat16
  matmuls many times slower than float32: the two matmul peaks printed at the start show by how much).

qlorakit runs twice by default (--qlorakit-checkpointing both): with gradient checkpointing on, as the job states
and as TRL runs it, and with its own default ``gradient_checkpointing auto`` (on only where the activations of the
largest micro-batch would take over half the free memory; the log and the notes say which it chose). Checkpointing
changes no number, only time and memory; the table shows both runs and their peak memory against TRL's.

The TRL data is a prompt/completion dataset: prompt = qlorakit's rendered airoboros prompt, completion = response +
EOS, both from ``qlorakit.data.templates.render_segments``, so the two tools see the same text. TRL keeps its
defaults otherwise (padding collator, no packing, completion-only loss for prompt-completion data); see
_trl_job.py for the one exception (its LoRA weights are cast back to float32; --stock-trl-adapter-dtype keeps them).

Measured, per tool:
  wall seconds       the child process from start to exit (imports, model load and quantization included)
  loop seconds       the training loop alone (TRL: trainer.train(); qlorakit: the sum of its logged step times)
  tokens/s           trained tokens (response tokens + EOS, counted once with qlorakit's tokenization and used for
                     both) per second
  peak RSS           the child's own ru_maxrss, read from os.wait4 on that child (not RUSAGE_CHILDREN, whose
                     maximum over all children cannot tell the second child's peak from the first's)
  train loss         the last logged step loss, and the mean over all steps (the two tools draw rows in different
                     random orders, so the last step's rows differ; the held-out loss is the like-for-like check)
  held-out loss      one shared function on both saved adapters (and on the base model): mean loss per response
                     token of the held-out rows in the airoboros format; the prompt tokenized on its own, then the
                     response + EOS (what a model sees at inference). Also with prompt + response tokenized as one
                     string, as TRL tokenizes for training, where the response's leading space merges into its
                     first word.
  padding waste      share of token positions in the batches that are padding (TRL: the batches its collator
                     built; qlorakit: its packed batches, rebuilt with its own functions)
  MFU                model FLOPs / seconds / this machine's measured matmul peak for the compute precision (best of
                     N square matmuls, measured in this process before the jobs run). Each tool's own FLOP count
                     (below) over its loop and its wall time; and "useful MFU": one count for all, qlorakit's without
                     recomputation (logits at trained positions only), over each tool's loop time, which credits no
                     run for work the job does not need (a ratio of useful throughput).

Model FLOPs of the job (``job_flops``), summed over the training examples, each with L real tokens (padding is
never counted: it is waste, reported on its own) and t trained tokens; N_lin = weights of the linear layers of the
decoder blocks (embeddings and head excluded), N_lora = LoRA weights (r * (in + out) per adapted layer),
A(L) = 2 * n_layers * d_attn * L * (L + 1) (causal QK^T and AV products, each query against its own prefix),
V * d = head size:

  decoder forward     F = 2 * (N_lin + N_lora) * L + A(L)
  decoder backward    B = 2 * N_lin * L + 4 * N_lora * L + 2 * A(L)
                      (frozen 4-bit weights need input gradients only, 1x their forward; LoRA weights need input
                      and weight gradients, 2x; attention products 2x)
  recompute           + F   (gradient checkpointing recomputes each decoder layer's forward during backward)
  head (where each tool computes it)
    qlorakit          4 * V * d * t          logits only at trained positions, forward + input gradient
    TRL on CPU        6 * V * d * (L - 1)    its fused LM head projects every position (the compact, trained-only
                                             path is Triton-only), and its backward recomputes each logit tile
                                             before the input gradient
    TRL on CUDA/XPU   6 * V * d * t
  total               sum over examples of 2F + B + head

Dequantizing the 4-bit weights, norms, activations, softmax and the optimizer are not counted. The kernels may do
more than this count (TRL's attention also covers the padding of its batches).

Results: a Markdown table per workload on stdout, and benchmarks/results/vs_trl-<workload>.json (with --bf16:
vs_trl-<workload>-bf16.json, so the two precisions' tables stand side by side). Run directories
and child logs go to runs/vs_trl/<workload>/. Nothing is downloaded (HF_HUB_OFFLINE=1, report_to="none").
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
WORKLOADS = {"closed": BENCH / "data" / "closed_context_64.jsonl", "spread": BENCH / "data" / "spread.jsonl"}
HELDOUT = ROOT / "src" / "qlorakit" / "resources" / "heldout_closed_context.jsonl"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
os.environ.update(OFFLINE_ENV)

# The job, as the issue states it. Both tools get these values explicitly, never through their own defaults.
JOB = dict(bits=4, quant_type="nf4", double_quant=True, lora_r=16, lora_alpha=32.0, lora_dropout=0.05, batch=4,
           grad_accum=1, lr=2e-4, epochs=1, max_grad_norm=0.3, seed=42, max_length=1024, prompt_format="airoboros",
           gradient_checkpointing=True, optim="adamw_torch", weight_decay=0.0, warmup=0, scheduler="constant")


# qlorakit's runs, by gradient_checkpointing setting: result keys and table labels.
QLORAKIT_KEYS = {"true": "qlorakit", "auto": "qlorakit_auto"}
LABELS = {"qlorakit": "qlorakit (checkpointing on)", "qlorakit_auto": "qlorakit (checkpointing auto)", "trl": "TRL"}
GC_LOG_LINE = "gradient checkpointing: on"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=("closed", "spread", "both"), default="both",
                   help="closed: closed_context_64.jsonl (rows ~200 tokens); spread: spread.jsonl (20-1,400 tokens)")
    p.add_argument("--rows", type=int, default=64, help="train on the first N rows of the workload (default 64)")
    p.add_argument("--model", default="default",
                   help="a local Hugging Face model directory (default: qlorakit's embedded SmolLM2-135M-Instruct)")
    p.add_argument("--bf16", action="store_true", help="compute in bfloat16 in both tools (default float32)")
    p.add_argument("--heldout", default=str(HELDOUT), help="held-out rows for the shared evaluation")
    p.add_argument("--heldout-rows", type=int, default=0, help="use the first N held-out rows (0 = all)")
    p.add_argument("--threads", type=int, default=0,
                   help="OMP_NUM_THREADS for both jobs and torch threads for the matmul peak (0 = torch's default)")
    p.add_argument("--stock-trl-adapter-dtype", action="store_true",
                   help="leave TRL's cast of the LoRA weights to bfloat16 in place (default: float32, as qlorakit)")
    p.add_argument("--qlorakit-checkpointing", choices=("both", "true", "auto"), default="both",
                   help="qlorakit runs with gradient_checkpointing true (as the job says), auto (its default: off "
                        "where memory allows, i.e. on a CPU), or both, one after the other (default)")
    p.add_argument("--qlorakit-args", default="",
                   help="extra 'qlorakit train' flags, appended (they win), e.g. \"--cache_dequantized false\"")
    p.add_argument("--render", nargs="+", metavar="RESULT.json",
                   help="run nothing: print the tables of saved results again (after a change to the table), "
                        "updating their markdown")
    p.add_argument("--runs-dir", default=str(ROOT / "runs" / "vs_trl"), help="run directories and child logs")
    p.add_argument("--results-dir", default=str(BENCH / "results"), help="where vs_trl-<workload>.json goes")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------
# Child processes


def run_child(name: str, cmd: list[str], log_path: Path, env: dict) -> dict:
    """Run ``cmd`` to completion; its wall seconds and its own peak resident memory (ru_maxrss of this child)."""
    print(f"  {name}: {shlex.join(cmd)}", flush=True)
    print(f"  {name}: log {log_path}", flush=True)
    with open(log_path, "w", encoding="utf-8") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # this child's rusage alone
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        wall = time.perf_counter() - t0
    proc.returncode = rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-40:]
        sys.exit(f"{name} failed (exit {rc}); the end of {log_path}:\n" + "\n".join(tail))
    peak_mib = usage.ru_maxrss / 1024  # KiB on Linux
    print(f"  {name}: {wall:.1f} s wall, peak RSS {peak_mib:.0f} MiB", flush=True)
    return {"command": cmd, "wall_seconds": wall, "peak_rss_mib": peak_mib, "log": str(log_path)}


def child_env(threads: int) -> dict:
    env = {**os.environ, **OFFLINE_ENV}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def qlorakit_command(model_dir: str, data: Path, out: Path, bf16: bool, checkpointing: str) -> list[str]:
    j = JOB
    flags = dict(model_name_or_path=model_dir, dataset=str(data), dataset_format="airoboros",
                 prompt_format=j["prompt_format"], bits=j["bits"], quant_type=j["quant_type"],
                 double_quant=j["double_quant"], bf16="true" if bf16 else "false",
                 gradient_checkpointing=checkpointing, lora_r=j["lora_r"], lora_alpha=j["lora_alpha"],
                 lora_dropout=j["lora_dropout"], lora_modules="all", per_device_train_batch_size=j["batch"],
                 gradient_accumulation_steps=j["grad_accum"], learning_rate=j["lr"],
                 lr_scheduler_type=j["scheduler"], warmup_ratio=j["warmup"], num_train_epochs=j["epochs"],
                 max_grad_norm=j["max_grad_norm"], optim=j["optim"], weight_decay=j["weight_decay"], seed=j["seed"],
                 model_max_len=j["max_length"], truncation="truncate", packing=True, group_by_length=False,
                 eval_strategy="no", save_strategy="no", logging_steps=1, output_dir=str(out),
                 prompt_loss_weight=0)  # TRL's loss: the completions only
    cmd = [sys.executable, "-m", "qlorakit", "train"]
    for k, v in flags.items():
        cmd += [f"--{k}", str(v).lower() if isinstance(v, bool) else str(v)]
    return cmd


def trl_command(model_dir: str, data: Path, out: Path, report: Path, bf16: bool, stock_dtype: bool) -> list[str]:
    j = JOB
    cmd = [sys.executable, str(BENCH / "_trl_job.py"), "--model", model_dir, "--data", str(data),
           "--output_dir", str(out), "--report", str(report), "--batch", str(j["batch"]),
           "--grad_accum", str(j["grad_accum"]), "--lr", str(j["lr"]), "--epochs", str(j["epochs"]),
           "--max_grad_norm", str(j["max_grad_norm"]), "--seed", str(j["seed"]), "--max_length", str(j["max_length"]),
           "--lora_r", str(j["lora_r"]), "--lora_alpha", str(j["lora_alpha"]), "--lora_dropout", str(j["lora_dropout"])]
    if bf16:
        cmd.append("--bf16")
    if stock_dtype:
        cmd.append("--stock-adapter-dtype")
    return cmd


# ----------------------------------------------------------------------------------------------------------------
# Data: the same rows and text for both tools


def prompt_completion(conv, tokenizer) -> dict:
    """The airoboros text of a one-reply conversation split where the trained reply begins."""
    from qlorakit.data.templates import render_segments

    segs = render_segments(conv.messages, JOB["prompt_format"], tokenizer)
    if sum(s.trained for s in segs) != 1 or not segs[-1].trained:
        raise SystemExit(f"{conv.source}: the benchmark needs rows with exactly one reply")
    return {"prompt": "".join(s.text for s in segs[:-1]), "completion": segs[-1].text}


def write_jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def joint_ids(pc: dict, tokenizer) -> tuple[list[int], list[int]]:
    """Ids and labels as TRL builds them for prompt-completion data: prompt and prompt + completion tokenized as
    strings, the completion starting where the two diverge."""
    from qlorakit.data.tokenize import IGNORE, bos_ids

    bos = bos_ids(tokenizer)
    p = bos + tokenizer(pc["prompt"], add_special_tokens=False)["input_ids"]
    full = bos + tokenizer(pc["prompt"] + pc["completion"], add_special_tokens=False)["input_ids"]
    n = 0
    while n < min(len(p), len(full)) and p[n] == full[n]:
        n += 1
    return full, [IGNORE] * n + full[n:]


# ----------------------------------------------------------------------------------------------------------------
# FLOPs and the matmul peak


def matmul_peak(dtype, n: int = 2048, reps: int = 5, budget_s: float = 10.0) -> dict:
    """Best-of-``reps`` FLOP/s of an n x n @ n x n matmul in ``dtype`` (after one warm-up), on the device the jobs
    train on (the CPU here; a GPU where there is one, with n = 8192). On a CPU, n grows from 256 and stops early where
    one matmul already takes over 0.25 s (bfloat16 without bfloat16 units)."""
    import torch

    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def once(a, b) -> float:
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        return time.perf_counter() - t0

    if dev.type == "cuda":
        n, reps = 8192, 10
    else:  # grow from 256 while one matmul stays quick, up to n
        size = 256
        while size < n:
            probe = torch.randn(size, size).to(dtype)
            if once(probe, probe) > 0.25:
                break
            size *= 2
        n = size
    a, b = torch.randn(n, n, device=dev).to(dtype), torch.randn(n, n, device=dev).to(dtype)
    once(a, b)
    times = []
    for _ in range(reps):
        times.append(once(a, b))
        if sum(times) > budget_s and len(times) >= 2:
            break
    best = min(times)
    return {"flops_per_second": 2 * n ** 3 / best, "n": n, "repeats": len(times), "best_seconds": best,
            "device": str(dev)}


def model_shape(model_dir: str, lora_r: int) -> dict:
    """Sizes for the FLOP count, read from a weightless (meta-device) copy of the model."""
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    head = model.get_output_embeddings()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m is not head]
    text = cfg.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return {"n_linear": sum(m.in_features * m.out_features for m in linears),
            "n_lora": sum(lora_r * (m.in_features + m.out_features) for m in linears),
            "n_layers": text.num_hidden_layers, "d_attn": heads * head_dim,
            "vocab": head.out_features, "d_model": head.in_features, "lora_layers": len(linears)}


def job_flops(shape: dict, examples: list[tuple[int, int]], head_rows: str, head_factor: int,
              checkpointing: bool = True) -> float:
    """Model FLOPs of one pass over ``examples`` [(real length L, trained tokens t)]; the formula is in the module
    docstring. ``head_rows``: "trained" (t rows) or "all" (L - 1 rows); ``head_factor``: 4 (forward + input
    gradient) or 6 (forward, recompute, input gradient)."""
    n_lin, n_lora = shape["n_linear"], shape["n_lora"]
    head = shape["vocab"] * shape["d_model"]
    total = 0.0
    for L, t in examples:
        attn = 2 * shape["n_layers"] * shape["d_attn"] * L * (L + 1)
        fwd = 2 * (n_lin + n_lora) * L + attn
        bwd = 2 * n_lin * L + 4 * n_lora * L + 2 * attn
        rows = t if head_rows == "trained" else L - 1
        total += fwd + bwd + (fwd if checkpointing else 0) + head_factor * head * rows
    return total


# ----------------------------------------------------------------------------------------------------------------
# The shared held-out evaluation


class HeldoutEval:
    """Mean loss per response token of held-out rows, computed the same way for the base model and every adapter.

    Two tokenizations of each row in the airoboros format: "inference" = the prompt tokenized on its own, then the
    response + EOS (qlorakit's tokenization, and how a model is prompted at inference); "joint" = prompt + response
    tokenized as one string, the response starting where that diverges from the prompt alone (TRL's tokenization).
    One base model, loaded once (on a CPU its 4-bit weights dequantized once, which gives the same numbers);
    adapters are added under their own names; LoRA weights in float32 (exact for
    bfloat16-trained ones); dropout off; batch 1, no padding; logits only where a response token is predicted.
    The two tokenizations of a row share their first n tokens, so that prefix runs once per model and each
    continuation runs on a copy of its key/value cache.
    """

    def __init__(self, model_dir: str, convs, tokenizer, bf16: bool):
        from qlorakit.data.templates import render_segments
        from qlorakit.data.tokenize import segments_to_ids
        from qlorakit.devices import device_for_training
        from qlorakit.model.load import load_base_model

        self.bf16 = bf16
        self.device = device_for_training()
        self.model = load_base_model(model_dir, bits=JOB["bits"], quant_type=JOB["quant_type"],
                                     double_quant=JOB["double_quant"], bf16=bf16, device=self.device)
        if self.device.type == "cpu":  # the same weights, dequantized once instead of in every forward: faster
            import torch

            from qlorakit.model.load import cache_dequantized

            cache_dequantized(self.model, torch.bfloat16 if bf16 else torch.float32)
        self.peft = None
        self.rows = []
        for conv in convs:
            segs = render_segments(conv.messages, JOB["prompt_format"], tokenizer)
            seqs = {"inference": segments_to_ids(segs, tokenizer),
                    "joint": joint_ids(prompt_completion(conv, tokenizer), tokenizer)}
            m = JOB["max_length"]  # the training length limit
            self.rows.append({k: (ids[:m], labels[:m]) for k, (ids, labels) in seqs.items()})
        self.base = self._losses(self.model, ("inference",))  # before any adapter is injected

    def adapter(self, name: str, path: Path) -> dict:
        from peft import PeftModel

        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.model, str(path), adapter_name=name)
        else:
            self.peft.load_adapter(str(path), adapter_name=name)
        for n, p in self.peft.named_parameters():
            if "lora_" in n:
                p.data = p.data.float()
        self.peft.set_adapter(name)
        self.peft.eval()
        return self._losses(self.peft, ("inference", "joint"))

    def _losses(self, model, kinds: tuple[str, ...]) -> dict:
        import copy

        import torch
        import torch.nn.functional as F

        from qlorakit.data.tokenize import IGNORE
        from qlorakit.train.step import autocast

        model.eval()
        dev = self.device
        total = {k: 0.0 for k in kinds}
        count = {k: 0 for k in kinds}

        def trained(labels, t):  # is the token at position t + 1 a trained target?
            return t + 1 < len(labels) and labels[t + 1] != IGNORE

        def add(kind, logits, ids, positions):
            if positions:
                target = torch.tensor([ids[t + 1] for t in positions], device=dev)
                total[kind] += float(F.cross_entropy(logits.float(), target, reduction="sum"))
                count[kind] += len(positions)

        with torch.no_grad(), autocast(self.device, self.bf16):
            for row in self.rows:
                seqs = [row[k] for k in kinds]
                n = 0
                while all(n < len(ids) for ids, _ in seqs) and len({ids[n] for ids, _ in seqs}) == 1:
                    n += 1
                first = seqs[0][0]
                keep = [any(trained(lab, t) for _, lab in seqs) for t in range(n)]
                out = model(input_ids=torch.tensor(first[:n], device=dev)[None], use_cache=True,
                            logits_to_keep=torch.tensor(keep, device=dev)[None])
                rows_kept = [t for t in range(n) if keep[t]]
                for kind, (ids, labels) in zip(kinds, seqs):
                    mine = [j for j, t in enumerate(rows_kept) if trained(labels, t)]
                    add(kind, out.logits[mine], ids, [rows_kept[j] for j in mine])
                    later = [t for t in range(n, len(ids)) if trained(labels, t)]
                    if later:
                        mask = torch.tensor([trained(labels, t) for t in range(n, len(ids))], device=dev)[None]
                        cont = model(input_ids=torch.tensor(ids[n:], device=dev)[None], logits_to_keep=mask,
                                     use_cache=True,
                                     past_key_values=copy.deepcopy(out.past_key_values))
                        add(kind, cont.logits, ids, later)
        return {k: {"loss": total[k] / max(count[k], 1), "tokens": count[k]} for k in kinds}


# ----------------------------------------------------------------------------------------------------------------
# One workload


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def qlorakit_loop_seconds(train_ex, steps, rows: list[dict]) -> float | None:
    """qlorakit's training-loop time: the sum of its per-step times, each = the real tokens of the step /
    the tokens_per_second it logged (logging_steps 1). The steps are rebuilt with qlorakit's own functions; None
    unless every step's trained-token count matches the one it logged."""
    from qlorakit.data.tokenize import IGNORE

    if len(rows) != len(steps):
        return None
    total = 0.0
    for step, row in zip(steps, rows):
        ids = [i for micro in step for i in micro]
        trained = sum(sum(1 for t in train_ex[i].labels[1:] if t != IGNORE) for i in ids)
        if trained != row.get("trained_tokens") or not row.get("tokens_per_second"):
            return None
        total += sum(len(train_ex[i]) for i in ids) / row["tokens_per_second"]
    return total


def run_workload(name: str, args, model_dir: str, tokenizer, shape: dict, peak: float, precision: str,
                 evaluator: dict) -> dict:
    import torch

    from qlorakit.data.batching import collate, padding_waste
    from qlorakit.data.formats import read_jsonl
    from qlorakit.data.tokenize import tokenize_all
    from qlorakit.train.schedule import epoch_steps

    src = WORKLOADS[name]
    lines = [ln for ln in src.read_text(encoding="utf-8").splitlines() if ln.strip()][:args.rows]
    run_dir = Path(args.runs_dir) / name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    train_file = run_dir / "train.jsonl"
    train_file.write_text("".join(ln + "\n" for ln in lines), encoding="utf-8")
    convs = read_jsonl(train_file, "airoboros")
    trl_file = run_dir / "trl_prompt_completion.jsonl"
    write_jsonl(trl_file, (prompt_completion(c, tokenizer) for c in convs))

    # What qlorakit will train on, built with its own functions (the same calls its loop makes).
    train_ex, rep = tokenize_all(convs, tokenizer, JOB["prompt_format"], JOB["max_length"])
    # Optimizer steps as lists of micro-batches of example indices, planned as qlorakit's loop plans them.
    steps = [s.micro_batches for s in epoch_steps(len(train_ex), 0, seed=JOB["seed"], micro=JOB["batch"],
                                                  accum=JOB["grad_accum"])]
    pad_id = tokenizer.pad_token_id
    q_batches = [collate([train_ex[i] for i in micro], pad_id, True) for s in steps for micro in s]
    response_tokens = sum(ex.n_trained for ex in train_ex)

    print(f"\n## workload {name}: {len(lines)} rows of {src.relative_to(ROOT)}, {response_tokens} response tokens, "
          f"{len(steps)} steps", flush=True)
    env = child_env(args.threads)
    variants = ["true", "auto"] if args.qlorakit_checkpointing == "both" else [args.qlorakit_checkpointing]
    qs = {}
    for ck in variants:
        key = QLORAKIT_KEYS[ck]
        out = run_dir / key
        cmd = qlorakit_command(model_dir, train_file, out, args.bf16, ck) + shlex.split(args.qlorakit_args)
        q = run_child(key, cmd, run_dir / f"{key}.log", env)
        q_rows = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
        q_losses = [r["loss"] for r in q_rows]
        q["out"] = out
        q["loop_seconds"] = qlorakit_loop_seconds(train_ex, steps, q_rows)
        q["steps"] = len(q_rows)
        q["final_train_loss"], q["mean_train_loss"] = q_losses[-1], sum(q_losses) / len(q_losses)
        q["padding_waste"] = padding_waste(q_batches)
        q["trained_tokens_own_count"] = sum(r["trained_tokens"] for r in q_rows)
        q["examples"] = len(train_ex)
        log_text = Path(q["log"]).read_text(encoding="utf-8", errors="replace")
        q["gradient_checkpointing"] = GC_LOG_LINE in log_text
        q["cache_dequantized"] = "cache_dequantized:" in log_text
        q["model_flops"] = job_flops(shape, [(len(ex), ex.n_trained) for ex in train_ex], "trained", 4,
                                     checkpointing=q["gradient_checkpointing"])
        qs[key] = q
    t_out = run_dir / "trl"
    t_report = run_dir / "trl_report.json"
    t = run_child("trl", trl_command(model_dir, trl_file, t_out, t_report, args.bf16, args.stock_trl_adapter_dtype),
                  run_dir / "trl.log", env)

    # TRL's numbers
    tr = json.loads(t_report.read_text(encoding="utf-8"))
    t_losses = [h["loss"] for h in tr["log_history"] if "loss" in h]
    t["loop_seconds"] = tr["train_seconds"]
    t["steps"] = tr["steps"]
    t["final_train_loss"], t["mean_train_loss"] = t_losses[-1], sum(t_losses) / len(t_losses)
    positions = sum(b["shape"][0] * b["shape"][1] for b in tr["batches"])
    real = sum(sum(b["lengths"]) for b in tr["batches"])
    t["padding_waste"] = 1 - real / positions
    t["trained_tokens_own_count"] = sum(sum(b["trained"]) for b in tr["batches"])
    t["examples"] = tr["train_rows"]
    t_examples = [(L, k) for b in tr["batches"] for L, k in zip(b["lengths"], b["trained"])]
    on_triton = torch.cuda.is_available()
    t["model_flops"] = job_flops(shape, t_examples, "trained" if on_triton else "all", 6)
    t["head_rows"] = "trained positions" if on_triton else "every real position"
    t["adapter_dtype_after_trl"] = tr["adapter_dtype_after_trl"]
    t["adapter_dtype_trained"] = tr["adapter_dtype_trained"]
    t["setup_seconds"], t["versions"] = tr["setup_seconds"], tr["versions"]

    t0 = time.perf_counter()
    if "eval" not in evaluator:  # one base model for every workload
        heldout = read_jsonl(args.heldout)[:args.heldout_rows or None]
        print(f"  loading the shared evaluation ({len(heldout)} held-out rows of {args.heldout})", flush=True)
        evaluator["eval"] = HeldoutEval(model_dir, heldout, tokenizer, args.bf16)
    he = evaluator["eval"]
    ev = {"base": he.base, **{k: he.adapter(f"{name}_{k}", q["out"]) for k, q in qs.items()},
          "trl": he.adapter(f"{name}_trl", t_out)}
    print(f"  held-out evaluation: {time.perf_counter() - t0:.1f} s", flush=True)

    q = qs[QLORAKIT_KEYS[variants[0]]]  # the job as stated
    # The work the job needs: qlorakit's count (logits at trained positions) without recomputation.
    needed = job_flops(shape, [(len(ex), ex.n_trained) for ex in train_ex], "trained", 4, checkpointing=False)
    for tool, d in (*qs.items(), ("trl", t)):
        d["heldout_loss"] = ev[tool]["inference"]["loss"]
        d["heldout_loss_joint"] = ev[tool]["joint"]["loss"]
        d["tokens_per_second_wall"] = response_tokens / d["wall_seconds"]
        loop = d["loop_seconds"]
        d["tokens_per_second_loop"] = response_tokens / loop if loop else None
        d["mfu_loop"] = d["model_flops"] / loop / peak if loop else None
        d["mfu_wall"] = d["model_flops"] / d["wall_seconds"] / peak
        d["needed_flops"] = needed
        d["mfu_loop_needed"] = needed / loop / peak if loop else None

    notes = []
    if q["examples"] != t["examples"]:
        notes.append(f"examples trained: qlorakit {q['examples']}, TRL {t['examples']}")
    if q["trained_tokens_own_count"] != t["trained_tokens_own_count"]:
        notes.append(f"trained tokens as each tool counts them: qlorakit {q['trained_tokens_own_count']}, TRL "
                     f"{t['trained_tokens_own_count']} (TRL tokenizes prompt + response as one string, so the "
                     f"space before a response merges into its first token); tokens/s uses {response_tokens} for both")
    if rep.truncated or rep.dropped_no_trained_tokens:
        notes.append(f"qlorakit: {len(rep.truncated)} rows cut to {JOB['max_length']} tokens, "
                     f"{len(rep.dropped_no_trained_tokens)} dropped; TRL cuts at the same length (start kept)")
    if q["cache_dequantized"]:
        notes.append("qlorakit dequantized the 4-bit base weights once to dense ones (its cache_dequantized auto on a "
                     "CPU; same numbers, more memory, no per-step dequantization); TRL dequantizes in every matmul. "
                     "Add --qlorakit-args '--cache_dequantized false' to compare without it")
    for key, d in qs.items():
        notes.append(f"{LABELS[key]}: gradient checkpointing {'on' if d['gradient_checkpointing'] else 'off'}")
    if any(d["loop_seconds"] is None for d in qs.values()):
        notes.append("qlorakit's loop time could not be rebuilt from its metrics.jsonl (its step plan changed?)")
    notes.append("TRL LoRA weights: " + ("bfloat16, TRL's own cast (--stock-trl-adapter-dtype)"
                                         if args.stock_trl_adapter_dtype else
                                         "TRL cast them to " + "/".join(t["adapter_dtype_after_trl"]) +
                                         "; cast back to " + "/".join(t["adapter_dtype_trained"]) + " before training"))
    notes.append("the tools draw rows in different seeded orders, so their step losses are of different batches")

    return {"workload": name, "source": str(src.relative_to(ROOT)), "rows": len(lines), "steps": len(steps),
            "response_tokens": response_tokens, "precision": precision,
            **{k: {**d, "out": str(d["out"])} for k, d in qs.items()}, "trl": t,
            "heldout": {"file": args.heldout, "rows": len(he.rows), "losses": ev,
                        "sha256": hashlib.sha256(Path(args.heldout).read_bytes()).hexdigest()}, "notes": notes}


# ----------------------------------------------------------------------------------------------------------------
# Report


def fmt(x, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def table(res: dict, header: str) -> str:
    t = res["trl"]
    base = res["heldout"]["losses"]["base"]["inference"]["loss"]
    rows = [
        ("wall seconds (whole process)", "wall_seconds", ".1f"),
        ("training-loop seconds", "loop_seconds", ".1f"),
        ("trained tokens / s (wall)", "tokens_per_second_wall", ".1f"),
        ("trained tokens / s (loop)", "tokens_per_second_loop", ".1f"),
        ("peak RSS, MiB", "peak_rss_mib", ".0f"),
        ("final train loss (last step)", "final_train_loss", ".4f"),
        ("mean train loss (all steps)", "mean_train_loss", ".4f"),
        (f"held-out loss (base model {base:.4f})", "heldout_loss", ".4f"),
        ("held-out loss, joint tokenization", "heldout_loss_joint", ".4f"),
        ("padding waste", "padding_waste", ".1%"),
        ("model TFLOPs (head where each computes it)", "model_flops", ".3f"),
        ("MFU (loop)", "mfu_loop", ".2%"),
        ("MFU (wall)", "mfu_wall", ".2%"),
        ("useful MFU (loop): the job's FLOPs without recompute, for all", "mfu_loop_needed", ".2%"),
    ]
    keys = [k for k in QLORAKIT_KEYS.values() if k in res]
    cols = [LABELS[k] for k in keys] + ["TRL"] + [f"TRL / {LABELS[k]}" for k in keys]
    out = [header, "", "| metric | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for label, key, spec in rows:
        vals = [res[k].get(key) for k in keys]
        b = t.get(key)
        if key == "model_flops":
            vals, b = [v / 1e12 for v in vals], b / 1e12
        ratios = [b / a if (a and b is not None) else None for a in vals]
        out.append(f"| {label} | " + " | ".join([fmt(v, spec) for v in vals] + [fmt(b, spec)]
                                                + [fmt(r, ".2f") for r in ratios]) + " |")
    return "\n".join(out)


def processor_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def quiet_libraries() -> None:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="bitsandbytes|peft|transformers")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def render(paths: list[str]) -> int:
    """Tables of saved results, rebuilt with this script's table(); the useful-MFU row recomputed."""
    for path in map(Path, paths):
        res = json.loads(path.read_text(encoding="utf-8"))
        peak = res["matmul_peaks"][res["precision"]]["flops_per_second"]
        runs = [k for k in (*QLORAKIT_KEYS.values(), "trl") if k in res]
        needed = res["trl"].get("needed_flops") or next(
            (res[k]["model_flops"] for k in runs if k != "trl" and res[k].get("gradient_checkpointing") is False),
            None)
        if needed is None:
            sys.exit(f"{path}: no FLOP count without recomputation saved; run the benchmark again")
        for k in runs:
            loop = res[k].get("loop_seconds")
            res[k]["needed_flops"], res[k]["mfu_loop_needed"] = needed, (needed / loop / peak if loop else None)
        header, _, rest = res["markdown"].partition("\n\n| metric")
        notes = rest.partition("\n\n- ")[2]
        res["markdown"] = table(res, header) + ("\n\n- " + notes if notes else "")
        path.write_text(json.dumps(res, indent=2, default=str) + "\n", encoding="utf-8")
        print(f"{res['markdown']}\n\nfrom {path} ({res['command']})\n")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        return render(args.render)
    command = shlex.join(["python", os.path.relpath(__file__, Path.cwd())] + (sys.argv[1:] if argv is None else argv))
    import torch

    quiet_libraries()

    from qlorakit.model.load import load_tokenizer, resolve_model_path

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = resolve_model_path(args.model)
    if not Path(model_dir, "config.json").is_file():
        sys.exit(f"--model: {model_dir} is not a local Hugging Face model directory")
    tokenizer = load_tokenizer(model_dir)
    for f in Path(model_dir).iterdir():  # into the page cache, so neither job pays for a cold read
        if f.is_file():
            f.read_bytes()
    bf16 = args.bf16
    precision = "bfloat16" if bf16 else "float32"
    print(f"command: {command}")
    print(f"model: {model_dir}; compute {precision}; torch threads {torch.get_num_threads()}", flush=True)
    peaks = {"float32": matmul_peak(torch.float32), "bfloat16": matmul_peak(torch.bfloat16)}
    for k, v in peaks.items():
        print(f"matmul peak {k}: {v['flops_per_second'] / 1e9:.1f} GFLOP/s "
              f"({v['n']}^3, best of {v['repeats']})", flush=True)
    peak = peaks[precision]["flops_per_second"]
    shape = model_shape(model_dir, JOB["lora_r"])

    workloads = ["closed", "spread"] if args.workload == "both" else [args.workload]
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    tables, evaluator = [], {}
    cpu = processor_name()
    for name in workloads:
        res = run_workload(name, args, model_dir, tokenizer, shape, peak, precision, evaluator)
        header = (f"### qlorakit vs TRL {res['trl']['versions']['trl']} SFTTrainer: {name} workload, {res['rows']} "
                  f"rows, {res['steps']} steps, {res['response_tokens']} trained tokens, {precision} compute\n\n"
                  f"{Path(model_dir).name}, 4-bit NF4 double-quant, LoRA r {JOB['lora_r']} alpha "
                  f"{JOB['lora_alpha']:g} dropout {JOB['lora_dropout']} on all linear layers, batch {JOB['batch']} x "
                  f"GA {JOB['grad_accum']}, lr {JOB['lr']:g} constant, {JOB['epochs']} epoch, gradient checkpointing "
                  f"on (TRL) / as labelled (qlorakit). "
                  f"Matmul peak ({precision}, {cpu}, {torch.get_num_threads()} threads): "
                  f"{peak / 1e9:.1f} GFLOP/s. Held-out: {res['heldout']['rows']} rows of "
                  f"{os.path.relpath(res['heldout']['file'], ROOT)}.")
        text = table(res, header) + "\n\n" + "\n".join(f"- {n}" for n in res["notes"])
        tables.append(text)
        res.update({"command": command, "model": model_dir, "matmul_peaks": peaks, "model_shape": shape,
                    "job": JOB, "torch_threads": torch.get_num_threads(), "python": sys.version.split()[0],
                    "machine": {"processor": cpu, "cpus": os.cpu_count()}, "markdown": text})
        path = results_dir / f"vs_trl-{name}{'-bf16' if bf16 else ''}.json"
        path.write_text(json.dumps(res, indent=2, default=str) + "\n", encoding="utf-8")
        print(f"\n{text}\n\nwritten: {path}", flush=True)

    if len(tables) > 1:
        print("\n" + "\n\n".join(tables))
    print(f"\ncommand: {command}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
