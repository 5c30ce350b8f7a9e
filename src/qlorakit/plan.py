"""Peak GPU memory per device of a QLoRA run, from the model's config.json alone: know before you rent.

``estimate_memory(config, ...)`` returns a :class:`MemoryPlan`, a breakdown in bytes whose sum is the peak per device:

    base weights        NF4 codes + absmax constants for the linear layers; embeddings, norms, lm_head in 16 bit
    LoRA weights        fp32 (qlorakit and peft keep adapters in fp32)
    LoRA gradients      fp32, same size as the weights
    optimizer state     AdamW: 2 fp32 states = 8 B/param; 8-bit AdamW: 2 B/param; SGD (no momentum): 0
    LoRA bf16 copies    autocast's bf16 casts of the fp32 adapters, cached for the forward: 2 B/param
    activations         tensors saved for backward (see ``layer_activation_bytes``)
    logits              micro_batch x seq_len x vocab: the logits, their fp32 log-softmax and its gradient
    dequant buffer      the largest linear layer dequantized to the compute dtype (forward and backward)
    FSDP gather         FSDP2 units gathered for compute: two decoder layers (current + prefetch) and the root
    DDP buckets         DDP's gradient buckets, a second copy of the LoRA gradients
    CUDA overhead       context + caching-allocator slack

The sum is the memory at the end of a forward pass of a micro-batch after the first one of an optimizer step
(gradients of the earlier micro-batches alive) plus the backward-only terms (one recomputed layer, the logits
gradient); those are small, so the sum is a tight upper bound of the true peak.

Checked against the QLoRA paper (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs",
arXiv:2305.14314):

* Abstract: LoRA finetuning of LLaMA 65B "on a single 48GB GPU", versus ">780GB" for 16-bit full finetuning.
* Sec. 3, Double Quantization: fp32 constants per 64-block cost 32/64 = 0.5 bit/param; quantizing them to 8 bit
  in blocks of 256 costs 8/64 + 32/(64*256) = 0.127 bit/param. Used as is in ``nf4_linear_bytes``.
* Sec. 2, "Memory Requirement of Parameter-Efficient Finetuning", LLaMA 7B, FLAN v2, batch 1: LoRA input gradients
  567 MB, LoRA parameters 26 MB; with gradient checkpointing the input gradients drop to 18 MB per sequence; the
  4-bit base model takes 5,048 MB. (Sequence length and LoRA layout are not given, so only the trend is usable.)
* Figure 6 (appendix), memory breakdown of LLaMA 7B / 13B / 33B / 65B: the model bars are 5,046 / 8,476 /
  19,302 / 37,074 MB (quoted from the figure in bitsandbytes issue #790 and artidoro/qlora issue #269). A
  third-party transcription of the figure gives its setting (batch 1, sequence 512, gradient checkpointing) and
  totals of 6.9 / 11.3 / 24.7 / 45.0 GB; we could not check those against the figure itself. The paper's runs use
  NF4 + double quantization, LoRA r 64 on all linear layers and paged AdamW.

For llama-65b with those settings (and LoRA dropout 0.05, the paper's for 65B) this planner gives 32.1 GiB of base
weights (-11% against 37,074 if the figure's MB are MiB, -7% if 10^6 B) and a 47.5 GiB total that fits 48 GiB
(+6% against 45.0 GiB, +13% against 45.0e9 B).
Two differences from the paper's run: its code (artidoro/qlora, qlora.py) casts the LoRA layers to bf16, where
qlorakit keeps them in fp32 (+2 B/param each for weights and gradients, plus the 2 B/param bf16 copies: 4.5 GiB at
65B, r 64); and its 7B model bar exceeds the weight bytes (3.87e9 B here) by 1.2-1.4 GB, which looks like a fixed
runtime share (CUDA context) counted into the bar, so the 7B bar is not used as a check.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .errors import UserError

GIB = 1024**3
MIB = 1024**2
SHIPPED_MODELS = ("mpt-30b", "llama-33b", "llama-65b", "llama-2-70b")

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
    if lora_modules.strip() == "all":
        return arch.linears
    wanted = [name.strip() for name in lora_modules.split(",") if name.strip()]
    names = [lin.name for lin in arch.linears]
    unknown = [name for name in wanted if name not in names] or ([] if wanted else [repr(lora_modules)])
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

    tests/test_plan.py measures the LLaMA formula on CPU (saved-tensor hooks) within 0.5%. The MPT formula follows
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

COMPONENTS = (
    ("base_weights", "base weights"),
    ("lora_weights", "LoRA weights (fp32)"),
    ("lora_grads", "LoRA gradients (fp32)"),
    ("optimizer_states", "optimizer state"),
    ("lora_bf16_copies", "LoRA bf16 copies (autocast)"),
    ("activations", "activations saved for backward"),
    ("logits", "logits, log-softmax, gradient"),
    ("dequant_buffer", "dequantized weight buffer"),
    ("fsdp_gather", "FSDP gathered units"),
    ("ddp_buckets", "DDP gradient buckets"),
    ("cuda_overhead", "CUDA context + allocator slack"),
)


@dataclass
class MemoryPlan:
    """Peak bytes per device, by component (see the module docstring); ``total_bytes`` is their sum."""

    model: str
    parameters: int
    lora_parameters: int
    base_weights: int
    lora_weights: int
    lora_grads: int
    optimizer_states: int
    lora_bf16_copies: int
    activations: int
    logits: int
    dequant_buffer: int
    fsdp_gather: int
    ddp_buckets: int
    cuda_overhead: int
    settings: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict, repr=False)

    @property
    def total_bytes(self) -> int:
        return sum(getattr(self, name) for name, _ in COMPONENTS)

    def components(self) -> list[tuple[str, int]]:
        """(label, bytes) of the non-zero components, in table order."""
        return [(label, getattr(self, name)) for name, label in COMPONENTS if getattr(self, name)]

    def fits(self, device_gib: float) -> bool:
        return self.total_bytes <= device_gib * GIB

    def suggestions(self, device_gib: float) -> list[str]:
        """Changes of settings that bring the peak under ``device_gib``, each as flags with its new total. One knob
        at a time first; when no single change is enough, the memory savers together, then FSDP on top."""
        if self.fits(device_gib):
            return []
        found = [(flags, plan) for flags, plan in self._single_changes(device_gib) if plan and plan.fits(device_gib)]
        if not found:
            found = [self._combined_change(device_gib)]
        return [f"{flags}: {plan.total_bytes / GIB:.1f} GiB" for flags, plan in found if plan]

    def _single_changes(self, device_gib: float) -> list[tuple[str, MemoryPlan | None]]:
        s = self.settings
        changes = [
            self._first_fitting(device_gib, [
                (f"--micro_batch {b} with {s['micro_batch'] // b}x the gradient accumulation (same effective batch)",
                 {"micro_batch": b}) for b in halvings(s["micro_batch"], 1)]),
            self._first_fitting(device_gib, [
                (f"--seq_len {n} (longer examples are cut)", {"seq_len": n}) for n in halvings(s["seq_len"], 64)]),
            self._first_fitting(device_gib, [(f"--lora_r {r}", {"lora_r": r}) for r in halvings(s["lora_r"], 4)]),
            self._first_fitting(device_gib, [
                (f"--fsdp true --world_size {n} (FSDP over {n} GPUs)", {"fsdp": True, "world_size": n})
                for n in (2, 4, 8, 16) if n > s["world_size"] or not s["fsdp"]]),
        ]
        if not s["gradient_checkpointing"]:
            changes.append(("--gradient_checkpointing true", self._with(gradient_checkpointing=True)))
        if OPTIMIZER_STATE_BYTES[s["optim"]] > 2:
            changes.append(("--optim paged_adamw_8bit", self._with(optim="paged_adamw_8bit")))
        if s["bits"] > 4:
            changes.append(("--bits 4", self._with(bits=4)))
        if s["bits"] == 4 and not s["double_quant"]:
            changes.append(("--double_quant true", self._with(double_quant=True)))
        return changes

    def _combined_change(self, device_gib: float) -> tuple[str, MemoryPlan | None]:
        optim = "sgd" if self.settings["optim"] == "sgd" else "paged_adamw_8bit"
        savers = {"gradient_checkpointing": True, "micro_batch": 1, "bits": 4, "double_quant": True, "optim": optim}
        flags = f"--gradient_checkpointing true --micro_batch 1 --bits 4 --double_quant true --optim {optim}"
        return self._first_fitting(device_gib, [(flags, savers)] + [
            (f"{flags} --fsdp true --world_size {n}", {**savers, "fsdp": True, "world_size": n})
            for n in (2, 4, 8, 16, 32, 64)])

    def _first_fitting(self, device_gib: float, candidates: list[tuple[str, dict]]) -> tuple[str, MemoryPlan | None]:
        for flags, overrides in candidates:
            plan = self._with(**overrides)
            if plan.fits(device_gib):
                return flags, plan
        return "", None

    def _with(self, **overrides) -> MemoryPlan:
        return estimate_memory(self.config, **{**self.settings, **overrides})


def halvings(value: int, floor: int) -> list[int]:
    """value/2, value/4, ... down to ``floor``: the smaller settings worth trying, largest first."""
    out = []
    while value // 2 >= floor:
        value //= 2
        out.append(value)
    return out


def estimate_memory(model_config: dict, *, bits: int = 4, double_quant: bool = True, lora_r: int = 64,
                    lora_modules: str = "all", lora_dropout: float = 0.05, micro_batch: int = 1, seq_len: int = 512,
                    gradient_checkpointing: bool = True, optim: str = "paged_adamw_32bit", bf16: bool = True,
                    world_size: int = 1, fsdp: bool = False) -> MemoryPlan:
    """Peak memory per device of one QLoRA training step; see the module docstring for the components.

    ``bf16`` means what qlorakit does with it: a bf16 load dtype and bf16 autocast (activations 2 bytes); without
    it everything runs in fp32. ``fsdp`` shards base weights and LoRA state over ``world_size`` devices (FSDP2);
    ``world_size`` > 1 without it is DDP, which replicates.
    """
    settings = dict(bits=bits, double_quant=double_quant, lora_r=lora_r, lora_modules=lora_modules,
                    lora_dropout=lora_dropout, micro_batch=micro_batch, seq_len=seq_len,
                    gradient_checkpointing=gradient_checkpointing, optim=optim, bf16=bf16, world_size=world_size,
                    fsdp=fsdp)
    check_settings(settings)
    arch = architecture(model_config)
    targets = lora_targets(arch, lora_modules)
    act = 2 if bf16 else 4
    tokens = micro_batch * seq_len
    shards = world_size if fsdp else 1
    n_lora = lora_parameter_count(arch, targets, lora_r)

    activations = activation_bytes(arch, tokens, seq_len, targets, lora_r, act, lora_dropout, gradient_checkpointing)
    logits = logits_bytes(arch, tokens, act)
    dequant = dequant_buffer_bytes(arch, bits, act)
    copies = 2 * n_lora if bf16 else 0
    gather = fsdp_gather_bytes(arch, targets, bits, double_quant, act, lora_r, world_size) if fsdp else 0
    transient = activations + logits + dequant + copies + gather
    return MemoryPlan(
        model=str(model_config.get("_name_or_path") or (model_config.get("architectures") or [arch.family])[0]),
        parameters=parameter_count(arch),
        lora_parameters=n_lora,
        base_weights=base_weight_bytes(arch, bits, double_quant, act) // shards,
        lora_weights=4 * n_lora // shards,
        lora_grads=4 * n_lora // shards,
        optimizer_states=optimizer_state_bytes(n_lora, optim) // shards,
        lora_bf16_copies=copies,
        activations=activations,
        logits=logits,
        dequant_buffer=dequant,
        fsdp_gather=gather,
        ddp_buckets=4 * n_lora if world_size > 1 and not fsdp else 0,
        cuda_overhead=CUDA_CONTEXT_BYTES + int(ALLOCATOR_SLACK * transient),
        settings=settings,
        config=model_config,
    )


def fsdp_gather_bytes(arch: Architecture, targets: tuple[Linear, ...], bits: int, double_quant: bool, act: int,
                      r: int, world_size: int) -> int:
    """qlorakit wraps each decoder layer and then the root with FSDP2: two layers are gathered at a time (the one
    computing and the prefetched next), and the root (embeddings, lm_head, final norm) stays gathered from forward
    to backward. Shards already counted in the other components are subtracted from the root."""
    lora = 4 * r * sum(lin.in_features + lin.out_features for lin in targets)
    layer = layer_weight_bytes(arch, bits, double_quant, act) + lora
    root = (unquantized_parameter_count(arch) - 2 * arch.layers * arch.hidden) * act
    return 2 * layer + root - root // world_size


def check_settings(s: dict) -> None:
    if s["bits"] not in (4, 8, 16):
        raise UserError(f"bits {s['bits']} is not available, use 4 (QLoRA), 8 or 16")
    for key in ("lora_r", "micro_batch", "seq_len", "world_size"):
        if not isinstance(s[key], int) or s[key] < 1:
            raise UserError(f"{key} {s[key]!r} is not possible, pass a whole number of at least 1")
    if not 0 <= s["lora_dropout"] < 1:
        raise UserError(f"lora_dropout {s['lora_dropout']} is outside [0, 1), pass e.g. 0.05")
    if s["optim"] not in OPTIMIZER_STATE_BYTES:
        raise UserError(f"optim {s['optim']!r} is unknown, use one of {', '.join(OPTIMIZER_STATE_BYTES)}")
    if s["fsdp"] and s["world_size"] < 2:
        raise UserError("fsdp needs several devices, set world_size to 2 or more")


# --- output -----------------------------------------------------------------------------------------------------


def format_plan(plan: MemoryPlan, device_gib: float | None = None) -> str:
    """A table of GiB per component and the total; with ``device_gib``, whether it fits and what would."""
    s = plan.settings
    quant = {4: "4-bit NF4" + (" + double quant" if s["double_quant"] else ""), 8: "8-bit", 16: "16-bit"}[s["bits"]]
    devices = f"FSDP over {s['world_size']} devices" if s["fsdp"] else (
        f"DDP over {s['world_size']} devices" if s["world_size"] > 1 else "1 device")
    lines = [
        f"{plan.model}: {plan.parameters / 1e9:.1f}B parameters, {plan.lora_parameters / 1e6:.1f}M trainable (LoRA)",
        f"{quant}, LoRA r {s['lora_r']} on {s['lora_modules']}, micro batch {s['micro_batch']} x seq {s['seq_len']}, "
        f"checkpointing {'on' if s['gradient_checkpointing'] else 'off'}, {s['optim']}, "
        f"{'bf16' if s['bf16'] else 'fp32'}, {devices}",
        "",
        f"{'component':<34}{'GiB':>9}",
    ]
    lines += [f"{label:<34}{n / GIB:>9.2f}" for label, n in plan.components()]
    lines += ["-" * 43, f"{'total, peak per device':<34}{plan.total_bytes / GIB:>9.2f}"]
    if s["optim"].startswith("paged_"):
        lines.append(f"(paged optimizer: its {plan.optimizer_states / GIB:.2f} GiB of state can spill to CPU RAM "
                     "when the GPU runs short, slowing those steps)")
    if device_gib is None:
        return "\n".join(lines)
    free = device_gib - plan.total_bytes / GIB
    if plan.fits(device_gib):
        lines.append(f"fits {device_gib:g} GiB: yes, {free:.2f} GiB to spare")
        return "\n".join(lines)
    lines.append(f"fits {device_gib:g} GiB: no, {-free:.2f} GiB over")
    if s["optim"].startswith("paged_") and plan.total_bytes - plan.optimizer_states <= device_gib * GIB:
        lines.append("  (it may still run: the paged optimizer can spill enough of its state to CPU RAM)")
    found = plan.suggestions(device_gib)
    if not found:
        lines.append("nothing tried fits: use a bigger GPU")
    else:
        lines += ["would fit:"] + [f"  {line}" for line in found]
    return "\n".join(lines)


# --- command line -----------------------------------------------------------------------------------------------


def load_model_config(model: str) -> tuple[dict, str]:
    """The config of a shipped model name, a config.json path, or a model directory; and a name to show."""
    if model in SHIPPED_MODELS:
        text = resources.files("qlorakit").joinpath("plans", f"{model}.json").read_text()
        return json.loads(text), model
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise UserError(f"{model} has no config.json, pass a model directory or a config.json path")
    elif not path.is_file():
        raise UserError(f"unknown model {model!r}, use one of {', '.join(SHIPPED_MODELS)}, a config.json path "
                        "or a model directory")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path} ({e}), pass a Hugging Face config.json") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a JSON object, pass a Hugging Face config.json")
    return config, model


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UserError(f"{message}, see 'qlorakit plan --help'")


def _boolean(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expects true or false, got {text!r}")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expects a whole number of at least 1, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expects a number above 0, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qlorakit plan", description="Peak GPU memory per device of a QLoRA run, from the config.")
    p.add_argument("model", help=f"{', '.join(SHIPPED_MODELS)}, a config.json path, or a model directory")
    p.add_argument("--bits", type=int, choices=(4, 8, 16), default=4)
    p.add_argument("--double_quant", type=_boolean, default=True)
    p.add_argument("--lora_r", type=_positive_int, default=64)
    p.add_argument("--lora_modules", default="all", help="'all' or a comma-separated list of layer names")
    p.add_argument("--lora_dropout", type=float, default=0.05)
    p.add_argument("--micro_batch", type=_positive_int, default=1)
    p.add_argument("--seq_len", type=_positive_int, default=512)
    p.add_argument("--gradient_checkpointing", type=_boolean, default=True)
    p.add_argument("--optim", choices=tuple(OPTIMIZER_STATE_BYTES), default="paged_adamw_32bit")
    p.add_argument("--bf16", type=_boolean, default=True)
    p.add_argument("--world_size", type=_positive_int, default=1)
    p.add_argument("--fsdp", type=_boolean, default=False)
    p.add_argument("--device_gib", type=_positive_float, default=48.0)
    return p


def plan_main(argv: list[str]) -> int:
    """``qlorakit plan MODEL [--flags]``: print the plan; a mistake is one line on stderr and exit status 2."""
    try:
        args = _parser().parse_args(argv)
        config, name = load_model_config(args.model)
        settings = {k: v for k, v in vars(args).items() if k not in ("model", "device_gib")}
        plan = estimate_memory(config, **settings)
    except SystemExit as e:  # --help printed its text
        return e.code if isinstance(e.code, int) else 0
    except UserError as e:
        print(f"qlorakit plan: {e}", file=sys.stderr)
        return 2
    plan.model = name
    print(format_plan(plan, args.device_gib))
    return 0


if __name__ == "__main__":
    sys.exit(plan_main(sys.argv[1:]))
