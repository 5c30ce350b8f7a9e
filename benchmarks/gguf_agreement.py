"""How closely llama.cpp's run of each GGUF export follows the merged transformers model: the README's table.

    python benchmarks/gguf_agreement.py              # SmolLM2-135M-Instruct (embedded) trained 4 steps, 6 outtypes
    python benchmarks/gguf_agreement.py --steps 2    # a quicker run

It trains the embedded default job for a few steps (``qlorakit train --max_steps N``), merges the adapter as
``qlorakit export`` does (dequantized 4-bit base + LoRA, float32), exports that merge to every outtype with
``export_gguf`` (llama.cpp's converter and quantizer where installed), loads each file in llama.cpp
(llama-cpp-python, ``logits_all=True``) and feeds it the same token ids as the merged model: 8 held-out rows of
``resources/heldout_closed_context.jsonl`` in the run's prompt format, prompt and reference answer. Printed per
outtype: file size, the tensor types llama.cpp's quantizer chose, and the share of positions where both predict the
same next token, overall and where the merged model is decisive (its two best logits at least 0.2 apart).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from collections import Counter
from importlib import resources
from pathlib import Path

import numpy as np
import torch

OUTTYPES = ("f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m")


def heldout_texts(tokenizer, prompt_format: str, n: int = 8) -> list[str]:
    from qlorakit.data.formats import Message
    from qlorakit.data.templates import render_text

    rows = [json.loads(line) for line in
            resources.files("qlorakit.resources").joinpath("heldout_closed_context.jsonl").read_text().splitlines()]
    return [render_text([Message("user", r["instruction"]), Message("assistant", r["response"])], prompt_format,
                        tokenizer) for r in rows[:n]]


def measure(work: Path, steps: int = 4) -> list[dict]:
    """Train, merge, export every outtype, compare in llama.cpp; one dict per outtype."""
    import gguf
    import llama_cpp

    from qlorakit.cli import main
    from qlorakit.export.gguf import export_gguf
    from qlorakit.export.merge import merged_model, save_merged

    run = work / "run"
    assert main(["train", "--output_dir", str(run), "--max_steps", str(steps), "--save_strategy", "no",
                 "--eval_strategy", "no"]) == 0
    model, tokenizer, cfg = merged_model(run, "dequantized", "fp32")
    merged = save_merged(model, tokenizer, cfg, work / "merged", run, "dequantized")
    texts = heldout_texts(tokenizer, cfg.prompt_format)
    with torch.no_grad():
        reference = [model(torch.tensor([tokenizer(t).input_ids])).logits[0].float().numpy() for t in texts]
    del model
    ref = np.concatenate(reference)
    top2 = np.sort(ref, axis=-1)[:, -2:]
    decisive = top2[:, 1] - top2[:, 0] >= 0.2
    rows = []
    for outtype in OUTTYPES:
        out = export_gguf(merged, work / f"smollm2-{outtype}.gguf", outtype, chat_template=tokenizer.chat_template)
        llm = llama_cpp.Llama(model_path=str(out), logits_all=True, n_ctx=2048, n_threads=2, verbose=False)
        logits = []
        for text in texts:
            ids = tokenizer(text).input_ids
            llm.reset()
            llm.eval(ids)
            logits.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
        del llm
        got = np.concatenate(logits)
        same = ref.argmax(-1) == got.argmax(-1)
        types = Counter(t.tensor_type.name for t in gguf.GGUFReader(out).tensors if len(t.shape) > 1)
        rows.append({"outtype": outtype, "mib": out.stat().st_size / 2**20, "positions": len(same),
                     "agreement": float(same.mean()), "decisive": float(same[decisive].mean()),
                     "n_decisive": int(decisive.sum()), "types": dict(types)})
        out.unlink()
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| outtype | file MiB | 2-D tensors by type | agreement (all positions) | agreement (decisive) |",
             "|---|---:|---|---:|---:|"]
    for r in rows:
        types = ", ".join(f"{n} {t}" for t, n in sorted(r["types"].items(), key=lambda kv: -kv[1]))
        lines.append(f"| {r['outtype']} | {r['mib']:.1f} | {types} | {r['agreement']:.3f} of {r['positions']} | "
                     f"{r['decisive']:.3f} of {r['n_decisive']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps of the default job before export")
    args = parser.parse_args(argv)
    flags = open("/proc/cpuinfo").read() if Path("/proc/cpuinfo").exists() else ""
    cpu = "AVX512-BF16" if "avx512_bf16" in flags else ("AVX512" if "avx512f" in flags else "AVX2 or less")
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(Path(tmp), args.steps)
    from qlorakit.export.gguf_llama_cpp import find_converter

    converter = "llama.cpp's convert_hf_to_gguf.py" if find_converter() else "qlorakit's writer"
    print(f"SmolLM2-135M-Instruct trained {args.steps} steps; {platform.processor() or platform.machine()}, {cpu}; "
          f"llama-cpp-python {__import__('llama_cpp').__version__}; {converter}, llama.cpp's quantizer")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
