"""Shared fixtures: tiny random LLaMA and MPT models built in-process with the SmolLM2 tokenizer (no downloads)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from qlorakit.model.load import default_gguf

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tok")
    gguf = default_gguf()
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from qlorakit.model.load import load_tokenizer

    return load_tokenizer(str(tokenizer_dir))


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


@pytest.fixture(scope="session")
def tiny_llama(tokenizer_dir, tmp_path_factory) -> Path:
    return make_tiny_llama(tokenizer_dir, tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_mpt(tokenizer_dir, tmp_path_factory) -> Path:
    return make_tiny_mpt(tokenizer_dir, tmp_path_factory.mktemp("tiny_mpt"))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def airoboros_rows(n: int, seed: int = 0) -> list[dict]:
    """Rows whose responses differ a lot in length (from one word to many sentences)."""
    import random

    rng = random.Random(seed)
    words = "alpha beta gamma delta river stone cloud maple orbit quartz violet ember lantern harbor".split()
    rows = []
    for i in range(n):
        q = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
        k = [1, 40][i % 2] * rng.randint(1, 2)
        a = " ".join(rng.choice(words) for _ in range(k))
        rows.append({"instruction": f"Repeat some words about {q}.", "response": a})
    return rows


@pytest.fixture()
def small_dataset(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", airoboros_rows(16))
