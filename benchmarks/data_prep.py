"""Time and peak memory to prepare airoboros-shaped rows for training: the list path every run took before
(read_jsonl + the seeded split + tokenize_all, every example a Python list) against qlorakit.data.prepare_data
(datasets map into Arrow files, memory-mapped back), cold and from its cache.

    python benchmarks/data_prep.py                  # 100,000 rows, prints a markdown table
    python benchmarks/data_prep.py --rows 20000 --num-proc 1
    python benchmarks/data_prep.py --rows 1000000 --paths cold,cached

Each measurement runs in a fresh process, so its peak resident memory (ru_maxrss) is its own; "above start" is the
peak less the process's memory once the libraries and the tokenizer are loaded, i.e. what the data itself costs.
The tokenizer is the embedded SmolLM2 one, the prompt format airoboros, model_max_len 1024, 5% held out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_rows(path: Path, n: int) -> None:
    """``n`` rows shaped like the airoboros sample (its rows, each copy told apart by a number)."""
    sample = [json.loads(x) for x in (ROOT / "src/qlorakit/resources/sample_airoboros.jsonl").read_text(
        encoding="utf-8").splitlines() if x.strip()]
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            row = sample[i % len(sample)]
            f.write(json.dumps({"instruction": f"{row['instruction']} (#{i})", "response": row["response"]}) + "\n")


def _rss_now_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def measure(mode: str, data: str, cache: str, num_proc: int) -> dict:
    """One measurement in this process (run by a child started by ``main``)."""
    sys.path.insert(0, str(ROOT / "src"))
    from qlorakit.console import quiet_libraries

    quiet_libraries()
    from transformers import AutoTokenizer

    from qlorakit.data.formats import read_jsonl
    from qlorakit.data.prepare import DataOptions, prepare_data
    from qlorakit.data.sources import parse_dataset_arg
    from qlorakit.data.tokenize import tokenize_all
    from qlorakit.model.load import default_gguf

    gguf = default_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    start_kib = _rss_now_kib()
    t0 = time.perf_counter()
    if mode == "before":
        import torch

        convs = read_jsonl(data)
        n_eval = int(round(len(convs) * 0.05))
        held = set(torch.randperm(len(convs), generator=torch.Generator().manual_seed(42))[:n_eval].tolist())
        train, _ = tokenize_all([c for i, c in enumerate(convs) if i not in held], tokenizer, "airoboros", 1024)
        evals, _ = tokenize_all([c for i, c in enumerate(convs) if i in held], tokenizer, "airoboros", 1024)
        tokens = sum(len(e) for e in train)
    else:
        opts = DataOptions(tuple(parse_dataset_arg(data)), eval_size=0.05, cache_dir=cache, num_proc=num_proc)
        prepared = prepare_data(opts, tokenizer)
        train, evals = prepared.train, prepared.eval
        tokens = int(train.lengths.sum())
        _ = train[len(train) // 2]  # the loop's access: one example by position
    seconds = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    workers_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"mode": mode, "seconds": seconds, "examples": len(train) + len(evals), "train_tokens": tokens,
            "peak_mib": peak_kib / 1024, "above_start_mib": (peak_kib - start_kib) / 1024,
            "worker_peak_mib": workers_kib / 1024}


def cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
    isa = "AVX512-BF16" if "avx512_bf16" in flags else "AVX512" if "avx512f" in flags else "AVX2"
    return f"{name}, {isa}, {len(os.sched_getaffinity(0))} cores"


def run_child(mode: str, data: Path, cache: Path, num_proc: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(data), str(cache), str(num_proc)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--num-proc", type=int, default=0, help="processes that tokenize (0: as many as pay)")
    ap.add_argument("--paths", default="before,cold,cached",
                    help="which to measure, comma-separated (default all; the list path 'before' takes the longest "
                         "and the most memory: at a million rows leave it out)")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, data, cache, num_proc = args.child
        print(json.dumps(measure(mode, data, cache, int(num_proc))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        data, cache = Path(tmp) / "rows.jsonl", Path(tmp) / "cache"
        write_rows(data, args.rows)
        runs = [("before: read_jsonl + tokenize_all", "before"), ("after: prepare_data, cold", "cold"),
                ("after: prepare_data, from the cache", "cached")]
        wanted = set(args.paths.split(","))
        if not wanted <= {mode for _, mode in runs}:
            sys.exit(f"--paths: {args.paths!r}; choose from before, cold, cached")
        results = [(label, run_child(mode, data, cache, args.num_proc)) for label, mode in runs if mode in wanted]
    print(f"{args.rows:,} airoboros-shaped rows ({data.name}); CPU: {cpu_name()}; python {platform.python_version()}")
    print()
    print("| path | time | peak RSS | above start | tokenizing workers' peak RSS | examples | train tokens |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, r in results:
        workers = f"{r['worker_peak_mib']:,.0f} MiB" if r["worker_peak_mib"] > 0 else "-"
        print(f"| {label} | {r['seconds']:.1f} s | {r['peak_mib']:,.0f} MiB | {r['above_start_mib']:,.0f} MiB | "
              f"{workers} | {r['examples']:,} | {r['train_tokens']:,} |")


if __name__ == "__main__":
    main()
