"""A randomly initialised LLaMA of one of ``common.SHAPES``, saved in bf16 as a Hugging Face directory, with a
word-level tokenizer over its ids (``t0`` .. ``tN``): what every tool of the GPU benchmark loads and quantizes.

    python benchmarks/gpu/make_model.py --shape llama2-7b --out /dev/shm/llama2-7b [--device cuda]
"""

from __future__ import annotations

import argparse
import time

from common import SHAPES, write_json


def make_tokenizer(vocab: int, out: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t1", eos_token="t2",
                                   bos_token="t3")
    fast.save_pretrained(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--report", help="JSON file for the timings")
    args = p.parse_args(argv)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    t0 = time.perf_counter()
    cfg = LlamaConfig(**SHAPES[args.shape], tie_word_embeddings=False, bos_token_id=3, eos_token_id=2,
                      pad_token_id=1)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    t_init = time.perf_counter()
    model.save_pretrained(args.out)
    make_tokenizer(cfg.vocab_size, args.out)
    t_saved = time.perf_counter()
    n = sum(p.numel() for p in model.parameters())
    print(f"{args.shape}: {n / 1e9:.2f} B parameters, init {t_init - t0:.1f} s, saved {t_saved - t_init:.1f} s "
          f"to {args.out}", flush=True)
    if args.report:
        write_json(args.report, {"shape": args.shape, "parameters": n, "init_seconds": t_init - t0,
                                 "save_seconds": t_saved - t_init, "dir": args.out})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
