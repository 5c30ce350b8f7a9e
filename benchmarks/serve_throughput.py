"""Requests and generated tokens per second of ``qlorakit serve``: the llama.cpp backend against the transformers
backend, for 1 and 8 concurrent clients, in one invocation: the README's serving table.

    python benchmarks/serve_throughput.py                      # SmolLM2-135M-Instruct (embedded) trained 2 steps
    python benchmarks/serve_throughput.py --run_dir RUN        # an existing run instead
    python benchmarks/serve_throughput.py --requests 4 --max_tokens 32

Each backend is served on 127.0.0.1 from this process (uvicorn in a thread, as the tests do) and queried with the
openai client from C client threads, each sending N chat requests (a held-out closed-context question of
``resources/heldout_closed_context.jsonl``, greedy, ``max_tokens`` tokens). requests/s = all requests / wall time;
generated tokens/s = the sum of the replies' ``usage.completion_tokens`` / wall time. The llama.cpp backend serves
an f16 GGUF exported into the run directory (as ``qlorakit serve`` does when the run has none).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path


def questions(n: int) -> list[str]:
    rows = [json.loads(line) for line in
            resources.files("qlorakit.resources").joinpath("heldout_closed_context.jsonl").read_text().splitlines()]
    return [r["instruction"] for r in rows[:n]]


def load(url: str, clients: int, per_client: int, max_tokens: int, prompts: list[str]) -> dict:
    import openai

    client = openai.OpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600)

    def one_client(c: int) -> int:
        tokens = 0
        for i in range(per_client):
            prompt = prompts[(c * per_client + i) % len(prompts)]
            r = client.chat.completions.create(model="bench", max_tokens=max_tokens, temperature=0,
                                               messages=[{"role": "user", "content": prompt}])
            tokens += r.usage.completion_tokens
        return tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(one_client, range(clients)))
    wall = time.perf_counter() - start
    n = clients * per_client
    return {"clients": clients, "requests": n, "wall_s": wall, "req_per_s": n / wall, "tok_per_s": tokens / wall,
            "tokens": tokens}


def measure(run: Path, requests: int, max_tokens: int) -> list[dict]:
    from qlorakit.serve.command import BackgroundServer, build_app

    prompts = questions(16)
    rows = []
    for backend in ("llama.cpp", "transformers"):
        app = build_app(backend, run, "bench", "bench", max_tokens)
        with BackgroundServer(app, timeout=300) as url:
            load(url, 1, 1, max_tokens, prompts)  # warm-up: first-call costs are not throughput
            for clients in (1, 8):
                rows.append({"backend": backend, **load(url, clients, requests, max_tokens, prompts)})
                print(json.dumps(rows[-1]), flush=True)
        del app
    return rows


def cpu_name() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = "AVX512" if "avx512f" in info else "AVX2" if "avx2" in info else "no AVX2"
    import os

    return f"{name} ({flags}, {os.cpu_count()} cores)"


def table(rows: list[dict]) -> str:
    lines = ["| backend | concurrent clients | requests | wall s | requests/s | generated tokens/s |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['clients']} | {r['requests']} | {r['wall_s']:.1f} | "
                     f"{r['req_per_s']:.2f} | {r['tok_per_s']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run_dir", type=Path, help="an existing run (default: the embedded job trained --steps steps)")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps of the embedded default job")
    p.add_argument("--requests", type=int, default=2, help="requests per client")
    p.add_argument("--max_tokens", type=int, default=32, help="max_tokens of every request")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run_dir
        if run is None:
            from qlorakit.cli import main as qlorakit

            run = Path(tmp) / "run"
            assert qlorakit(["train", "--output_dir", str(run), "--max_steps", str(args.steps), "--save_strategy",
                             "no", "--eval_strategy", "no"]) == 0
        rows = measure(run, args.requests, args.max_tokens)
    print(f"\nqlorakit serve throughput, {args.requests} requests per client, max_tokens {args.max_tokens}, greedy; "
          f"CPU: {cpu_name()}\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
