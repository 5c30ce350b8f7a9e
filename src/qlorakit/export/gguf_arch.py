"""What differs between the architectures qlorakit exports to GGUF: their llama.cpp name, the hyperparameters
llama.cpp reads for them, and how a checkpoint tensor is laid out for llama.cpp.

Each follows what llama.cpp's ``convert_hf_to_gguf.py`` does for the same Hugging Face class, and what llama.cpp's
graph for that architecture computes:

* ``llama`` (``LlamaForCausalLM``, ``MistralForCausalLM``): Q/K rows permuted from transformers' rotate-half RoPE to
  llama.cpp's interleaved pairs (``LlamaModel.permute``); Llama 3 RoPE scaling as a ``rope_freqs`` tensor.
* ``qwen2`` (``Qwen2ForCausalLM``): the same blocks plus Q/K/V biases; llama.cpp runs Qwen2 with NeoX-style
  (rotate-half) RoPE, so nothing is permuted.
* ``mpt`` (``MptForCausalLM``): a fused Wqkv, LayerNorms without bias, GELU MLP, ALiBi instead of positions,
  ``clip_qkv`` clamping. No permutation. llama.cpp's converter registers only MosaicML's remote-code class
  (``MPTForCausalLM``), so transformers' MPT is written by qlorakit's own writer.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np
import torch
from transformers import AutoConfig, PretrainedConfig

__all__ = ["Architecture", "ARCHITECTURES", "resolve_architecture", "rope_freqs_factors"]

_ROPE_TYPES = ("default", "linear", "llama3")
# transformers' MPT builds its ALiBi slopes with this maximum bias whatever the config says
# (MptModel.build_mpt_alibi_tensor is called without alibi_bias_max), so the merged model computes with 8.
_TRANSFORMERS_MPT_ALIBI_BIAS_MAX = 8.0


@dataclass(frozen=True)
class Architecture:
    """One architecture as llama.cpp knows it."""

    gguf_arch: gguf.MODEL_ARCH
    hf_classes: tuple[str, ...]  # config.json "architectures" entries this covers
    model_types: tuple[str, ...]  # config.json "model_type" values, for configs without "architectures"
    check: Callable[[PretrainedConfig], None]  # raises ValueError for settings llama.cpp cannot run
    add_hyperparameters: Callable[[gguf.GGUFWriter, PretrainedConfig, dict[str, tuple[int, ...]]], None]
    to_llama_cpp_layout: Callable[[str, torch.Tensor, PretrainedConfig], torch.Tensor]
    llama_cpp_converter_takes_it: bool  # whether llama.cpp's convert_hf_to_gguf.py has this HF class

    @property
    def name(self) -> str:
        """llama.cpp's name for it (``general.architecture``), e.g. ``"llama"``."""
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]


def resolve_architecture(model_dir: Path) -> tuple[Architecture, PretrainedConfig]:
    """The architecture of the checkpoint in ``model_dir`` and its config, after checking llama.cpp can run it."""
    # Read the raw JSON first: AutoConfig would fail on unknown model types before we could say why.
    raw = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    architectures = raw.get("architectures") or [f"model_type {raw.get('model_type', 'unknown')!r}"]
    found = next((arch for arch in ARCHITECTURES if set(architectures) & set(arch.hf_classes)), None)
    if found is None and "architectures" not in raw:
        found = next((arch for arch in ARCHITECTURES if raw.get("model_type") in arch.model_types), None)
    if found is None:
        supported = ", ".join(name for arch in ARCHITECTURES for name in arch.hf_classes)
        raise ValueError(f"Cannot export {', '.join(architectures)} to GGUF: supported are {supported}.")
    if "quantization_config" in raw:
        method = raw["quantization_config"].get("quant_method", "unknown")
        raise ValueError(
            f"Cannot export a {method}-quantized checkpoint to GGUF: it needs dense f16/bf16/f32 weights "
            f"(merge QLoRA adapters into the unquantized base model first)."
        )
    config = AutoConfig.from_pretrained(model_dir)
    found.check(config)
    return found, config


# --------------------------------------------------------------------------- LLaMA family and Qwen2


def _rope_parameters(config: PretrainedConfig) -> dict[str, Any]:
    """The RoPE settings (``rope_theta``, ``rope_type``, scaling factors) as a plain dict."""
    return dict(getattr(config, "rope_parameters", None) or {})


def _head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _check_rope(config: PretrainedConfig, rope_types: tuple[str, ...] = _ROPE_TYPES) -> None:
    rope_type = _rope_parameters(config).get("rope_type", "default")
    if rope_type not in rope_types:
        raise ValueError(f"Cannot export RoPE scaling {rope_type!r} to GGUF: supported are {', '.join(rope_types)}.")


