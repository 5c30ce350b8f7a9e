"""Fixtures for tests/model: a tiny LLaMA that needs no tokenizer, for the CUDA tests (the GPU machine has no GGUF)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def bare_llama(tmp_path_factory):
    """A 2-layer LLaMA (GQA, 320 ids) saved as a Hugging Face directory without tokenizer files."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=False, initializer_range=0.2)
    out = tmp_path_factory.mktemp("bare_llama")
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out

