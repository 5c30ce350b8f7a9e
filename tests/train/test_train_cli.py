"""Train end to end through the CLI on tiny random MPT and LLaMA models in 4-bit; the run directory is usable."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import airoboros_rows, read_metrics, write_jsonl
from qlorakit.cli import main

FAST = ["--max_steps", "10", "--learning_rate", "0.01", "--per_device_train_batch_size", "4",
        "--warmup_ratio", "0", "--save_strategy", "no", "--logging_steps", "1"]


@pytest.mark.parametrize("arch", ["llama", "mpt"])
def test_tiny_model_trains_in_4bit_and_loss_falls(arch, request, tmp_path):
    model_dir = request.getfixturevalue(f"tiny_{arch}")
    data = write_jsonl(tmp_path / "d.jsonl", airoboros_rows(8))
    out = tmp_path / "run"
    assert main(["train", "--model_name_or_path", str(model_dir), "--dataset", str(data), "--output_dir", str(out),
                 "--eval_dataset_size", "0", *FAST, *(["--mpt", "true"] if arch == "mpt" else [])]) == 0
    ls = [r["loss"] for r in read_metrics(out, "loss")]
    assert len(ls) == 10
    assert sum(ls[-2:]) / 2 < 0.9 * sum(ls[:2]) / 2, ls
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 16
    if arch == "mpt":  # MPT's linear layers by their own names, all of them but the head
        assert set(cfg["target_modules"]) == {"Wqkv", "out_proj", "up_proj", "down_proj"}
    else:
        assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"}
    assert {"step", "epoch", "loss", "learning_rate", "tokens_per_second"} <= set(read_metrics(out)[0])


def test_run_dir_loads_with_plain_peft(tiny_llama, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = write_jsonl(tmp_path / "d.jsonl", airoboros_rows(8))
    out = tmp_path / "run"
    assert main(["train", "--model_name_or_path", str(tiny_llama), "--dataset", str(data), "--output_dir", str(out),
                 "--eval_dataset_size", "2", "--max_steps", "3", "--learning_rate", "0.01",
                 "--save_strategy", "no"]) == 0
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "qlorakit_config.yaml",
                 "metrics.jsonl", "README.md", "prompt_format.json"):
        assert (out / name).is_file(), name
    base_path = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = AutoModelForCausalLM.from_pretrained(base_path)  # plain transformers can load the named base
    model = PeftModel.from_pretrained(base, out)
    saved = load_file(out / "adapter_model.safetensors")
    loaded = {k: v for k, v in model.state_dict().items() if "lora_B" in k}
    assert loaded and all(v.abs().sum() > 0 for v in loaded.values())  # trained B, not the zero init
    assert len(loaded) == sum("lora_B" in k for k in saved)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("hello there", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlicense:") and "## Licence and usage" in card
    assert "base_model:" not in card and str(tiny_llama) not in card  # a local base: named by its folder, not its path
    assert "eval loss" in card  # the held-out split was evaluated and reported


def test_eval_split_is_reported(tiny_llama, tmp_path, caplog):
    import logging

    data = write_jsonl(tmp_path / "d.jsonl", airoboros_rows(10))
    with caplog.at_level(logging.INFO, logger="qlorakit"):
        assert main(["train", "--model_name_or_path", str(tiny_llama), "--dataset", str(data), "--output_dir",
                     str(tmp_path / "r"), "--eval_dataset_size", "0.2", "--max_steps", "1", "--save_strategy",
                     "no"]) == 0
    text = caplog.text
    assert "2 of 10 rows held out (seed 42)" in text and "8 examples kept" in text


@pytest.mark.parametrize("setting,free,want_on,why", [
    ("auto", None, False, "auto: the largest micro-batch"),  # the real free memory: plenty for a tiny model
    ("auto", 64 * 1024, True, "auto: the largest micro-batch"),  # 64 KiB free: the activations would not fit
    ("true", None, True, "asked for"),
    ("false", 64 * 1024, False, "asked for"),
])
def test_gradient_checkpointing_only_where_memory_needs_it(tiny_llama, tmp_path, caplog, setting, free, want_on,
                                                           why):
    """The decision is logged and takes effect on the decoder layers (a device with 64 KiB free through the setup's
    free_memory hook); a step runs either way."""
    import logging

    from qlorakit.config import build_config
    from qlorakit.train.finish import finish
    from qlorakit.train.fit import fit
    from qlorakit.train.setup import Hooks, setup

    data = write_jsonl(tmp_path / "d.jsonl", airoboros_rows(6))
    cfg = build_config(["--model_name_or_path", str(tiny_llama), "--dataset", str(data), "--output_dir",
                        str(tmp_path / "r"), "--max_steps", "1", "--save_strategy", "no",
                        "--gradient_checkpointing", setting])
    with caplog.at_level(logging.INFO, logger="qlorakit"):
        run = setup(cfg, hooks=Hooks(free_memory=lambda device: free) if free is not None else None)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("gradient checkpointing:"))
    assert line.startswith(f"gradient checkpointing: {'on' if want_on else 'off'} ({why}"), line
    recomputing = [m for m in run.model.modules() if getattr(m, "gradient_checkpointing", False)]
    assert bool(recomputing) == want_on  # it took effect on the decoder layers, or nothing recomputes
    assert finish(run, fit(run)).steps == 1


@pytest.mark.parametrize("where", ["file", "under a file"])
def test_output_dir_that_is_a_file_is_one_line_before_the_model_loads(tmp_path, capsys, where):
    taken = tmp_path / "notes.txt"
    taken.write_text("not a run directory")
    out = taken if where == "file" else taken / "run"
    # no model at that path: an error about it would mean the model was loaded first
    assert main(["train", "--model_name_or_path", str(tmp_path / "no-model"), "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "error: output_dir: " in err and str(out) in err and "no-model" not in err
    assert ("is a file, not a directory" in err) if where == "file" else ("cannot create" in err)
    assert taken.read_text() == "not a run directory"
