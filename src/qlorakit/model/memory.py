"""Bytes of a decoder's weights, LoRA adapters and saved activations, from the model's config.json alone.

The formulas the memory planner (``qlorakit.plan``) sums, and that ``gradient_checkpointing auto`` asks about the
largest micro-batch. What each term counts and how it was checked against the QLoRA paper: docs/plan.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import UserError

GIB = 1024**3
MIB = 1024**2

# Bytes of optimizer state per trainable parameter, for the optimizers qlorakit trains with (train/optim.py).
OPTIMIZER_STATE_BYTES = {"adamw_torch": 8, "paged_adamw_32bit": 8, "paged_adamw_8bit": 2, "sgd": 0}

NF4_BLOCK = 64  # values per absmax constant (bitsandbytes' default for 4-bit)
DQ_BLOCK = 256  # absmax constants per second-level constant with double quantization
# Per-layer lookup tables bitsandbytes keeps with each 4-bit weight: the NF4 code (16 fp32), and with double
# quantization the 8-bit code of the constants (256 fp32) and their fp32 mean offset.
NF4_CODE_BYTES = 16 * 4
DQ_TABLE_BYTES = 256 * 4 + 4

# A CUDA context with lazy module loading takes 300-600 MiB on current drivers; the caching allocator leaves some
# slack between the blocks of the tensors that come and go every step. Both are budgets, not measurements.
CUDA_CONTEXT_BYTES = 512 * MIB
ALLOCATOR_SLACK = 0.05


@dataclass(frozen=True)
class Linear:
    """One linear layer of a decoder layer. Layers with the same ``reads`` take the same input tensor."""

    name: str
    in_features: int
    out_features: int
    reads: str


@dataclass(frozen=True)
class Architecture:
    family: str  # "llama" (LLaMA, Mistral: RMSNorm, SwiGLU, RoPE, SDPA) or "mpt" (LayerNorm, GELU, ALiBi, eager)
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied_embeddings: bool
    linears: tuple[Linear, ...]  # of one decoder layer

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim


def architecture(config: dict) -> Architecture:
    """The shapes that matter for memory, from a Hugging Face config.json."""
    model_type = str(config.get("model_type", "")).lower()
    try:
        if model_type in ("llama", "mistral"):
            return llama_architecture(config)
        if model_type == "mpt":
            return mpt_architecture(config)
    except KeyError as e:
        raise UserError(f"the config has no {e.args[0]!r}, pass a complete Hugging Face config.json") from None
    raise UserError(f"model_type {model_type or '(none)'!r} is not supported, use a LLaMA, Mistral or MPT config")


def llama_architecture(c: dict) -> Architecture:
    h, heads = c["hidden_size"], c["num_attention_heads"]
    kv_heads = c.get("num_key_value_heads") or heads
    head_dim = c.get("head_dim") or h // heads
    f = c["intermediate_size"]
    q, kv = heads * head_dim, kv_heads * head_dim
    linears = (Linear("q_proj", h, q, "attn_in"), Linear("k_proj", h, kv, "attn_in"),
               Linear("v_proj", h, kv, "attn_in"), Linear("o_proj", q, h, "attn_out"),
               Linear("gate_proj", h, f, "mlp_in"), Linear("up_proj", h, f, "mlp_in"),
               Linear("down_proj", f, h, "mlp_mid"))
    return Architecture("llama", h, c["num_hidden_layers"], heads, kv_heads, head_dim, f, c["vocab_size"],
                        bool(c.get("tie_word_embeddings", False)), linears)


def mpt_architecture(c: dict) -> Architecture:
    h, heads = c["d_model"], c["n_heads"]
    f = c.get("expansion_ratio", 4) * h
    linears = (Linear("Wqkv", h, 3 * h, "attn_in"), Linear("out_proj", h, h, "attn_out"),
               Linear("up_proj", h, f, "mlp_in"), Linear("down_proj", f, h, "mlp_mid"))
    # MPT reads its logits through the token embedding (transformers ties lm_head to wte).
    return Architecture("mpt", h, c["n_layers"], heads, heads, h // heads, f, c["vocab_size"], True, linears)


# --- parameters and weights -------------------------------------------------------------------------------------


def linear_parameter_count(arch: Architecture) -> int:
    return arch.layers * sum(lin.in_features * lin.out_features for lin in arch.linears)


def unquantized_parameter_count(arch: Architecture) -> int:
    """Embedding, lm_head (unless tied) and the norms (2 per layer + the final one); bitsandbytes quantizes only
    the linear layers of the decoder and leaves these in the 16-bit load dtype."""
    embeddings = arch.vocab * arch.hidden * (1 if arch.tied_embeddings else 2)
    return embeddings + (2 * arch.layers + 1) * arch.hidden


def parameter_count(arch: Architecture) -> int:
    return linear_parameter_count(arch) + unquantized_parameter_count(arch)


def nf4_linear_bytes(numel: int, double_quant: bool) -> int:
    """4-bit codes (two per byte) + absmax constants, per QLoRA Sec. 3:

    without double quantization: one fp32 absmax per 64 values        = 4 + 32/64             = 4.5 bit/param
    with double quantization:    one uint8 absmax per 64 values and
                                 one fp32 constant per 256 absmax     = 4 + 8/64 + 32/(64*256) = 4.127 bit/param
    """
    blocks = math.ceil(numel / NF4_BLOCK)
    packed = math.ceil(numel / 2) + NF4_CODE_BYTES
    if double_quant:
        return packed + blocks + 4 * math.ceil(blocks / DQ_BLOCK) + DQ_TABLE_BYTES
    return packed + 4 * blocks


def linear_weight_bytes(lin: Linear, bits: int, double_quant: bool, dtype_bytes: int) -> int:
    numel = lin.in_features * lin.out_features
    if bits == 4:
        return nf4_linear_bytes(numel, double_quant)
    if bits == 8:  # LLM.int8: int8 weights + one fp32 scale per output row
        return numel + 4 * lin.out_features
    return numel * dtype_bytes


def layer_weight_bytes(arch: Architecture, bits: int, double_quant: bool, dtype_bytes: int) -> int:
    """One decoder layer: its linear layers as stored, and its two norms in the load dtype."""
    linears = sum(linear_weight_bytes(lin, bits, double_quant, dtype_bytes) for lin in arch.linears)
    return linears + 2 * arch.hidden * dtype_bytes


def base_weight_bytes(arch: Architecture, bits: int, double_quant: bool, dtype_bytes: int) -> int:
    root = (unquantized_parameter_count(arch) - 2 * arch.layers * arch.hidden) * dtype_bytes
    return arch.layers * layer_weight_bytes(arch, bits, double_quant, dtype_bytes) + root


def dequant_buffer_bytes(arch: Architecture, bits: int, dtype_bytes: int) -> int:
    """bitsandbytes dequantizes a whole weight to the compute dtype for each matmul (forward, and backward for the
    input gradient); one exists at a time, so the largest linear layer sets the size."""
    if bits == 16:
        return 0
    return max(lin.in_features * lin.out_features for lin in arch.linears) * dtype_bytes


# --- LoRA -------------------------------------------------------------------------------------------------------


def lora_targets(arch: Architecture, lora_modules: str) -> tuple[Linear, ...]:
    """The adapted linear layers: 'all', or a comma-separated list of names (as qlorakit's --lora_modules)."""
    from .lora import parse_lora_modules

    names = [lin.name for lin in arch.linears]
    wanted, unknown = parse_lora_modules(lora_modules, names)
    if unknown:
        raise UserError(f"lora_modules: {', '.join(unknown)} is not a linear layer of {arch.family}, use 'all' or "
                        f"some of {','.join(names)}")
    return tuple(lin for lin in arch.linears if lin.name in wanted)


def lora_parameter_count(arch: Architecture, targets: tuple[Linear, ...], r: int) -> int:
    """A (r x in) and B (out x r) per adapted layer: r * (in + out)."""
    return arch.layers * r * sum(lin.in_features + lin.out_features for lin in targets)


def optimizer_state_bytes(n_trainable: int, optim: str) -> int:
    return n_trainable * OPTIMIZER_STATE_BYTES[optim]


# --- activations ------------------------------------------------------------------------------------------------


def norm_saved_bytes(arch: Architecture) -> int:
    """Per token, one norm: the fp32 copy of its input (LLaMA's RMSNorm upcasts in code, CUDA autocast runs
    layer_norm in fp32) and the fp32 statistics (rsqrt for RMSNorm; mean and rstd for LayerNorm)."""
    return 4 * arch.hidden + (4 if arch.family == "llama" else 8)


def attention_saved_bytes(arch: Architecture, act: int, seq_len: int) -> int:
    """Per token. LLaMA through SDPA (flash / memory-efficient kernels, GQA without repeating K and V): the rotated
    q and k, v, the output, and an fp32 logsumexp per head; no (s x s) scores. MPT through transformers' eager
    MptAttention: contiguous copies of q, k and v for the two batched matmuls, the fp32 softmax (heads x s per
    token) and, in bf16, its bf16 cast."""
    if arch.family == "llama":
        return act * (2 * arch.q_width + 2 * arch.kv_width) + 4 * arch.heads
    probabilities = arch.heads * seq_len
    return 3 * act * arch.hidden + 4 * probabilities + (act * probabilities if act == 2 else 0)


def mlp_saved_bytes(arch: Architecture, act: int) -> int:
    """Per token. SwiGLU: the gate output (SiLU input), the SiLU output and the up output; GELU MLP: the GELU input.
    The input of the down projection is saved only by a LoRA on it (``lora_input_bytes``)."""
    return act * arch.ffn * (3 if arch.family == "llama" else 1)


def lora_input_bytes(arch: Architecture, targets: tuple[Linear, ...], act: int, dropout: float) -> int:
    """Per token. The 4-bit base matmul saves no input (its weight is frozen); LoRA's A saves what it reads for its
    weight gradient. Without dropout, layers reading the same tensor share it; LLaMA's o_proj reads the SDPA
    output, saved already. With dropout each adapter saves its own dropped copy and a 1-byte mask (CUDA's fused
    dropout)."""
    if dropout > 0:
        return sum((act + 1) * lin.in_features for lin in targets)
    width = {"attn_in": arch.hidden, "attn_out": 0 if arch.family == "llama" else arch.q_width,
             "mlp_in": arch.hidden, "mlp_mid": arch.ffn}
    return sum(act * width[reads] for reads in {lin.reads for lin in targets})


def layer_activation_bytes(arch: Architecture, tokens: int, seq_len: int, targets: tuple[Linear, ...], r: int,
                           act: int, dropout: float) -> int:
    """Bytes one decoder layer saves for backward without checkpointing, for ``tokens`` = micro_batch x seq_len
    and activation size ``act`` (2 in bf16). Per token (h hidden, k = kv_heads x head_dim, f ffn, a heads, s seq):

        LLaMA: 2 x (4h + 4) + act(2h + 2k) + 4a + 3 act f + LoRA inputs + act r per adapter
        MPT:   2 x (4h + 8) + 3 act h + 4as + 2as (bf16) + act f + LoRA inputs + act r per adapter
        LoRA inputs, all layers adapted, no dropout: LLaMA act(2h + f), MPT act(3h + f)

    This is Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", Sec. 4.1:
    sbh(34 + 5as/h) for a GPT layer in 16 bit) redone op by op for QLoRA in transformers: no dropout masks, no
    attention scores where SDPA runs, K and V at GQA width, a SwiGLU MLP, fp32 norm inputs, frozen linear layers
    that save nothing unless adapted. With all layers adapted, bf16 and no dropout LLaMA comes to
    16h + 4k + 8f + 4a + 14r + 8: 341,128 bytes per token per layer for LLaMA-65B at r 64. The embedding output
    needs no gradient, so the first layer's input norm saves nothing and the final norm takes its place: the model
    saves ``layers`` times this. Left out: the rotary tables, the causal mask, and the gradients in flight through
    one layer in backward (each under 0.5% of the total for the shipped models).

    tests/plan/test_plan.py measures the LLaMA formula on CPU (saved-tensor hooks) within 0.5%. The MPT formula follows
    CUDA: CPU autocast keeps layer_norm in bf16, so there MPT's norms save 2h + 4 instead of 4h + 8.
    """
    per_token = (2 * norm_saved_bytes(arch) + attention_saved_bytes(arch, act, seq_len) + mlp_saved_bytes(arch, act)
                 + lora_input_bytes(arch, targets, act, dropout) + act * r * len(targets))
    return tokens * per_token


def checkpointed_activation_bytes(arch: Architecture, tokens: int, act: int) -> int:
    """With gradient checkpointing every decoder layer keeps only its input (act x h per token) and the final norm
    its fp32 input; backward then recomputes one layer at a time."""
    return tokens * (arch.layers * act * arch.hidden + norm_saved_bytes(arch))


def activation_bytes(arch: Architecture, tokens: int, seq_len: int, targets: tuple[Linear, ...], r: int, act: int,
                     dropout: float, checkpointing: bool) -> int:
    layer = layer_activation_bytes(arch, tokens, seq_len, targets, r, act, dropout)
    if checkpointing:
        return checkpointed_activation_bytes(arch, tokens, act) + layer  # + the layer being recomputed
    return arch.layers * layer


def logits_bytes(arch: Architecture, tokens: int, act: int) -> int:
    """The logits (act bytes), the fp32 log-softmax cross entropy saves, and the fp32 gradient of the logits.
    qlorakit projects only the trained positions, so this bounds it from above."""
    return tokens * arch.vocab * (act + 4 + 4)


# --- the plan ---------------------------------------------------------------------------------------------------
