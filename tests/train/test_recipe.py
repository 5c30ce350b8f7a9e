"""The defaults by model size (``recipe``): the measured small-model defaults under 1B parameters, QLoRA's above,
and never over a key the user gave."""

from __future__ import annotations

import json

import pytest
import yaml

from helpers import airoboros_rows, write_jsonl
from qlorakit.cli import main
from qlorakit.config import TrainConfig, build_config
from qlorakit.train.recipe import apply_recipe, base_parameters

RULE_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "learning_rate", "gradient_accumulation_steps")


def values(cfg) -> tuple:
    return tuple(getattr(cfg, k) for k in RULE_KEYS)


@pytest.mark.parametrize("parameters, want", [
    (0.135e9, None),  # the defaults as they are
    (7e9, (64, 16.0, 0.1, 2e-4, 4)),  # QLoRA's 7B/13B: batch 4 x 4 = 16
    (33e9, (64, 16.0, 0.05, 1e-4, 4)),  # QLoRA's 33B/65B
])
def test_auto_picks_by_size(parameters, want):
    cfg = build_config([])
    got = apply_recipe(cfg, parameters)[0]
    assert values(got) == (want or values(cfg))
    assert got.recipe == ("small" if want is None else "qlora")


def test_a_given_key_is_kept_even_at_its_default_value():
    """--learning_rate 5e-4 is the default's value: a rule that took "differs from the default" for "given" would
    replace it; the user said it, so it stays."""
    cfg = build_config(["--learning_rate", "5e-4", "--lora_r", "16"])
    got, note = apply_recipe(cfg, 7e9)
    assert note.startswith("recipe: qlora (7.00B parameters)") and "lora_alpha 16" in note
    assert "learning_rate" not in note and "lora_r" not in note  # the log names only what the recipe set
    assert (got.learning_rate, got.lora_r) == (5e-4, 16)
    assert (got.lora_alpha, got.lora_dropout) == (16.0, 0.1)  # the keys left out follow the rule


def test_yaml_keys_count_as_given_and_the_batch_is_left_alone(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("lora_dropout: 0.2\nper_device_train_batch_size: 2\n")
    got = apply_recipe(build_config([str(y)]), 7e9)[0]
    assert (got.lora_dropout, got.per_device_train_batch_size, got.gradient_accumulation_steps) == (0.2, 2, 1)
    assert got.lora_r == 64


def test_the_qlora_recipe_trains_the_responses_only_and_small_keeps_the_prompt_weight():
    """QLoRA's scripts train on the responses (train_on_source false); the small recipe keeps the measured 0.1."""
    assert apply_recipe(build_config([]), 7e9)[0].prompt_loss_weight == 0.0
    assert apply_recipe(build_config([]), 0.135e9)[0].prompt_loss_weight == 0.1
    assert apply_recipe(build_config(["--prompt_loss_weight", "0.1"]), 7e9)[0].prompt_loss_weight == 0.1


def test_explicit_recipe_wins_over_size_and_preference_methods_move_less():
    assert values(apply_recipe(build_config(["--recipe", "small"]), 70e9)[0]) == values(build_config([]))
    assert apply_recipe(build_config(["--recipe", "qlora"]), 0.135e9)[0].lora_r == 64
    assert apply_recipe(build_config(["--method", "dpo"]), 7e9)[0].learning_rate == 5e-6


def test_init_from_keeps_its_adapter_shape():
    cfg = TrainConfig(init_from="runs/sft")  # apply_init_from has set the starting run's shape
    got = apply_recipe(cfg, 7e9)[0]
    assert (got.lora_r, got.lora_alpha, got.learning_rate) == (cfg.lora_r, cfg.lora_alpha, 2e-4)


def test_parameters_are_counted_from_the_config_alone(tmp_path):
    """A 1.1B LLaMA's config.json, no weights: counted on the meta device, and auto picks QLoRA's recipe."""
    h, inter, layers, vocab, heads, kv = 2048, 5632, 22, 32000, 32, 4
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
        "tie_word_embeddings": False}))
    kv_dim = h // heads * kv
    want = 2 * vocab * h + layers * (2 * h * h + 2 * h * kv_dim + 3 * h * inter + 2 * h) + h
    assert base_parameters(str(tmp_path)) == want
    assert apply_recipe(build_config(["--model_name_or_path", str(tmp_path)]))[0].lora_r == 64


def test_a_run_records_the_recipe_and_trains_with_its_values(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", airoboros_rows(8))
    out = tmp_path / "run"
    assert main(["train", "--model_name_or_path", str(tiny_llama), "--dataset", str(data), "--output_dir", str(out),
                 "--recipe", "qlora", "--learning_rate", "0.01", "--max_steps", "1", "--save_strategy", "no",
                 "--eval_generate", "0"]) == 0
    saved = yaml.safe_load((out / "qlorakit_config.yaml").read_text())
    assert saved["recipe"] == "qlora" and saved["learning_rate"] == 0.01  # given: kept
    assert (saved["lora_r"], saved["lora_alpha"], saved["gradient_accumulation_steps"]) == (64, 16.0, 4)
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], adapter["lora_dropout"]) == (64, 16.0, 0.1)
    out2 = tmp_path / "run2"  # auto on a tiny model: the small recipe, the defaults unchanged
    assert main(["train", "--model_name_or_path", str(tiny_llama), "--dataset", str(data), "--output_dir", str(out2),
                 "--max_steps", "1", "--save_strategy", "no", "--eval_generate", "0"]) == 0
    saved = yaml.safe_load((out2 / "qlorakit_config.yaml").read_text())
    assert (saved["recipe"], saved["lora_r"], saved["learning_rate"]) == ("small", 16, 5e-4)
