"""Hand a run over: merged into its base (a plain transformers model) and exported as GGUF."""

from __future__ import annotations

import json

import torch

from helpers import adapter_weights, airoboros_rows, pair_rows, write_jsonl
from qlorakit.cli import main

HELD_OUT = ("The committee met on a cold morning to review the harbor lanterns. Violet maple orbit quartz ember. "
            "Please repeat some words about the river stone and the cloud.")


def next_tokens(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits[0].argmax(-1)


def test_merged_model_predicts_like_the_adapter(run_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlorakit.runs import load_run

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




def test_a_dora_run_merges_with_its_magnitudes(tiny_llama, tmp_path, monkeypatch):
    """use_dora: the merged weight is m * (W + s B A) / ||W + s B A|| per row, so the merged model computes what the
    DoRA adapter does (a 16-bit base: no quantization between them); adding s B A alone (the plain-LoRA merge) is
    the twin, caught."""
    from transformers import AutoModelForCausalLM

    from helpers import write_jsonl
    from qlorakit.export import merge
    from qlorakit.export.merge import dora_magnitudes
    from qlorakit.runs import load_run

    data = write_jsonl(tmp_path / "d.jsonl", airoboros_rows(8))
    run = tmp_path / "dora"
    assert main(["train", "--model_name_or_path", str(tiny_llama), "--dataset", str(data), "--output_dir", str(run),
                 "--bits", "16", "--use_dora", "true", "--max_steps", "4", "--learning_rate", "0.05",
                 "--save_strategy", "no", "--eval_strategy", "no", "--bf16", "false"]) == 0
    magnitudes = dora_magnitudes(run)
    assert len(magnitudes) == 14
    out = tmp_path / "merged"
    assert main(["merge", str(run), "--output", str(out), "--dtype", "fp32"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    adapter_model, _, _ = load_run(run)
    ids = torch.arange(5, 60)[None]
    with torch.no_grad():
        want, got = adapter_model(ids).logits, merged(ids).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(merge, "dora_magnitudes", lambda run_dir: {})  # the twin: W + s B A, no rescale
    twin, _, _ = merge.merged_model(run, dtype="fp32")
    with torch.no_grad():
        assert float((twin(ids).logits - want).abs().max()) > 100 * float((got - want).abs().max())


def test_a_dpo_run_merges_exports_and_answers_like_any_run(run_dir, tmp_path):
    """A preference run (``--init_from`` an SFT run, ``--method dpo``) hands over as any run does: its config names
    no base of its own, so merge, GGUF export and generate must find the base through the run it started from."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import GgufConfig

    from qlorakit.runs import load_run

    dpo = tmp_path / "dpo"
    assert main(["train", "--init_from", str(run_dir), "--method", "dpo", "--dataset",
                 str(write_jsonl(tmp_path / "p.jsonl", pair_rows(8))), "--output_dir", str(dpo), "--max_steps", "3",
                 "--learning_rate", "0.02", "--bf16", "false", "--save_strategy", "no", "--eval_strategy", "no"]) == 0
    before, after = adapter_weights(run_dir), adapter_weights(dpo)
    assert any(not torch.equal(before[k], after[k]) for k in after)  # the premise: DPO moved the adapter

    assert main(["merge", str(dpo), "--output", str(tmp_path / "m"), "--dtype", "fp32"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    adapter_model, _, cfg = load_run(dpo)
    assert cfg.method == "dpo"
    ids = tok(HELD_OUT, return_tensors="pt").input_ids
    assert (next_tokens(merged, ids) == next_tokens(adapter_model, ids)).float().mean().item() >= 0.97

    (tmp_path / "g").mkdir()
    assert main(["export", str(dpo), "--format", "gguf", "--outtype", "f16", "--output",
                 str(tmp_path / "g" / "m.gguf")]) == 0
    g = AutoModelForCausalLM.from_pretrained(tmp_path / "g", gguf_file="m.gguf", dtype=torch.float32,
                                             quantization_config=GgufConfig(dequantize=True))
    assert (next_tokens(g, ids) == next_tokens(merged, ids)).float().mean().item() >= 0.97

    out = tmp_path / "a.jsonl"
    assert main(["generate", str(dpo), "--input", str(write_jsonl(tmp_path / "q.jsonl", [{"instruction": "Hi?"}])),
                 "--output", str(out), "--max_new_tokens", "4"]) == 0
    assert [set(json.loads(x)) for x in out.read_text().splitlines()] == [{"instruction", "generated"}]
