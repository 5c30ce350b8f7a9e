"""qlorakit plan --compare: each model's layers, shapes and LoRA parameters side by side, the counts peft's own
adapters have, and the README's two lines on MPT-30B against LLaMA-33B from the command's numbers."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import pytest

from qlorakit.cli import main
from qlorakit.plan.command import load_model_config
from qlorakit.plan.compare import tunable


def test_mpt_30b_against_llama_33b(capsys):
    assert main(["plan", "--compare", "mpt-30b", "llama-33b"]) == 0
    out = capsys.readouterr().out
    split = [re.split(r"\s{2,}", line.strip()) for line in out.splitlines()]
    cells = {row[0]: row[1:] for row in split}  # label: one cell per model (a later row of the label wins)
    assert out.startswith("LoRA r=64 on all linear layers")
    assert cells["decoder layers"] == ["48", "60"] and cells["hidden size"] == ["7,168", "6,656"]
    assert cells["MLP width"] == ["28,672", "17,920"]
    r = 64  # A (r x in) and B (out x r) per adapted layer
    assert cells["Wqkv"] == [f"7168x21504: {r * (7168 + 3 * 7168):,}", "-"]
    assert cells["gate_proj"] == ["-", f"6656x17920: {r * (6656 + 17920):,}"]
    assert cells["up_proj"] == [f"7168x28672: {r * (7168 + 28672):,}", f"6656x17920: {r * (6656 + 17920):,}"]
    mpt_layer = r * ((7168 + 21504) + (7168 + 7168) + 2 * (7168 + 28672))
    llama_layer = r * (4 * (6656 + 6656) + 3 * (6656 + 17920))
    assert cells["every adapted layer"] == [f"{mpt_layer:,}", f"{llama_layer:,}"]
    assert cells["all"] == [f"{48 * mpt_layer:,}", f"{60 * llama_layer:,}"]
    assert cells["adapted MLP matrices"] == ["96", "180"]


def test_lora_settings_apply_to_every_model(capsys):
    assert main(["plan", "--compare", "llama-33b", "llama-65b", "--lora_r", "8", "--lora_modules",
                 "q_proj,v_proj"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("LoRA r=8 on q_proj,v_proj") and "gate_proj" not in out
    assert re.search(r"^  all +12,779,520 +20,971,520$", out, re.M)  # 8 x 2 x 2h, per layer, x layers


@pytest.mark.parametrize("arch", ["llama", "mpt"])
def test_counts_are_those_of_peft_adapters(arch):
    """The comparison's per-kind counts for a small model's config are the trainable parameters peft puts there.
    (MPT at expansion ratio 4, as every published MPT has: transformers' MptMLP is 4 x hidden whatever the ratio.)"""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, MptConfig

    from qlorakit.model.lora import add_lora, target_modules

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2) if arch == "llama" else \
        MptConfig(vocab_size=256, d_model=64, n_heads=4, n_layers=3, expansion_ratio=4)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config)
    t = tunable(arch, config.to_dict(), 8, "all")
    model = add_lora(base, r=8, alpha=16, dropout=0.0, modules=target_modules(base, "all"), seed=0)
    per_module: dict[str, int] = defaultdict(int)
    for name, p in model.named_parameters():
        if p.requires_grad:
            per_module[name.split(".lora_")[0].rsplit(".", 1)[-1]] += p.numel()
    assert dict(per_module) == {lin.name: t.arch.layers * t.params(lin) for lin in t.targets}
    assert sum(per_module.values()) == t.total() and len(t.targets) == (7 if arch == "llama" else 4)


def test_readme_says_what_the_comparison_shows():
    mpt, llama = (tunable(n, load_model_config(n)[0], 64, "all") for n in ("mpt-30b", "llama-33b"))
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    (line,) = [x for x in readme.splitlines() if x.startswith("**MPT-30B against LLaMA-33B**")]
    nxt = readme.splitlines()[readme.splitlines().index(line) + 1]
    assert "Perhaps there are fewer forward layers that can be tuned?" in line
    assert f"{mpt.mlp_matrices()} MLP matrices ({mpt.arch.layers} layers x 2) against {llama.mlp_matrices()} " \
           f"({llama.arch.layers} x 3)" in line
    assert f"{mpt.total() / 1e6:.1f}M parameters, {mpt.mlp_total() / 1e6:.1f}M of them in the MLPs, against " \
           f"LLaMA-33B's {llama.total() / 1e6:.1f}M and {llama.mlp_total() / 1e6:.1f}M: " \
           f"{mpt.total() / llama.total():.0%} as many" in nxt
