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
from ..options import Parser
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


def dora_magnitudes(run_dir: Path) -> dict[str, torch.Tensor]:
    """Module name -> DoRA's trained magnitude per output row (use_dora runs; empty otherwise)."""
    from safetensors.torch import load_file

    weights = load_file(run_dir / "adapter_model.safetensors")
    return {key.split(".lora_magnitude_vector")[0].removeprefix("base_model.model."): m.float()
            for key, m in weights.items() if ".lora_magnitude_vector" in key}


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
    from ..data.tokenize import bos_ids

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
    magnitudes = dora_magnitudes(run_dir)
    for name, delta in lora_deltas(run_dir, adapter_cfg).items():
        if name not in modules:
            raise UserError(f"adapter module {name} is not in {base_path}; is this the adapter's base model?")
        w = modules[name].weight.data
        w += delta
        if name in magnitudes:  # DoRA: each row of W + scale * B @ A rescaled to its trained magnitude
            w *= (magnitudes[name] / w.norm(dim=1))[:, None]
        if not torch.isfinite(modules[name].weight).all():
            raise UserError(f"merging adapter 'default' into {name} gave non-finite weights; the adapter in "
                            f"{run_dir} is damaged (train again or use an earlier checkpoint)")
    target = DTYPES[dtype] if dtype else (saved_dtype if isinstance(saved_dtype, torch.dtype) else torch.bfloat16)
    model = model.to(target)
    tokenizer = load_tokenizer(str(tok_dir), cfg.trust_remote_code)
    tokenizer.chat_template = chat_template(cfg.prompt_format, tokenizer, bos=bool(bos_ids(tokenizer)))
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


RUN_DIR_HELP = "a run directory of 'qlorakit train', or a checkpoint-STEP folder in one"
BASE_HELP = ("what the adapter is merged into: 'dequantized' = the 4/8-bit weights it was trained against, so the "
             "merged model answers like the adapter did; 'original' = the full-precision weights the run started "
             "from, nothing lost to quantization but slightly different from what was trained. Default: dequantized.")


def merge_parser() -> Parser:
    p = Parser("qlorakit merge", usage="qlorakit merge RUN_DIR --output DIR [--base dequantized|original] "
               "[--dtype bf16|fp16|fp32]",
               description="Fold a run's LoRA adapter into its base model and save a plain transformers model (no "
               "peft needed),\nwith the run's prompt format as the tokenizer's chat_template.")
    p.add_argument("run_dir", metavar="RUN_DIR", type=Path, help=RUN_DIR_HELP)
    p.add_argument("--output", metavar="DIR", required=True, help="the directory to write (replaced if it exists)")
    p.add_argument("--base", choices=MERGE_BASES, default="dequantized", help=BASE_HELP)
    p.add_argument("--dtype", choices=tuple(DTYPES), help="dtype of the saved weights. Default: the dtype the base "
                   "model was saved in (bf16 when it names none).")
    return p


def export_parser() -> Parser:
    p = Parser("qlorakit export", usage="qlorakit export RUN_DIR --output FILE_OR_DIR [--format gguf|safetensors] "
               "[--outtype f16|bf16|f32|q8_0|q4_k_m|q5_k_m|q6_k] [--base dequantized|original] "
               "[--converter auto|llama.cpp|python]",
               description="Hand a run over as one file for llama.cpp (GGUF), or as a merged safetensors directory "
               "(what\n'qlorakit merge' writes). The adapter is merged into its base first.")
    p.add_argument("run_dir", metavar="RUN_DIR", type=Path, help=RUN_DIR_HELP)
    p.add_argument("--output", metavar="FILE_OR_DIR", required=True,
                   help="the .gguf file to write, or the directory for --format safetensors")
    p.add_argument("--format", choices=("gguf", "safetensors"), default="gguf", help="Default: gguf.")
    p.add_argument("--outtype", default="f16", help="GGUF type of the weight matrices: f16, bf16, f32, q8_0, or the "
                   "k-quants q4_k_m, q5_k_m, q6_k (these and q8_0 by llama.cpp's quantizer: pip install "
                   "'qlorakit[llama]'; norms and other 1-D tensors stay f32). Default: f16.")
    p.add_argument("--converter", choices=("auto", "llama.cpp", "python"), default="auto",
                   help="Who writes the GGUF: llama.cpp's convert_hf_to_gguf.py (where installed; auto takes it for "
                   "the architectures it knows) or qlorakit's own writer. Default: auto.")
    p.add_argument("--base", choices=MERGE_BASES, default="dequantized", help=BASE_HELP)
    return p


def merge_main(argv: list[str]) -> int:
    args = merge_parser().parse_args(argv)
    return merge(args.run_dir, Path(args.output), args.base, args.dtype)


def merge(run_dir: Path, output: Path, base: str, dtype: str | None) -> int:
    model, tok, cfg = merged_model(run_dir, base, dtype)
    out = save_merged(model, tok, cfg, output, run_dir, base)
    print(f"qlorakit merge: wrote {out} (load it with AutoModelForCausalLM.from_pretrained)", file=sys.stderr)
    return 0


def end_of_turn_id(tokenizer, prompt_format: str) -> int | None:
    """The token that ends a reply in the run's format where it is one token other than EOS (chatml's <|im_end|>
    on a base whose EOS is another): the GGUF's end-of-turn token, so llama.cpp stops there too."""
    ids = [i for i in stop_token_ids(tokenizer, prompt_format) if i != tokenizer.eos_token_id]
    return ids[0] if ids else None


def export_main(argv: list[str]) -> int:
    o = export_parser().parse_args(argv)
    if o.format == "safetensors":
        return merge(o.run_dir, Path(o.output), o.base, None)
    from .gguf import export_gguf
    from .modelfile import write_modelfile

    model, tok, cfg = merged_model(o.run_dir, o.base, "fp32")
    with tempfile.TemporaryDirectory() as tmp:
        merged = save_merged(model, tok, cfg, Path(tmp) / "merged", o.run_dir, o.base)
        try:
            out = export_gguf(merged, o.output, o.outtype, chat_template=tok.chat_template, converter=o.converter,
                              eot_token_id=end_of_turn_id(tok, cfg.prompt_format))
            modelfile = write_modelfile(o.run_dir, out)
        except ValueError as e:
            raise UserError(f"export: {e}") from None
    print(f"qlorakit export: wrote {out} ({o.outtype}) and {modelfile} (ollama create NAME -f {modelfile})",
          file=sys.stderr)
    return 0
