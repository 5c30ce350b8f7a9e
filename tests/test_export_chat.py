"""Use the tuned model: merge (plain transformers), GGUF export, chat and generate in the training format."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import airoboros_rows, write_jsonl
from qlorakit.cli import main

HELD_OUT = ("The committee met on a cold morning to review the harbor lanterns. Violet maple orbit quartz ember. "
            "Please repeat some words about the river stone and the cloud.")


@pytest.fixture(scope="module")
def run_dir(tiny_llama, tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    data = write_jsonl(d / "d.jsonl", airoboros_rows(8))
    out = d / "run"
    assert main(["train", "--model_name_or_path", str(tiny_llama), "--dataset", str(data), "--output_dir", str(out),
                 "--max_steps", "6", "--learning_rate", "0.02", "--max_grad_norm", "1", "--save_strategy", "no",
                 "--eval_strategy", "no", "--bf16", "false"]) == 0
    return out


def next_tokens(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits[0].argmax(-1)


def test_merged_model_predicts_like_the_adapter(run_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlorakit.chat import load_run

    out = tmp_path / "merged"
    assert main(["merge", str(run_dir), "--output", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # plain transformers, no peft
    tok = AutoTokenizer.from_pretrained(out)
    adapter_model, _, _ = load_run(run_dir)
    ids = tok(HELD_OUT, return_tensors="pt").input_ids
    agree = (next_tokens(merged, ids) == next_tokens(adapter_model, ids)).float().mean().item()
    assert agree >= 0.97, agree
    with adapter_model.disable_adapter():  # the adapter matters: the base alone predicts differently
        base_agree = (next_tokens(adapter_model, ids) == next_tokens(merged, ids)).float().mean().item()
    assert base_agree < agree
    # the chat template reproduces the training format
    from qlorakit.data.formats import Message
    from qlorakit.data.templates import render_text

    msgs = [{"role": "user", "content": "Hi?"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        render_text([Message("user", "Hi?")], "airoboros", tok, add_generation_prompt=True)


def test_original_base_merge_and_refuses_nonfinite(run_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    assert main(["merge", str(run_dir), "--output", str(tmp_path / "m2"), "--base", "original"]) == 0
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in run_dir.iterdir():
        if f.is_file():
            (bad / f.name).write_bytes(f.read_bytes())
    w = load_file(bad / "adapter_model.safetensors")
    k = next(k for k in w if "lora_B" in k)
    w[k] = torch.full_like(w[k], float("nan"))
    save_file(w, bad / "adapter_model.safetensors")
    assert main(["merge", str(bad), "--output", str(tmp_path / "m3")]) == 2


def test_gguf_export_reads_back(run_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import GgufConfig

    gdir = tmp_path / "g"
    gdir.mkdir()
    assert main(["export", str(run_dir), "--format", "gguf", "--outtype", "f16", "--output",
                 str(gdir / "m.gguf")]) == 0
    g = AutoModelForCausalLM.from_pretrained(gdir, gguf_file="m.gguf", dtype=torch.float32,
                                             quantization_config=GgufConfig(dequantize=True))
    gtok = AutoTokenizer.from_pretrained(gdir, gguf_file="m.gguf")
    tok = AutoTokenizer.from_pretrained(run_dir)
    for text in (HELD_OUT, "naïve café 🙂 def f(x):\n    return x", "  spaces\tand\ttabs  "):
        assert gtok(text).input_ids == tok(text).input_ids
    # the GGUF is exported from the float32 merge: compare with that, not with a bf16-rounded copy
    assert main(["merge", str(run_dir), "--output", str(tmp_path / "m"), "--dtype", "fp32"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    ids = tok(" ".join([HELD_OUT] * 3) + " " + " ".join(r["response"] for r in airoboros_rows(6, seed=5)),
              return_tensors="pt").input_ids
    agree = (next_tokens(g, ids) == next_tokens(merged, ids)).float().mean().item()
    assert agree >= 0.97, agree


def test_chat_over_stdin_keeps_history(run_dir):
    proc = subprocess.run([sys.executable, "-m", "qlorakit", "chat", str(run_dir), "--max_new_tokens", "5"],
                          input="hello there\nand again\n", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert len([ln for ln in proc.stdout.splitlines() if ln.strip() or ln == ""]) >= 2


def test_chat_prompt_is_the_training_format(run_dir):
    from qlorakit.data.formats import Message
    from qlorakit.data.templates import AIROBOROS_SYSTEM
    from qlorakit.data.tokenize import prompt_ids
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run_dir)
    hist = [Message("user", "a"), Message("assistant", "b"), Message("user", "c")]
    text = tok.decode(prompt_ids(hist, tok, "airoboros"))
    assert text == f"{AIROBOROS_SYSTEM} USER: a ASSISTANT: b{tok.eos_token}USER: c ASSISTANT: "


def test_generate_answers_jsonl(run_dir, tmp_path):
    inp = write_jsonl(tmp_path / "p.jsonl", [{"instruction": "Say hi.", "id": 7},
                                             {"messages": [{"role": "user", "content": "Name a river."}]}])
    out = tmp_path / "a.jsonl"
    assert main(["generate", str(run_dir), "--input", str(inp), "--output", str(out), "--max_new_tokens", "4"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["id"] == 7 and all(isinstance(r["generated"], str) for r in rows)


def test_eval_reports_base_and_tuned(run_dir, tmp_path, capsys):
    from qlorakit.evaluate import answer_scores

    data = write_jsonl(tmp_path / "e.jsonl", airoboros_rows(4, seed=9))
    mmlu = write_jsonl(tmp_path / "m.jsonl", [{"question": "2+2?", "choices": ["3", "4", "5", "6"], "answer": "B"},
                                              {"question": "Sky?", "choices": ["red", "blue", "green", "x"],
                                               "answer": 1}])
    out = tmp_path / "r.json"
    assert main(["eval", str(run_dir), "--dataset", str(data), "--mmlu", str(mmlu), "--generate", "2",
                 "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    for side in ("base", "tuned"):
        assert {"eval_loss", "eval_perplexity", "exact_match", "contains", "mmlu_accuracy"} <= set(res[side])
    assert res["tuned"]["eval_loss"] != res["base"]["eval_loss"]
    assert "tuned" in capsys.readouterr().out
    assert answer_scores(["The answer is 42."], ["42"]) == {"exact_match": 0.0, "contains": 1.0}
    assert answer_scores(["42."], ["42"]) == {"exact_match": 1.0, "contains": 1.0}
