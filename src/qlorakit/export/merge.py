"""Merge a run's adapter into its base, and export the result (safetensors directory or GGUF file).

Two bases to merge into:

* ``dequantized`` (default): the 4-bit (or 8-bit) weights the adapter was trained against, dequantized. The merged
  model computes what the trained model computed, so it answers like the adapter did.
* ``original``: the full-precision weights the run started from. Slightly different from what was trained (the
  adapter learned to correct the quantized weights, not these), but nothing is lost to quantization.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import torch

from ..errors import UserError
from ..model.load import load_base_for_run, load_tokenizer
from ..options import run_options
from ..runs import run_files, stop_token_ids

MERGE_BASES = ("dequantized", "original")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def lora_deltas(run_dir: Path, adapter_cfg: dict) -> dict[str, torch.Tensor]:
    """Module name -> the weight delta ``scale * B @ A`` (float32) from the adapter's safetensors."""
    from safetensors.torch import load_file

    weights = load_file(run_dir / "adapter_model.safetensors")
    r, alpha = adapter_cfg["r"], adapter_cfg["lora_alpha"]
    scale = alpha / (r ** 0.5) if adapter_cfg.get("use_rslora") else alpha / r
    deltas = {}
    for key, a in weights.items():
        if ".lora_A." not in key:
            continue
        b = weights[key.replace(".lora_A.", ".lora_B.")]
        name = key.split(".lora_A.")[0].removeprefix("base_model.model.")
        deltas[name] = scale * (b.float() @ a.float())
    return deltas


def _dequantized_linear_weights(base_path: str, cfg) -> dict[str, torch.Tensor]:
    """Module name -> the dequantized weight of every quantized linear layer, as the run saw it in training."""
    import bitsandbytes as bnb

    q = load_base_for_run(base_path, cfg, torch.device("cpu"))
    out = {}
    for name, mod in q.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            out[name] = bnb.functional.dequantize_4bit(mod.weight.data, mod.weight.quant_state).float()
        elif isinstance(mod, bnb.nn.Linear8bitLt):
            w = mod.weight
            out[name] = (w.data.float() * w.SCB.float()[:, None] / 127.0) if getattr(w, "SCB", None) is not None \
                else w.data.float()
    return out


def merged_model(run_dir: Path, base: str = "dequantized", dtype: str | None = None):
    """(merged transformers model, tokenizer, run config): the adapter folded into the base weights."""
    from transformers import AutoModelForCausalLM

    from ..config import load_run_config
    from ..data.templates import chat_template

    if base not in MERGE_BASES:
        raise UserError(f"--base: {base!r} is not one of {', '.join(MERGE_BASES)}")
    adapter_cfg, cfg_dir, tok_dir = run_files(run_dir)
    cfg = load_run_config(cfg_dir)
    base_path = adapter_cfg["base_model_name_or_path"]
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32,
                                                 trust_remote_code=cfg.trust_remote_code)
    saved_dtype = getattr(model.config, "dtype", None) or torch.bfloat16
    if isinstance(saved_dtype, str):
        saved_dtype = getattr(torch, saved_dtype, torch.bfloat16)
    modules = dict(model.named_modules())
    if base == "dequantized" and cfg.bits in (4, 8):
        for name, w in _dequantized_linear_weights(base_path, cfg).items():
            modules[name].weight.data.copy_(w.view_as(modules[name].weight))
    for name, delta in lora_deltas(run_dir, adapter_cfg).items():
        if name not in modules:
            raise UserError(f"adapter module {name} is not in {base_path}; is this the adapter's base model?")
        modules[name].weight.data += delta
        if not torch.isfinite(modules[name].weight).all():
            raise UserError(f"merging adapter 'default' into {name} gave non-finite weights; the adapter in "
                            f"{run_dir} is damaged (train again or use an earlier checkpoint)")
    target = DTYPES[dtype] if dtype else (saved_dtype if isinstance(saved_dtype, torch.dtype) else torch.bfloat16)
    model = model.to(target)
    tokenizer = load_tokenizer(str(tok_dir), cfg.trust_remote_code)
    tokenizer.chat_template = chat_template(cfg.prompt_format, tokenizer)
    return model, tokenizer, cfg


def save_merged(model, tokenizer, cfg, out: Path, run_dir: Path, base: str) -> Path:
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.generation_config.eos_token_id = stop_token_ids(tokenizer, cfg.prompt_format)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(tmp, max_shard_size="2GB")
    tokenizer.save_pretrained(tmp)
    (tmp / "README.md").write_text(
        f"# {out.name}\n\nThe qlorakit run `{run_dir}` merged into its base (`{base}` weights). A plain transformers "
        f"model: no peft needed. Prompt format: `{cfg.prompt_format}`, also stored as the tokenizer's chat_template, "
        "so `tokenizer.apply_chat_template(messages, add_generation_prompt=True)` gives the training format.\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def merge_main(argv: list[str]) -> int:
    usage = "usage: qlorakit merge RUN_DIR --output DIR [--base dequantized|original] [--dtype bf16|fp16|fp32]"
    run_dir, o = run_options(argv, {"output": "", "base": "dequantized", "dtype": ""}, usage)
    if not o["output"]:
        raise UserError(f"--output DIR is needed; {usage}")
    if o["dtype"] and o["dtype"] not in DTYPES:
        raise UserError(f"--dtype: {o['dtype']!r} is not one of {', '.join(DTYPES)}")
    model, tok, cfg = merged_model(run_dir, o["base"], o["dtype"] or None)
    out = save_merged(model, tok, cfg, Path(o["output"]), run_dir, o["base"])
    print(f"qlorakit merge: wrote {out} (load it with AutoModelForCausalLM.from_pretrained)", file=sys.stderr)
    return 0


def export_main(argv: list[str]) -> int:
    usage = ("usage: qlorakit export RUN_DIR --format gguf|safetensors --output FILE_OR_DIR "
             "[--outtype f16|bf16|q8_0|q4_k_m|q5_k_m|q6_k] [--base dequantized|original] "
             "[--converter auto|llama.cpp|python]")
    defaults = {"format": "gguf", "output": "", "outtype": "f16", "base": "dequantized", "converter": "auto"}
    run_dir, o = run_options(argv, defaults, usage)
    if not o["output"]:
        raise UserError(f"--output is needed; {usage}")
    if o["format"] == "safetensors":
        return merge_main([str(run_dir), "--output", o["output"], "--base", o["base"]])
    if o["format"] != "gguf":
        raise UserError(f"--format: {o['format']!r} is not gguf or safetensors")
    from .gguf import export_gguf
    from .modelfile import write_modelfile

    model, tok, cfg = merged_model(run_dir, o["base"], "fp32")
    with tempfile.TemporaryDirectory() as tmp:
        merged = save_merged(model, tok, cfg, Path(tmp) / "merged", run_dir, o["base"])
        try:
            out = export_gguf(merged, o["output"], o["outtype"], chat_template=tok.chat_template,
                              converter=o["converter"])
            modelfile = write_modelfile(run_dir, out)
        except ValueError as e:
            raise UserError(f"export: {e}") from None
    print(f"qlorakit export: wrote {out} ({o['outtype']}) and {modelfile} (ollama create NAME -f {modelfile})",
          file=sys.stderr)
    return 0
