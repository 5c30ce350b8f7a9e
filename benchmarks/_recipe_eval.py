"""The evaluation side of benchmarks/recipes.py: one saved LoRA adapter (qlorakit's run directory or TRL's output
directory alike) on the held-out rows, as a process of its own. The same code for every arm and for TRL's row:

* the base model loaded as both tools trained it (4-bit NF4, double quantization, float32 compute) with qlorakit's
  loader, its 4-bit weights dequantized once (the same numbers bitsandbytes computes in every call, faster), the
  adapter put on with peft's ``PeftModel.from_pretrained`` (its config says LoRA, rsLoRA or DoRA), LoRA weights in
  float32, dropout off;
* eval loss: mean cross-entropy per response token (response + EOS) of each held-out row in the airoboros format,
  the prompt tokenized on its own (qlorakit's tokenization, and how the model is prompted at inference);
* replies: greedy decoding (``qlorakit.generation.generate_replies``: the airoboros prompt up to where the reply
  begins, left-padded batches, stopped at EOS or ``--max_new_tokens``).

Writes ``--out`` (JSON): eval_loss, trained tokens, the replies in row order, seconds taken.
"""

from __future__ import annotations

import argparse
import json
import os
import time

for _k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_k, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROMPT_FORMAT = "airoboros"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="the base model directory both tools trained on")
    p.add_argument("--adapter", required=True, help="a directory with adapter_config.json")
    p.add_argument("--eval", required=True, help="held-out rows (airoboros JSONL)")
    p.add_argument("--out", required=True)
    p.add_argument("--max_new_tokens", type=int, default=72)
    p.add_argument("--batch_size", type=int, default=8)
    return p.parse_args(argv)


def load(model_dir: str, adapter: str):
    import torch
    from peft import PeftModel

    from qlorakit.devices import device_for_training
    from qlorakit.model.load import cache_dequantized, load_base_model, load_tokenizer

    device = device_for_training()
    base = load_base_model(model_dir, bits=4, quant_type="nf4", double_quant=True, bf16=False, device=device)
    if device.type == "cpu":
        cache_dequantized(base, torch.float32)
    model = PeftModel.from_pretrained(base, adapter)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
    model.eval()
    return model, load_tokenizer(model_dir)


def eval_loss(model, tokenizer, convs) -> tuple[float, int]:
    """Mean loss per trained (response) token over ``convs``, one row at a time, no padding."""
    import torch
    import torch.nn.functional as F

    from qlorakit.data.templates import render_segments
    from qlorakit.data.tokenize import IGNORE, segments_to_ids

    total, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for conv in convs:
            ids, labels = segments_to_ids(render_segments(conv.messages, PROMPT_FORMAT, tokenizer), tokenizer)
            logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, :-1]  # (T-1, V)
            target = torch.tensor(labels[1:], device=device)
            keep = target != IGNORE
            total += float(F.cross_entropy(logits[keep].float(), target[keep], reduction="sum"))
            count += int(keep.sum())
    return total / max(count, 1), count


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    from qlorakit.console import quiet_libraries
    from qlorakit.data.formats import read_jsonl
    from qlorakit.generation import Sampling, generate_replies

    quiet_libraries()
    model, tokenizer = load(args.model, args.adapter)
    convs = read_jsonl(args.eval, "airoboros")
    t_loaded = time.perf_counter()
    loss, tokens = eval_loss(model, tokenizer, convs)
    t_loss = time.perf_counter()
    prompts = [[m for m in c.messages if m.role != "assistant"] for c in convs]
    replies = generate_replies(model, tokenizer, PROMPT_FORMAT, prompts,
                               Sampling(max_new_tokens=args.max_new_tokens, temperature=0.0), args.batch_size)
    t_gen = time.perf_counter()
    report = {"eval_loss": loss, "eval_tokens": tokens, "replies": replies, "load_seconds": t_loaded - t0,
              "loss_seconds": t_loss - t_loaded, "generate_seconds": t_gen - t_loss}
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(report, f, ensure_ascii=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
