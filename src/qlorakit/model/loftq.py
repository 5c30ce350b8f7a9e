"""LoftQ initialization of LoRA adapters on a 4-bit base: the adapter starts by cancelling part of the NF4 error.

For each LoRA layer, with W the float weight (read from the base's safetensors on disk), Q its 4-bit copy
dequantized (what the frozen layer computes with) and s the layer's LoRA scale (alpha/r, or alpha/sqrt(r) with
rsLoRA): the best rank-r approximation U_r S_r V_r^T of the residual W - Q (truncated SVD) is split evenly,
B = U_r sqrt(S_r) / sqrt(s) and A = sqrt(S_r) V_r^T / sqrt(s), so that Q + s * B @ A is the closest a rank-r
adapter can bring the layer to W. That is one step of LoftQ (Li et al. 2023) on an already-quantized base.

Why not PEFT's ``replace_lora_weights_loftq`` (0.21): it computes on "cuda" (or "xpu") unconditionally, so it fails
on a CPU; it sets B @ A to the residual and ignores the LoRA scale, so at alpha/r = 2 (qlorakit's default) the
adapter adds twice the residual and the error is no lower than with B = 0 (tests/model/test_loftq.py shows that
twin); and it needs the base layers to be bitsandbytes ``Linear4bit``, which ``cache_dequantized`` has replaced by
dense layers holding Q. Here Q is read from either.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import UserError

PEFT_PREFIX = "base_model.model."


class FloatWeights:
    """The float tensors of a model's safetensors files (one file or a sharded index), read one at a time."""

    def __init__(self, path: str):
        self.files = safetensors_files(path)
        self.where: dict[str, Path] = {}
        from safetensors import safe_open

        for f in self.files:
            with safe_open(str(f), framework="pt") as st:
                self.where.update(dict.fromkeys(st.keys(), f))

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name`` (``model.layers.0.self_attn.q_proj.weight``), or the one key ending in it."""
        key = name if name in self.where else None
        if key is None:
            ends = [k for k in self.where if k.endswith("." + name) or name.endswith("." + k)]
            key = ends[0] if len(ends) == 1 else None
        if key is None:
            raise UserError(f"init_lora_weights: loftq found no float weight {name} in {self.files[0].parent}; "
                            "use init_lora_weights default for this model")
        from safetensors import safe_open

        with safe_open(str(self.where[key]), framework="pt") as st:
            return st.get_tensor(key)


def safetensors_files(path: str) -> list[Path]:
    """The safetensors files of a local model directory or of a hub id already in the local cache."""
    folder = Path(path)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(path, allow_patterns=["*.safetensors", "*.safetensors.index.json"]))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        files = [folder / n for n in names]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"init_lora_weights: loftq reads the float weights from safetensors files and {path} has "
                        "none; convert the model to safetensors or use init_lora_weights default")
    return files


def quantized_weight(base: torch.nn.Module) -> torch.Tensor:
    """The weight a 4-bit layer computes with, in float32: a bitsandbytes Linear4bit's dequantized, or the dense
    copy ``cache_dequantized`` made of it."""
    weight = base.weight
    if type(weight).__name__ == "Params4bit":
        import bitsandbytes as bnb

        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    return weight.detach().float()


def loftq_factors(w: torch.Tensor, q: torch.Tensor, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r)) with ``scale * B @ A`` the best rank-``r`` approximation of ``w - q``."""
    u, s, vh = torch.linalg.svd(w.float() - q.float(), full_matrices=False)
    root = (s[:r] / scale).sqrt()
    return root[:, None] * vh[:r], u[:, :r] * root[None]


@torch.no_grad()
def loftq_init(peft_model, base_path: str, adapter: str = "default") -> int:
    """Set every LoRA layer's A and B of ``peft_model`` (on a 4-bit base, packed or ``cache_dequantized``) by
    ``loftq_factors`` from the float weights of ``base_path``; returns how many layers."""
    weights = FloatWeights(base_path)
    n = 0
    for name, layer in peft_model.named_modules():
        if not (hasattr(layer, "lora_A") and adapter in getattr(layer, "lora_A", {})):
            continue
        w = weights.get(name.removeprefix(PEFT_PREFIX) + ".weight").to(layer.lora_A[adapter].weight.device)
        q = quantized_weight(layer.get_base_layer())
        if w.shape != q.shape:
            raise UserError(f"init_lora_weights: loftq: {name}'s float weight is {tuple(w.shape)}, its layer "
                            f"{tuple(q.shape)}; use init_lora_weights default for this model")
        a, b = loftq_factors(w, q, layer.r[adapter], layer.scaling[adapter])
        layer.lora_A[adapter].weight.data = a.to(layer.lora_A[adapter].weight.dtype)
        layer.lora_B[adapter].weight.data = b.to(layer.lora_B[adapter].weight.dtype)
        n += 1
    return n