def _check_qwen2(config: PretrainedConfig) -> None:
    _check_rope(config, ("default", "linear"))
    if getattr(config, "use_sliding_window", False):
        raise ValueError("Cannot export a Qwen2 checkpoint with use_sliding_window to GGUF: llama.cpp's qwen2 "
                         "attends to the whole context.")


def _add_decoder_hyperparameters(writer: gguf.GGUFWriter, config: PretrainedConfig,
                                 shapes: dict[str, tuple[int, ...]]) -> None:
    """The ``{arch}.*`` keys TextModel/LlamaModel.set_gguf_parameters write for a LLaMA-style decoder."""
    rope = _rope_parameters(config)
    head_dim = _head_dim(config)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(rope.get("rope_theta", 10000.0))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])


def _llama_layout(hf_name: str, tensor: torch.Tensor, config: PretrainedConfig) -> torch.Tensor:
    """Q/K rows permuted as LlamaModel.modify_tensors does; everything else as it is."""
    if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return permute_for_rope(tensor, config.num_attention_heads)
    if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return permute_for_rope(tensor, config.num_key_value_heads)
    return tensor


def _unchanged(hf_name: str, tensor: torch.Tensor, config: PretrainedConfig) -> torch.Tensor:
    return tensor


def permute_for_rope(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows reordered from HF's rotate-half RoPE layout to llama.cpp's interleaved-pair layout.

    This is llama.cpp's ``LlamaModel.permute(weights, n_head, n_head_kv)`` with the head count
    already resolved (``n_head_kv`` for K when it differs, ``n_head`` for Q).
    """
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def rope_freqs_factors(config: PretrainedConfig) -> np.ndarray | None:
    """Per-frequency divisors through which llama.cpp applies Llama 3 RoPE scaling (the ``rope_freqs`` tensor),
    as LlamaModel.generate_extra_tensors computes them; None for other RoPE types."""
    rope = _rope_parameters(config)
    if rope.get("rope_type") != "llama3":
        return None
    dim = _head_dim(config)
    freqs = 1.0 / (rope.get("rope_theta", 10000.0) ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = rope.get("factor", 8.0)
    low_freq_factor = rope.get("low_freq_factor", 1.0)
    high_freq_factor = rope.get("high_freq_factor", 4.0)
    old_context_len = rope.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1.0)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


# --------------------------------------------------------------------------- MPT


def _check_mpt(config: PretrainedConfig) -> None:
    attn = config.attn_config
    head_dim = config.d_model // config.n_heads
    if attn.softmax_scale is not None and not math.isclose(attn.softmax_scale, head_dim ** -0.5):
        raise ValueError(f"Cannot export an MPT checkpoint with attn_config.softmax_scale {attn.softmax_scale} to "
                         f"GGUF: llama.cpp's mpt scales attention by 1/sqrt(head_dim) = {head_dim ** -0.5:.6g}.")
    if config.logit_scale is not None:
        raise ValueError(f"Cannot export an MPT checkpoint with logit_scale {config.logit_scale!r} to GGUF: "
                         "llama.cpp's mpt does not scale logits.")


def _add_mpt_hyperparameters(writer: gguf.GGUFWriter, config: PretrainedConfig,
                             shapes: dict[str, tuple[int, ...]]) -> None:
    """The ``mpt.*`` keys MPTModel.set_gguf_parameters writes, valued as transformers' MptForCausalLM computes."""
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.d_model)
    writer.add_block_count(config.n_layers)
    # transformers' MptMLP is 4 * d_model wide whatever expansion_ratio says: take the width from the weights.
    writer.add_feed_forward_length(shapes["transformer.blocks.0.ffn.up_proj.weight"][0])
    writer.add_head_count(config.n_heads)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)
    if config.attn_config.clip_qkv is not None:
        writer.add_clamp_kqv(config.attn_config.clip_qkv)
    writer.add_max_alibi_bias(_TRANSFORMERS_MPT_ALIBI_BIAS_MAX)


ARCHITECTURES = (
    Architecture(gguf.MODEL_ARCH.LLAMA, ("LlamaForCausalLM", "MistralForCausalLM"), ("llama", "mistral"),
                 _check_rope, _add_decoder_hyperparameters, _llama_layout, llama_cpp_converter_takes_it=True),
    Architecture(gguf.MODEL_ARCH.QWEN2, ("Qwen2ForCausalLM",), ("qwen2",),
                 _check_qwen2, _add_decoder_hyperparameters, _unchanged, llama_cpp_converter_takes_it=True),
    Architecture(gguf.MODEL_ARCH.MPT, ("MptForCausalLM",), ("mpt",),
                 _check_mpt, _add_mpt_hyperparameters, _unchanged, llama_cpp_converter_takes_it=False),
)
