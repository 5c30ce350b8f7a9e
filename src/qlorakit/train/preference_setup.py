"""What a preference run (or any run with ``init_from``) adds to setup: the starting run's adapter on its base,
dropout off, and the reference log-probabilities, computed before the first step (objectives/reference.py)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from ..config import FIELDS, ConfigError, TrainConfig, load_run_config
from ..data.tokenize import KTO_BAD, KTO_GOOD, PAIR
from ..errors import UserError
from . import processes
from .objectives.reference import adapter_digest, load_or_compute, reference_key, reference_logps

log = logging.getLogger("qlorakit")

# What a run started from another takes from it: the base model, the adapter's shape and the prompt format.
INHERITED = ("model_name_or_path", "bits", "quant_type", "lora_r", "lora_alpha", "lora_modules", "prompt_format")
KINDS = {"sft": (0,), "dpo": (PAIR,), "orpo": (PAIR,), "simpo": (PAIR,), "kto": (KTO_GOOD, KTO_BAD)}
LAYOUT_OF = {"sft": "airoboros, alpaca or messages rows", "kto": "prompt/completion/label rows"}


def apply_init_from(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the INHERITED keys of the ``init_from`` run; a key set otherwise is an error naming both."""
    if not cfg.init_from:
        return cfg
    start = Path(cfg.init_from)
    if not (start / "adapter_model.safetensors").is_file():
        raise UserError(f"init_from: {start} has no adapter_model.safetensors; give the output_dir of a finished "
                        "qlorakit run")
    theirs = load_run_config(start)
    problems = [f"{k}: {getattr(cfg, k)!r} differs from init_from's {getattr(theirs, k)!r}; leave it out (the "
                "run continues that adapter on its base)" for k in INHERITED
                if getattr(cfg, k) != FIELDS[k].default and getattr(cfg, k) != getattr(theirs, k)]
    if problems:
        raise ConfigError("; ".join(problems))
    return dataclasses.replace(cfg, **{k: getattr(theirs, k) for k in INHERITED})


def load_init_adapter(model, cfg: TrainConfig) -> None:
    """The ``init_from`` run's adapter weights into the fresh adapter of the same shape."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(Path(cfg.init_from) / "adapter_model.safetensors")
    result = set_peft_model_state_dict(model, weights)
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing:
        raise UserError(f"init_from: the adapter of {cfg.init_from} lacks {len(missing)} weights of this model, e.g. "
                        f"{missing[0]}")
    log.info("init_from: started from the adapter of %s", cfg.init_from)


def disable_dropout(model) -> int:
    """Every dropout of ``model`` (LoRA's and the base's) set to 0; how many there were with p > 0."""
    n = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout) and m.p > 0:
            m.p, n = 0.0, n + 1
    return n


def check_method_data(cfg: TrainConfig, train_ex, eval_ex) -> None:
    """The examples must be of the method's kind: pairs for dpo/orpo/simpo, labelled rows for kto."""
    for split, examples in (("training", train_ex), ("eval", eval_ex)):
        kinds = set(examples.store.pref_kind[examples.positions].tolist()) if len(examples) else set()
        wrong = kinds - set(KINDS[cfg.method])
        if wrong:
            want = LAYOUT_OF.get(cfg.method, "prompt/chosen/rejected pairs")
            raise UserError(f"method {cfg.method}: the {split} data is not {want}; give such data (the layout is "
                            "detected from the columns, docs/preferences.md) or choose the method that fits it")


def prepare_reference(cfg: TrainConfig, objective, model, data, *, pad_id: int, packing: bool, device,
                      use_bf16: bool, info: processes.DistInfo, cache_root: Path) -> None:
    """``objective.reference`` for the train and eval splits, computed now (before any update or resume)."""
    if not (objective.preference and objective.needs_reference):
        return
    identity = {"method": "kto" if cfg.method == "kto" else "pairs", "base": cfg.model_name_or_path,
                "bits": cfg.bits, "bf16": use_bf16, "reference": cfg.reference,
                "adapter": None if cfg.reference == "base" else adapter_digest(model)}
    for split, examples in (("train", data.train), ("eval", data.eval)):
        if not len(examples):
            continue

        def compute(examples=examples):
            return reference_logps(model, objective, examples, split, pad_id=pad_id, packing=packing, device=device,
                                   use_bf16=use_bf16, batch_size=cfg.per_device_eval_batch_size,
                                   base=cfg.reference == "base", info=info)

        key = reference_key(data.fingerprint, split, identity | {"n": len(examples)})
        cache = cache_root / "reference" / f"{key}.npy" if cfg.precompute_reference else None
        objective.reference[split] = load_or_compute(compute, cache, info)
