"""LoRA target modules, adapter injection, and the trainable-parameter report."""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import nn

from ..errors import UserError


def unwrap(model):
    """The peft model under DDP (FSDP2 shards the module in place and leaves no wrapper)."""
    return getattr(model, "module", model)


def is_linear(module: nn.Module) -> bool:
    """Plain, 4-bit and 8-bit linear layers (bitsandbytes subclasses nn.Linear)."""
    return isinstance(module, nn.Linear)


def all_linear_names(model: nn.Module) -> list[str]:
    """Leaf names of every linear layer except the output head (LoRA on the head rarely helps and costs most)."""
    head = model.get_output_embeddings()
    names = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if is_linear(mod) and mod is not head}
    return sorted(names)


def parse_lora_modules(lora_modules: str, available: list[str]) -> tuple[list[str], list[str]]:
    """The ``--lora_modules`` value read against the linear layer names ``available``: (the wanted names, the
    unknown ones). 'all' is every available name; the model and the memory planner both read it here."""
    if lora_modules.strip() == "all":
        return list(available), []
    wanted = [m.strip() for m in lora_modules.split(",") if m.strip()]
    return wanted, [m for m in wanted if m not in available] or ([] if wanted else [repr(lora_modules)])


def target_modules(model: nn.Module, lora_modules: str) -> list[str]:
    available = all_linear_names(model)
    wanted, unknown = parse_lora_modules(lora_modules, available)
    if unknown:
        raise UserError(f"lora_modules: {', '.join(unknown)} not found in this model; its linear layers are "
                         f"{', '.join(available)}")
    return wanted


def add_lora(model: nn.Module, *, r: int, alpha: float, dropout: float, modules: list[str], seed: int,
             rslora: bool = False, dora: bool = False, init: str = "default", base_path: str | None = None):
    """``model`` wrapped by peft with fresh LoRA adapters (float32) on ``modules``, their branch fused.

    ``rslora``: scale alpha/sqrt(r) (peft's ``scaling``, which the fused branch reads). ``dora``: peft's DoRA
    layers, which keep peft's own forward (the fused branch serves plain LoRA only). ``init``: default (A
    Kaiming-uniform, B 0), gaussian, or loftq (model/loftq.py: needs ``base_path``, the base's safetensors)."""
    from peft import LoraConfig, get_peft_model

    from .fused_lora import use_fused_lora

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=modules, bias="none",
                     task_type="CAUSAL_LM", use_rslora=rslora, use_dora=dora,
                     init_lora_weights="gaussian" if init == "gaussian" else True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # LoRA A init is random: make it depend on the seed alone
        peft_model = get_peft_model(model, cfg)
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if init == "loftq":
        from .loftq import loftq_init

        loftq_init(peft_model, base_path)
    use_fused_lora(peft_model)
    return peft_model


def trainable_report(model: nn.Module) -> tuple[list[str], int, int]:
    """Lines with trainable parameters per module kind, and the trainable and total counts."""
    per_kind: dict[str, int] = defaultdict(int)
    trainable = total = 0
    for name, p in model.named_parameters():
        quant_state = getattr(p, "quant_state", None)
        # Packed 4-bit weights: count the values they hold, not their storage elements.
        n = math.prod(quant_state.shape) if quant_state is not None else p.numel()
        total += n
        if p.requires_grad:
            trainable += n
            parts = name.split(".")
            kind = next((parts[i - 1] for i, s in enumerate(parts) if s.startswith("lora_")), parts[-2])
            per_kind[kind] += n
    lines = [f"  {kind:<12} {count:>12,}" for kind, count in sorted(per_kind.items())]
    return lines, trainable, total
