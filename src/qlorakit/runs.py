"""A run directory read back: where it keeps its files, its config, and its tuned model on the base it was trained
against. What the commands that use a run (chat, generate, eval, merge, export, the demo) share."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch

from .config import load_run_config
from .data.templates import stop_token_ids  # noqa: F401  (the run's stop ids: merge, export)
from .errors import UserError
from .model.load import apply_cache_dequantized, load_base_for_run, load_tokenizer


class RunFiles(NamedTuple):
    adapter_config: dict  # adapter_config.json
    config_dir: Path  # holds qlorakit_config.yaml: the run, also for one of its checkpoints
    tokenizer_dir: Path


def run_files(run_dir: Path) -> RunFiles:
    """The adapter config of ``run_dir`` (a run directory or a checkpoint-STEP folder in one) and the folders with
    the run's config and tokenizer; a folder without an adapter is a one-line error."""
    if not (run_dir / "adapter_config.json").is_file():
        raise UserError(f"{run_dir} holds no adapter (adapter_config.json); give a run directory or a "
                        "checkpoint-STEP folder of a 'qlorakit train' run")
    cfg_dir = run_dir if (run_dir / "qlorakit_config.yaml").is_file() else run_dir.parent
    tok_dir = run_dir if (run_dir / "tokenizer_config.json").is_file() else cfg_dir
    return RunFiles(json.loads((run_dir / "adapter_config.json").read_text()), cfg_dir, tok_dir)


def load_run(run_dir: str | Path, device: torch.device | None = None):
    """(peft model on its quantized base, tokenizer, run config) from a run directory or one of its checkpoints."""
    from peft import PeftModel

    run_dir = Path(run_dir)
    adapter_cfg, cfg_dir, tok_dir = run_files(run_dir)
    cfg = load_run_config(cfg_dir)
    base_path = adapter_cfg["base_model_name_or_path"]
    tokenizer = load_tokenizer(str(tok_dir), cfg.trust_remote_code)
    base = load_base_for_run(base_path, cfg, device)
    # Inference dequantizes every 4-bit weight on every decoding step; where the run cached them, do so here too.
    dtype = torch.bfloat16 if cfg.use_bf16() else torch.float32
    apply_cache_dequantized(base, cfg.cache_dequantized, cfg.bits, dtype, next(base.parameters()).device)
    model = PeftModel.from_pretrained(base, str(run_dir))
    model.eval()
    return model, tokenizer, cfg
