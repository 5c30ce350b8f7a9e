"""The model card names the base by its public id wherever it describes the model, and by the exact local
directory only where a reader needs the weights the adapter was trained against (the loading snippet)."""

from __future__ import annotations

from qlorakit.config import TrainConfig
from qlorakit.data.mixture import SourceSummary
from qlorakit.resources import SAMPLE_DATASET
from qlorakit.train.card import write_card

SAMPLE = SourceSummary(str(SAMPLE_DATASET), "jsonl", "airoboros", "train", 200, 200, train_examples=200)


def _card(tmp_path, base_path: str, sources=(SAMPLE,), metrics=None) -> str:
    out = tmp_path / "run"
    out.mkdir()
    cfg = TrainConfig()
    write_card(cfg, out, base_path, metrics or [{"step": 1, "epoch": 1.0, "loss": 1.5}], None, "finished",
               "USER: {instruction} ASSISTANT: {response}", list(sources))
    return (out / "README.md").read_text()


def test_default_base_is_named_by_hub_id_outside_the_loading_snippet(tmp_path):
    cache = str(tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct.Q4_1-0123456789ab")
    card = _card(tmp_path, cache)
    overview = card.split("## Overview", 1)[1].split("##", 1)[0]
    assert "`HuggingFaceTB/SmolLM2-135M-Instruct`" in overview and cache not in overview
    licence = card.split("## Licence and usage", 1)[1]
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in licence and cache not in licence
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    loading = card.split("## How to use", 1)[1].split("## Licence", 1)[0]
    assert repr(cache) in loading  # what from_pretrained needs to get the exact trained-against weights
    assert card.count(cache) == 1


def test_other_bases_keep_their_own_name(tmp_path):
    card = _card(tmp_path, "my-org/llama-7b")
    assert "A LoRA adapter for `my-org/llama-7b`" in card and "QLoRA, NF4 4-bit base with double quantization" in card


def test_card_states_the_highest_peak_gpu_memory_of_the_rows(tmp_path):
    """A resumed run's rows come from two processes: the card takes the highest of each peak, wherever it is (an
    eval row has none)."""
    rows = [{"step": 1, "epoch": 0.5, "loss": 1.5, "peak_allocated_gib": 7.25, "peak_reserved_gib": 9.5},
            {"step": 2, "epoch": 1.0, "loss": 1.2, "peak_allocated_gib": 8.125, "peak_reserved_gib": 9.0},
            {"step": 2, "epoch": 1.0, "eval_loss": 1.3, "eval_perplexity": 3.7},
            {"step": 3, "epoch": 1.5, "loss": 1.1, "peak_allocated_gib": 6.0, "peak_reserved_gib": 8.0}]
    results = _card(tmp_path, "my-org/llama-7b", metrics=rows).split("## Results", 1)[1].split("## How to use")[0]
    assert "Peak GPU memory in training: 8.12 GiB allocated, 9.50 GiB reserved" in results


def test_card_of_a_cpu_run_says_nothing_of_gpu_memory(tmp_path):
    card = _card(tmp_path, "my-org/llama-7b", metrics=[{"step": 1, "epoch": 1.0, "loss": 1.5},
                                                       {"step": 2, "epoch": 2.0, "loss": 1.2}])
    assert "Training loss went from 1.5000" in card
    assert "GPU memory" not in card and "GiB" not in card
