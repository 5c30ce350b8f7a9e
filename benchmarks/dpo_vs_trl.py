"""qlorakit's DPO vs TRL's DPOTrainer on the embedded SmolLM2-135M-Instruct: wall time, peak memory, reward accuracy.

    python benchmarks/dpo_vs_trl.py [--rows 64] [--epochs 1] [--out benchmarks/results/dpo_vs_trl]

One invocation runs both tools, one after the other, each as its own process: ``python -m qlorakit train --method
dpo`` and ``python benchmarks/_trl_dpo_job.py`` (TRL 1.16 DPOTrainer + peft). Same model directory (the embedded
GGUF converted once to a Hugging Face folder), same pairs (scripts/make_pref_data.py, closed-context questions about
invented towns), same keys: a fresh LoRA adapter r 16, alpha 32 on every linear layer but the head, float32 weights
and compute (``bits 16``: no quantization on either side), beta 0.1, sigmoid loss, AdamW lr 2e-4 constant, no
warmup, max grad norm 0.3, batch 4, seed 42, max length 512, reference = the base (adapter off), dropout off (both
tools' default for DPO). TRL gets the prompt as qlorakit renders it (airoboros format) and the completions as
strings; it adds EOS itself.

Measured per tool: wall seconds of the child (imports and model load included), its own peak RSS (ru_maxrss from
os.wait4 on that child), and the reward accuracy reached: the mean ``rewards/accuracies`` over the last quarter of
the logged steps (the share of the batch's pairs whose chosen reward beats the rejected one).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_child(cmd: list[str], log: Path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT / "src"))
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        sys.exit(f"{cmd[1]} failed (status {status}); see {log}")
    return {"wall_seconds": round(wall, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024)}


def tail_accuracy(rows: list[dict]) -> float:
    acc = [r["rewards/accuracies"] for r in rows if "rewards/accuracies" in r]
    last = acc[-max(1, len(acc) // 4):]
    return round(sum(last) / len(last), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "dpo_vs_trl")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT / "src"))
    from qlorakit.data.formats import Message
    from qlorakit.data.templates import render_text
    from qlorakit.model.load import load_tokenizer, resolve_model_path

    spec = importlib.util.spec_from_file_location("make_pref_data", ROOT / "scripts" / "make_pref_data.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    rows = gen.pairs(a.rows, seed=0)
    pairs = a.out / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    model = resolve_model_path("default")
    tok = load_tokenizer(model)
    trl_rows = [{"prompt": render_text((Message("system", r["system"]), Message("user", r["prompt"])), "airoboros",
                                       tok, add_generation_prompt=True),
                 "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]
    trl_data = a.out / "pairs_trl.jsonl"
    trl_data.write_text("".join(json.dumps(r) + "\n" for r in trl_rows), encoding="utf-8")

    q_out, t_out = a.out / "qlorakit_run", a.out / "trl_run"
    qlorakit = run_child([sys.executable, "-m", "qlorakit", "train", "--method", "dpo", "--model_name_or_path", model,
                          "--bits", "16", "--bf16", "false", "--dataset", str(pairs), "--output_dir", str(q_out),
                          "--learning_rate", "2e-4", "--lr_scheduler_type", "constant", "--warmup_ratio", "0",
                          "--per_device_train_batch_size", "4", "--num_train_epochs", str(a.epochs),
                          "--model_max_len", "512", "--save_strategy", "no", "--eval_strategy", "no",
                          "--gradient_checkpointing", "false", "--seed", "42",
                          "--data_cache_dir", str(a.out / "cache")], a.out / "qlorakit.log")
    qlorakit["reward_accuracy"] = tail_accuracy([json.loads(x) for x in (q_out / "metrics.jsonl").read_text()
                                                 .splitlines() if x])
    report = a.out / "trl_report.json"
    trl = run_child([sys.executable, str(ROOT / "benchmarks" / "_trl_dpo_job.py"), "--model", model, "--data",
                     str(trl_data), "--output_dir", str(t_out), "--report", str(report), "--epochs", str(a.epochs)],
                    a.out / "trl.log")
    trl["reward_accuracy"] = tail_accuracy(json.loads(report.read_text())["log_history"])
    result = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "rows": a.rows,
              "epochs": a.epochs, "qlorakit": qlorakit, "trl": trl}
    (a.out / "result.json").write_text(json.dumps(result, indent=1))
    print(f"{'':10} {'wall s':>8} {'peak RSS MiB':>13} {'reward acc':>11}")
    for name in ("qlorakit", "trl"):
        r = result[name]
        print(f"{name:10} {r['wall_seconds']:>8} {r['peak_rss_mib']:>13} {r['reward_accuracy']:>11}")


if __name__ == "__main__":
    main()
