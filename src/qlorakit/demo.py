"""``make demo``: the embedded default job, then the tuned model beside the base model on unseen rows.

Trains SmolLM2-135M-Instruct (4-bit NF4, LoRA on all linear layers) on the shipped airoboros-style sample, then asks
both models closed-context questions about invented entities they have never seen, and scores whether each reply
contains the right fact and cites the source url.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path

from .console import quiet_libraries
from .resources import HELDOUT_CLOSED_CONTEXT as HELDOUT

def heldout_rows(n: int) -> list[dict]:
    rows = [json.loads(line) for line in HELDOUT.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows[:n]


def score(replies: list[str], rows: list[dict]) -> tuple[float, float]:
    """Share of replies that contain the expected fact, and share that cite the expected url."""
    answered = sum(r["answer"].lower() in reply.lower() for reply, r in zip(replies, rows))
    cited = sum(r["source"] in reply for reply, r in zip(replies, rows))
    return answered / len(rows), cited / len(rows)


def compare(run_dir: Path, n: int = 8, shown: int = 2) -> dict:
    """Replies of the tuned and the base model to ``n`` held-out rows, printed side by side, and their scores."""
    from .generation import Sampling, generate_replies
    from .runs import load_run
    from .data.formats import Message

    model, tokenizer, cfg = load_run(run_dir)
    rows = heldout_rows(n)
    prompts = [[Message("user", r["instruction"])] for r in rows]
    sampling = Sampling(max_new_tokens=80)
    tuned = generate_replies(model, tokenizer, cfg.prompt_format, prompts, sampling)
    with model.disable_adapter():
        base = generate_replies(model, tokenizer, cfg.prompt_format, prompts, sampling)
    wrap = lambda s: textwrap.indent(textwrap.fill(s.replace("\n", " / "), 100), "    ")  # noqa: E731
    for r, b, t in list(zip(rows, base, tuned))[:shown]:
        question = r["instruction"].split("BEGININSTRUCTION")[-1].replace("ENDINSTRUCTION", "").strip()
        print(f"\nQ: {question}\n  expected fact: {r['answer']}   source: {r['source']}")
        print(f"  base model:\n{wrap(b)}\n  tuned model:\n{wrap(t)}")
    result = {"rows": n, "base": score(base, rows), "tuned": score(tuned, rows)}
    print(f"\non {n} unseen closed-context rows      answers from the context   cites the source")
    for name in ("base", "tuned"):
        a, c = result[name]
        print(f"  {name + ' model':<34} {a:>22.0%} {c:>18.0%}")
    return result


def main() -> int:
    quiet_libraries()
    from .config import build_config
    from .errors import UserError
    from .train.loop import train

    out = os.environ.get("QLORAKIT_DEMO_DIR", "runs/default")
    t0 = time.perf_counter()
    try:
        cfg = build_config(["--output_dir", out])
        print(f"qlorakit demo: training the embedded default job into {out}", file=sys.stderr)
        train(cfg)
        trained = time.perf_counter() - t0
        print(f"\nqlorakit demo: trained in {trained / 60:.1f} min; now the base and tuned models answer questions "
              "about invented entities they have never seen", file=sys.stderr)
        compare(Path(out))
    except UserError as e:
        print(f"qlorakit demo: error: {e}", file=sys.stderr)
        return 2
    print(f"\nqlorakit demo: done in {(time.perf_counter() - t0) / 60:.1f} min. The run directory {out} holds the "
          f"adapter, metrics.jsonl and a model card (README.md); try: qlorakit chat {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
