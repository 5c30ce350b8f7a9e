"""Peak GPU memory per device of a QLoRA run: a :class:`MemoryPlan`, a breakdown in bytes whose sum is the peak.

The sum is the memory at the end of a forward pass of a micro-batch after the first one of an optimizer step
(gradients of the earlier micro-batches alive) plus the backward-only terms (one recomputed layer, the logits
gradient); those are small, so the sum is a tight upper bound of the true peak. docs/plan.md has each component.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UserError
from ..model.memory import (ALLOCATOR_SLACK, CUDA_CONTEXT_BYTES, GIB, OPTIMIZER_STATE_BYTES, Architecture,
                            Linear, activation_bytes, architecture, base_weight_bytes, dequant_buffer_bytes,
                            layer_activation_bytes,
                            layer_weight_bytes, logits_bytes, lora_parameter_count,
                            lora_targets, optimizer_state_bytes, parameter_count, unquantized_parameter_count)

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
        """Changes of settings that bring the peak under ``device_gib``, each as ``qlorakit train`` flags (paste them
        after your own), then ``: `` and its new total. One knob at a time first; when no single change is enough,
        the memory savers together, then FSDP on top."""
        if self.fits(device_gib):
            return []
        found = [(flags, plan) for flags, plan in self._single_changes(device_gib) if plan and plan.fits(device_gib)]
        if not found:
            found = [self._combined_change(device_gib)]
        return [f"{flags}: {plan.total_bytes / GIB:.1f} GiB{NOTES.get(flags.split()[0], '')}" for flags, plan in found
                if plan]

    def _single_changes(self, device_gib: float) -> list[tuple[str, MemoryPlan | None]]:
        s = self.settings
        batch, accumulation = s["per_device_train_batch_size"], s["gradient_accumulation_steps"]
        changes = [
            self._first_fitting(device_gib, [  # the same effective batch: the accumulation makes up for it
                (f"--per_device_train_batch_size {b} --gradient_accumulation_steps {accumulation * batch // b}",
                 {"per_device_train_batch_size": b, "gradient_accumulation_steps": accumulation * batch // b})
                for b in smaller_divisors(batch)]),
            self._first_fitting(device_gib, [
                (f"--model_max_len {n}", {"model_max_len": n}) for n in halvings(s["model_max_len"], 64)]),
            self._first_fitting(device_gib, [(f"--lora_r {r}", {"lora_r": r}) for r in halvings(s["lora_r"], 4)]),
            self._first_fitting(device_gib, [
                (f"--fsdp true --nproc {n}", {"fsdp": True, "world_size": n})
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
        s = self.settings
        optim = "sgd" if s["optim"] == "sgd" else "paged_adamw_8bit"
        accumulation = s["gradient_accumulation_steps"] * s["per_device_train_batch_size"]
        savers = {"gradient_checkpointing": True, "per_device_train_batch_size": 1,
                  "gradient_accumulation_steps": accumulation, "bits": 4, "double_quant": True, "optim": optim}
        flags = (f"--gradient_checkpointing true --per_device_train_batch_size 1 --gradient_accumulation_steps "
                 f"{accumulation} --bits 4 --double_quant true --optim {optim}")
        return self._first_fitting(device_gib, [(flags, savers)] + [
            (f"{flags} --fsdp true --nproc {n}", {**savers, "fsdp": True, "world_size": n})
            for n in (2, 4, 8, 16, 32, 64)])

    def _first_fitting(self, device_gib: float, candidates: list[tuple[str, dict]]) -> tuple[str, MemoryPlan | None]:
        for flags, overrides in candidates:
            plan = self._with(**overrides)
            if plan.fits(device_gib):
                return flags, plan
        return "", None

    def _with(self, **overrides) -> MemoryPlan:
        return estimate_memory(self.config, **{**self.settings, **overrides})


# What a suggestion that starts with this flag does beside saving memory (no ": " in them: the total is parsed).
NOTES = {"--per_device_train_batch_size": " (same effective batch)", "--model_max_len": " (longer examples are cut)",
         "--fsdp": " (FSDP, one process per GPU)"}


def smaller_divisors(value: int) -> list[int]:
    """The divisors of ``value`` below it, largest first: micro-batches that keep the effective batch whole."""
    return [d for d in range(value - 1, 0, -1) if value % d == 0]


def halvings(value: int, floor: int) -> list[int]:
    """value/2, value/4, ... down to ``floor``: the smaller settings worth trying, largest first."""
    out = []
    while value // 2 >= floor:
        value //= 2
        out.append(value)
    return out


def estimate_memory(model_config: dict, *, bits: int = 4, double_quant: bool = True, lora_r: int = 64,
                    lora_modules: str = "all", lora_dropout: float = 0.05, per_device_train_batch_size: int = 1,
                    gradient_accumulation_steps: int = 1, model_max_len: int = 512,
                    gradient_checkpointing: bool = True, optim: str = "paged_adamw_32bit", bf16: bool = True,
                    world_size: int = 1, fsdp: bool = False, offload_activations: bool = False) -> MemoryPlan:
    """Peak memory per device of one QLoRA training step; see the module docstring for the components. The
    settings are ``qlorakit train``'s keys; ``world_size`` is its ``--nproc``.

    ``per_device_train_batch_size`` x ``model_max_len`` tokens make the largest micro-batch.
    ``gradient_accumulation_steps`` does not change the peak (gradients add up in place); it is kept so that
    suggestions can keep the effective batch.

    ``bf16`` means what qlorakit does with it: a bf16 load dtype and bf16 autocast (activations 2 bytes); without
    it everything runs in fp32. ``fsdp`` shards base weights and LoRA state over ``world_size`` devices (FSDP2);
    ``world_size`` > 1 without it is DDP, which replicates. ``offload_activations``: what the forward saves waits
    in host memory, and backward brings back one layer's tensors at a time, so the device holds about one layer's
    (``layer_activation_bytes``; with checkpointing, the layer being recomputed). A model of qlorakit's hooks, not yet
    checked against a GPU's measured peak.
    """
    settings = dict(bits=bits, double_quant=double_quant, lora_r=lora_r, lora_modules=lora_modules,
                    lora_dropout=lora_dropout, per_device_train_batch_size=per_device_train_batch_size,
                    gradient_accumulation_steps=gradient_accumulation_steps, model_max_len=model_max_len,
                    gradient_checkpointing=gradient_checkpointing, optim=optim, bf16=bf16, world_size=world_size,
                    fsdp=fsdp, offload_activations=offload_activations)
    check_settings(settings)
    arch = architecture(model_config)
    targets = lora_targets(arch, lora_modules)
    act = 2 if bf16 else 4
    tokens = per_device_train_batch_size * model_max_len
    shards = world_size if fsdp else 1
    n_lora = lora_parameter_count(arch, targets, lora_r)

    if offload_activations:
        activations = layer_activation_bytes(arch, tokens, model_max_len, targets, lora_r, act, lora_dropout)
    else:
        activations = activation_bytes(arch, tokens, model_max_len, targets, lora_r, act, lora_dropout,
                                       gradient_checkpointing)
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
    for key in ("lora_r", "per_device_train_batch_size", "gradient_accumulation_steps", "model_max_len", "world_size"):
        if not isinstance(s[key], int) or s[key] < 1:
            raise UserError(f"{key} {s[key]!r} is not possible, pass a whole number of at least 1")
    if not 0 <= s["lora_dropout"] < 1:
        raise UserError(f"lora_dropout {s['lora_dropout']} is outside [0, 1), pass e.g. 0.05")
    if s["optim"] not in OPTIMIZER_STATE_BYTES:
        raise UserError(f"optim {s['optim']!r} is unknown, use one of {', '.join(OPTIMIZER_STATE_BYTES)}")
    if s["fsdp"] and s["world_size"] < 2:
        raise UserError("fsdp needs several devices, set --nproc (world_size) to 2 or more")


# --- output -----------------------------------------------------------------------------------------------------


def format_plan(plan: MemoryPlan, device_gib: float | None = None) -> str:
    """A table of GiB per component and the total; with ``device_gib``, whether it fits and what would."""
    s = plan.settings
    quant = {4: "4-bit NF4" + (" + double quant" if s["double_quant"] else ""), 8: "8-bit", 16: "16-bit"}[s["bits"]]
    devices = f"FSDP over {s['world_size']} devices" if s["fsdp"] else (
        f"DDP over {s['world_size']} devices" if s["world_size"] > 1 else "1 device")
    lines = [
        f"{plan.model}: {plan.parameters / 1e9:.1f}B parameters, {plan.lora_parameters / 1e6:.1f}M trainable (LoRA)",
        f"{quant}, LoRA r {s['lora_r']} on {s['lora_modules']}, "
        f"micro batch {s['per_device_train_batch_size']} x seq {s['model_max_len']}, "
        f"checkpointing {'on' if s['gradient_checkpointing'] else 'off'}"
        f"{', activations offloaded' if s.get('offload_activations') else ''}, {s['optim']}, "
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
