"""``--backend vllm``: the command that starts vLLM's OpenAI server with the run's adapter on its base, for a CUDA
machine. vLLM loads LoRA adapters but not every kind peft writes; what it cannot load is refused in one line."""

from __future__ import annotations

import importlib.util
import shlex
from pathlib import Path

from ..errors import UserError

#: the values vLLM's --max-lora-rank accepts (vllm/config/lora.py); the adapter's rank is rounded up to one
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
TEMPLATE_FILE = "chat_template.jinja"


def refusals(adapter_cfg: dict) -> list[str]:
    """Why vLLM cannot serve this adapter (empty when it can)."""
    out = []
    if adapter_cfg.get("use_dora"):
        out.append("it is a DoRA adapter (use_dora), which vLLM does not load; merge it ('qlorakit merge') and "
                   "serve the merged model")
    if adapter_cfg.get("modules_to_save"):
        out.append(f"it trains whole modules ({', '.join(adapter_cfg['modules_to_save'])}: modules_to_save), which "
                   "vLLM's LoRA loader refuses; merge it ('qlorakit merge') and serve the merged model")
    r = adapter_cfg.get("r", 0)
    if r > MAX_LORA_RANKS[-1]:
        out.append(f"its rank {r} is above vLLM's largest --max-lora-rank ({MAX_LORA_RANKS[-1]})")
    return out


def lora_rank(r: int) -> int:
    return next(v for v in MAX_LORA_RANKS if v >= r)


def vllm_command(run_dir: Path, adapter_cfg: dict, bits: int, name: str, host: str, port: int,
                 api_key: str | None, template_file: Path | None) -> list[str]:
    """``vllm serve BASE --enable-lora --lora-modules NAME=RUN_DIR ...``: the base quantized in flight by
    bitsandbytes where the run trained on a 4-bit base, the rank read from the adapter, the run's chat template."""
    cmd = ["vllm", "serve", adapter_cfg["base_model_name_or_path"], "--enable-lora",
           "--lora-modules", f"{name}={run_dir}", "--max-lora-rank", str(lora_rank(adapter_cfg["r"])),
           "--host", host, "--port", str(port)]
    if bits == 4:
        cmd += ["--quantization", "bitsandbytes"]
    if template_file is not None:
        cmd += ["--chat-template", str(template_file)]
    if api_key:
        cmd += ["--api-key", api_key]
    return cmd


def missing() -> str | None:
    """What this machine lacks for vLLM, as the line to print; None when it has both CUDA and vLLM."""
    import torch

    if not torch.cuda.is_available():
        return ("--backend vllm needs a CUDA GPU and this machine has none; on a CUDA machine: pip install vllm. "
                "Here, --backend transformers or llama.cpp serves the run")
    if importlib.util.find_spec("vllm") is None:
        return "--backend vllm: vLLM is not installed; pip install vllm (on this CUDA machine), then run again"
    return None


def serve_vllm(run_dir: Path, name: str, host: str, port: int, api_key: str | None) -> int:
    """Refuse what vLLM cannot load, then run vLLM's server (it runs until stopped)."""
    import subprocess

    from ..config import load_run_config
    from ..data.templates import chat_template
    from ..model.load import load_tokenizer
    from ..runs import run_files

    adapter_cfg, cfg_dir, tok_dir = run_files(run_dir)
    problems = refusals(adapter_cfg)
    if problems:
        raise UserError(f"--backend vllm cannot serve {run_dir}: {'; '.join(problems)}")
    lacking = missing()
    if lacking:
        raise UserError(lacking)
    cfg = load_run_config(cfg_dir)
    template = run_dir / TEMPLATE_FILE
    template.write_text(chat_template(cfg.prompt_format, load_tokenizer(str(tok_dir), cfg.trust_remote_code)),
                        encoding="utf-8")
    cmd = vllm_command(run_dir, adapter_cfg, cfg.bits, name, host, port, api_key, template)
    shown = [("***" if api_key and arg == api_key else arg) for arg in cmd]
    print("qlorakit serve: vllm backend: " + shlex.join(shown), flush=True)
    return subprocess.call(cmd)
