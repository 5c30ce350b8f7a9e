"""The model card names the base by its public id wherever it describes the model, and by the exact local
directory only where a reader needs the weights the adapter was trained against (the loading snippet)."""

from __future__ import annotations

from qlorakit.config import TrainConfig
from qlorakit.data.mixture import SourceSummary
from qlorakit.resources import SAMPLE_DATASET
from qlorakit.train.card import write_card

SAMPLE = SourceSummary(str(SAMPLE_DATASET), "jsonl", "airoboros", "train", 200, 200, train_examples=200)


def _card(tmp_path, base_path: str, sources=(SAMPLE,)) -> str:
    out = tmp_path / "run"
    out.mkdir()
    cfg = TrainConfig()
    write_card(cfg, out, base_path, [{"step": 1, "epoch": 1.0, "loss": 1.5}], None, "finished",
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
