"""Helpers the tests share: tiny random models built in-process, data rows, and readers of a run's files. Test files
import from here, never from each other."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from safetensors.torch import load_file

# Two SGD steps' worth of settings under which one update is exact arithmetic: plain SGD, no dropout, no clipping,
# float32, constant learning rate. Tests compare batch layouts and process counts under them.
SGD_ONE_STEP = ["--optim", "sgd", "--max_steps", "1", "--lora_dropout", "0", "--bf16", "false",
                "--max_grad_norm", "0", "--learning_rate", "0.5", "--save_strategy", "no", "--eval_strategy", "no",
                "--warmup_ratio", "0"]


def _save_tiny(model, tokenizer_dir: Path, out: Path) -> Path:
    from transformers import AutoTokenizer

    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def make_tiny_llama(tokenizer_dir: Path, out: Path, seed: int = 0) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True,
                      initializer_range=0.2)  # big enough embeddings that LoRA can move the logits
    return _save_tiny(LlamaForCausalLM(cfg), tokenizer_dir, out)


def make_tiny_mpt(tokenizer_dir: Path, out: Path, seed: int = 0) -> Path:
    from transformers import AutoTokenizer, MptConfig, MptForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    cfg = MptConfig(vocab_size=len(tok), d_model=64, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=1024,
                    initializer_range=0.2)
    return _save_tiny(MptForCausalLM(cfg), tokenizer_dir, out)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


WORDS = "alpha beta gamma delta river stone cloud maple orbit quartz violet ember lantern harbor".split()


def airoboros_rows(n: int, seed: int = 0) -> list[dict]:
    """Rows whose responses differ a lot in length (from one word to many sentences)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
        k = [1, 40][i % 2] * rng.randint(1, 2)
        a = " ".join(rng.choice(WORDS) for _ in range(k))
        rows.append({"instruction": f"Repeat some words about {q}.", "response": a})
    return rows


def pair_rows(n: int, seed: int = 0) -> list[dict]:
    """Preference rows (prompt/chosen/rejected) of a few random words each."""
    rng = random.Random(seed)
    say = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    return [{"prompt": f"Which word follows {say(rng.randint(2, 6))}?", "chosen": say(rng.randint(1, 4)),
             "rejected": say(rng.randint(1, 6))} for _ in range(n)]


def read_metrics(run_dir: Path, key: str | None = None) -> list[dict]:
    """The rows of a run's metrics.jsonl, in order; with ``key``, only the rows that have it."""
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if x]
    return [r for r in rows if key is None or key in r]


def train_with(args: list[str], progress: bool = True, **hooks):
    """``qlorakit train ARGS`` through the library rather than the command line, with some of the loop's
    collaborators replaced (the fields of qlorakit.train.setup.Hooks: evaluate, accumulate, free_memory). Returns the
    RunResult; a UserError is raised, not printed."""
    from qlorakit.config import build_config
    from qlorakit.train.loop import Hooks, train

    return train(build_config(args), progress=progress, hooks=Hooks(**hooks))


def scripted_eval(values: list[float]):
    """An ``evaluate`` hook for ``train_with`` that returns ``values`` in turn as eval losses instead of evaluating."""
    import math

    it = iter(values)

    def evaluate(model, examples, **kw):
        v = next(it)
        return {"eval_loss": v, "eval_perplexity": math.exp(v), "eval_tokens": 10}

    return evaluate


def scripted_answers(values: list[float]):
    """An ``answer`` hook for ``train_with`` that returns ``values`` in turn as every answer metric (eval_exact_match,
    eval_token_f1, eval_rouge_l) instead of generating."""
    it = iter(values)

    def answer(model, tokenizer, examples, *, n, **kw):
        v = next(it)
        return {"eval_exact_match": v, "eval_token_f1": v, "eval_rouge_l": v, "eval_answered": n}

    return answer


def adapter_weights(run_dir: Path, only_b: bool = False) -> dict:
    """The adapter tensors of a run (or a checkpoint), or only its lora_B ones."""
    w = load_file(Path(run_dir) / "adapter_model.safetensors")
    return {k: v for k, v in w.items() if "lora_B" in k or not only_b}


def lora_b(run_dir) -> dict:
    return adapter_weights(run_dir, only_b=True)


def rel_diff(a: dict, b: dict) -> float:
    """Relative L2 distance of two tensor dicts with the same keys (b against a)."""
    num = sum(float((a[k].float() - b[k].float()).norm() ** 2) for k in a) ** 0.5
    den = sum(float(a[k].float().norm() ** 2) for k in a) ** 0.5
    return num / den


def random_examples(lengths, vocab: int = 320, seed: int = 0):
    """Examples of random ids (3 <= id < vocab), every token trained: data that needs no tokenizer."""
    from qlorakit.data.tokenize import Example

    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
    return [Example(r, list(r)) for r in rows]


def lora_model(base, dropout: float, fused: bool):
    """``base`` with LoRA r 4 on every linear layer, in train mode, lora_B drawn small (so the branch is not 0):
    through the fused branch (``fused``), or with every fused layer put back on peft's own forward."""
    from qlorakit.model.fused_lora import fusable_classes
    from qlorakit.model.lora import add_lora, target_modules

    model = add_lora(base, r=4, alpha=8, dropout=dropout, modules=target_modules(base, "all"), seed=0)
    layers = [m for m in model.modules() if type(m) in fusable_classes()]
    assert layers and all("forward" in vars(m) for m in layers)  # add_lora routed every layer through the fusion
    if not fused:
        for m in layers:
            del m.forward  # back to the class's own forward (peft's lora.Linear or lora.Linear4bit)
    gen = torch.Generator().manual_seed(7)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05, generator=gen)
    model.train()
    return model
