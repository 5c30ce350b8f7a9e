"""qlorakit compare: runs and their base scored on the same rows side by side, example answers, and the size of
each adapter's update by layer and module type."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import airoboros_rows, write_jsonl
from qlorakit.cli import main


def fresh_copy(run_dir, dest):
    """``run_dir`` with every lora_B zero: the adapter as LoRA initializes it, which changes nothing."""
    shutil.copytree(run_dir, dest)
    w = load_file(dest / "adapter_model.safetensors")
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in w.items()},
              dest / "adapter_model.safetensors")
    return dest


def test_compare_two_runs_beside_the_base(run_dir, tiny_llama, tmp_path, capsys):
    fresh = fresh_copy(run_dir, tmp_path / "fresh")
    data = write_jsonl(tmp_path / "e.jsonl", airoboros_rows(4, seed=9))
    out = tmp_path / "c.json"
    assert main(["compare", str(run_dir), str(fresh), "--dataset", str(data), "--generate", "3", "--examples", "1",
                 "--max_new_tokens", "8", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert list(res["scores"]) == ["base", "run", "fresh"] and res["rows"]["answered"] == 3
    header = next(ln for ln in printed.splitlines() if ln.split() == ["base", "run", "fresh"])
    assert header
    for label, key in (("eval loss", "eval_loss"), ("exact match", "exact_match"), ("token F1", "token_f1"),
                       ("ROUGE-L", "rouge_l")):
        line = next(ln for ln in printed.splitlines() if ln.startswith(label + " "))
        assert [float(x) for x in line[len(label):].split()] == pytest.approx(
            [res["scores"][m][key] for m in ("base", "run", "fresh")], abs=5e-5)
    base, tuned, zero = (res["scores"][m] for m in ("base", "run", "fresh"))
    # a fresh adapter is the base: the same loss and the same answers, to the bit
    assert zero["eval_loss"] == base["eval_loss"] and zero["answers"] == base["answers"]
    assert tuned["eval_loss"] != pytest.approx(base["eval_loss"], rel=1e-3)
    assert "example 1:" in printed and "reference:" in printed and f"  run: {tuned['answers'][0]}"[:40] in printed
    sizes = res["update_sizes"]
    assert sizes["fresh"]["all"] == 0 and not any(sizes["fresh"]["by_layer"].values())
    assert sizes["run"]["all"] > 0 and all(v > 0 for v in sizes["run"]["by_module"].values())
    assert list(sizes["run"]["by_layer"]) == ["0", "1"]  # the tiny model's two layers
    assert "where each adapter changed the model" in printed
    assert next(ln for ln in printed.splitlines() if ln.startswith("layer 0 "))
    assert next(ln for ln in printed.splitlines() if ln.startswith("q_proj "))

    # the q_proj figure by hand: ||B A * alpha/r|| / ||W|| over both layers, W the base's unquantized weights
    # (the run's base is 4-bit, its dequantized W a little different: hence the tolerance)
    cfg = json.loads((run_dir / "adapter_config.json").read_text())
    ad, w = load_file(run_dir / "adapter_model.safetensors"), load_file(tiny_llama / "model.safetensors")
    d2 = w2 = 0.0
    for i in range(2):
        a = ad[f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight"]
        b = ad[f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight"]
        d2 += float(((b @ a) * cfg["lora_alpha"] / cfg["r"]).pow(2).sum())
        w2 += float(w[f"model.layers.{i}.self_attn.q_proj.weight"].pow(2).sum())
    assert sizes["run"]["by_module"]["q_proj"] == pytest.approx((d2 / w2) ** 0.5, rel=0.05)


def test_compare_defaults_to_the_packaged_held_out_rows(run_dir, tmp_path, capsys):
    out = tmp_path / "c.json"
    assert main(["compare", str(run_dir), "--generate", "1", "--max_new_tokens", "4", "--examples", "0",
                 "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["rows"] == {"source": "the packaged held-out closed-context questions", "scored": 40, "answered": 1}
    assert "from the packaged held-out closed-context questions" in capsys.readouterr().out


def test_runs_of_another_base_are_refused_in_one_line(run_dir, tmp_path, capsys):
    other = fresh_copy(run_dir, tmp_path / "other")
    cfg = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps(cfg | {"base_model_name_or_path": "someone/else"}))
    assert main(["compare", str(run_dir), str(other)]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "trained on someone/else" in err and "compare runs of one base" in err


def test_compare_scores_the_runs_own_eval_split(tiny_llama, tmp_path):
    """A run with an eval split is compared on it: the same examples, the same loss as training's last evaluation
    (max_steps 1: one evaluation, of the adapter that was saved)."""
    from helpers import read_metrics

    data = write_jsonl(tmp_path / "train.jsonl", airoboros_rows(8))
    out = tmp_path / "split"
    assert main(["train", "--model_name_or_path", str(tiny_llama), "--dataset", str(data), "--output_dir", str(out),
                 "--eval_dataset_size", "3", "--eval_strategy", "steps", "--eval_steps", "1", "--max_steps", "1",
                 "--eval_generate", "0", "--save_strategy", "no", "--bf16", "false", "--learning_rate", "0.02"]) == 0
    res_file = tmp_path / "c.json"
    assert main(["compare", str(out), "--generate", "0", "--output", str(res_file)]) == 0
    res = json.loads(res_file.read_text())
    assert res["rows"]["source"] == f"the eval split of {out}" and res["rows"]["scored"] == 3
    (row,) = read_metrics(out, "eval_loss")
    assert res["scores"]["split"]["eval_loss"] == pytest.approx(row["eval_loss"], rel=1e-3)  # 4-bit base reloaded
    assert res["scores"]["split"]["eval_tokens"] == row["eval_tokens"]
