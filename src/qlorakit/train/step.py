"""One optimizer step: forward and backward with the loss normalized by trained tokens, and the non-finite policy.

The objective (train/objectives/) turns examples into micro-batches and a micro-batch into a summed loss; SFT sums
over trained tokens (below), a preference method over examples, and the step divides by the count of its unit in the
whole step either way.

The loss of an optimizer step is the sum of per-token losses over ALL its micro-batches (and ranks) divided by the
number of trained tokens in all of them. Each micro-batch's summed loss is divided by that global count before
backward, so accumulated gradients equal those of one big batch. (The common mean-of-means twin divides each
micro-batch by its own count and weights a short reply's tokens more than a long one's.)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import UserError
from ..model.neftune import example_lengths
from . import checkpoint as ckpt
from . import processes
from .objectives.forward import accepts
from .objectives.sft import SFT, count_trained, loss_sum  # noqa: F401  (loss_sum, count_trained: their old home)
from .schedule import ScheduledStep


class TrainingStopped(UserError):
    """The run ended early for a reason the user must see (non-finite numbers, a failed save)."""


def autocast(device: torch.device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def supports_packing(model) -> bool:
    """Padding-free packing needs position ids that restart per example (RoPE models such as LLaMA). ALiBi models
    such as MPT take no position ids, so they are trained on padded batches."""
    return accepts(model, "position_ids")


MIN_OFFLOAD_BYTES = 1024  # smaller saved tensors stay where they are: a copy would cost more than it frees


def activation_offload(device: torch.device) -> torch.autograd.graph.saved_tensors_hooks:
    """``offload_activations``: hooks that copy each activation saved for backward to host memory as it is saved
    and back to ``device`` when backward unpacks it (pinned host memory on CUDA, so the copies can overlap compute).

    Parameters are left in place: a frozen weight (a 4-bit one included) is saved by every matmul that uses it, and
    torch's ``save_on_cpu`` would copy the whole base model out and back on every micro-batch. So are tensors under
    ``MIN_OFFLOAD_BYTES``. A packed tensor is ``(device, tensor)``: the device to return to, None when kept. The copy
    keeps the saved tensor's strides, so backward sees the same layout and computes the same numbers: a contiguous
    copy of a transposed view changed the LoRA gradients in their last bits on an AMX Xeon, where torch's kernels
    round the two layouts differently (AVX2's did not)."""
    pin = device.type == "cuda"

    def pack(t: torch.Tensor):
        if isinstance(t, torch.nn.Parameter) or t.numel() * t.element_size() < MIN_OFFLOAD_BYTES:
            return None, t
        host = torch.empty_like(t, device="cpu", pin_memory=pin)  # t's strides (where t is dense)
        host.copy_(t)
        return t.device, host

    def unpack(packed):
        where, t = packed
        return t if where is None else t.to(where, non_blocking=pin)

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def accumulate(model, batches: list[dict[str, torch.Tensor]], device: torch.device, use_bf16: bool,
               n_tokens: int, grad_scale: float = 1.0, weights: list[float] | None = None,
               chunked: bool = False, offload: bool = False, objective=None, metrics: dict | None = None) -> float:
    """Forward and backward every micro-batch of one optimizer step; returns the summed loss (a float).

    ``n_tokens`` is the trained-token count of the whole step (all micro-batches, all ranks). ``grad_scale``
    undoes the averaging DDP and FSDP do across ranks, so gradients stay a sum over the global batch / n_tokens.
    A micro-batch with weight 0 (a rank with no example left in a short last step) runs forward and backward only
    to join the other ranks' collectives: it adds nothing to the gradients nor to the returned loss. ``offload``:
    what each forward saves for backward waits in host memory (``activation_offload``). ``objective``: how a
    micro-batch becomes a summed loss (SFT by default; ``n_tokens`` is then the step's count of its unit); its
    summed metrics are added into ``metrics``.
    """
    objective = objective or SFT()
    total = 0.0
    weights = weights or [1.0] * len(batches)
    sync_ctx = getattr(model, "no_sync", None)
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        ctx = sync_ctx() if (sync_ctx is not None and not last) else contextlib.nullcontext()
        saved = activation_offload(device) if offload else contextlib.nullcontext()
        with ctx, saved:
            with autocast(device, use_bf16), example_lengths(model, batch):  # NEFTune's per-example noise
                loss, sums = objective.loss(model, batch, device, chunked)
            (loss * (weights[i] * grad_scale / n_tokens)).backward()
        total += weights[i] * float(loss.detach())
        if metrics is not None:
            for k, v in sums.items():
                metrics[k] = metrics.get(k, 0.0) + weights[i] * float(v)
    return total


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step did (every number summed over the ranks)."""

    loss: float  # summed per-token loss / trained_tokens; NaN or inf when the step was skipped for it
    trained_tokens: int | float  # positions with a target (their summed weight with prompt_loss_weight)
    tokens_seen: int  # real token positions (padding excluded)
    grad_norm: float  # before clipping
    learning_rate: float  # the rate this step's update used
    skipped: bool  # the loss or the gradient norm was not finite, so no update was made
    metrics: dict = field(default_factory=dict)  # the objective's (preference rewards...), averaged over the step


@dataclass
class StepParts:
    """What one optimizer step works on, and nothing else of the run (fit.step_parts builds it from the Run)."""

    model: Any  # the peft model, maybe wrapped by DDP or sharded by FSDP2
    params: list[torch.nn.Parameter]  # the trainable ones: their gradient norm is clipped
    optimizer: torch.optim.Optimizer
    scheduler: Any
    objective: Any  # how examples become micro-batches and a micro-batch a summed loss (objectives/)
    examples: Sequence  # the training examples the step's indices point into
    pad_id: int
    packing: bool
    device: torch.device
    use_bf16: bool
    info: processes.DistInfo
    state: ckpt.TrainState  # its non-finite counters (skip_nonfinite)
    max_grad_norm: float = 0.0  # 0: no clipping
    max_nonfinite_steps: int = 3
    max_tokens_per_batch: int = 0
    offload_activations: bool = False
    chunked_loss: bool = False
    checkpoints: Path | None = None  # where checkpoint-STEP folders are, for the non-finite stop's message
    say: Callable[[str], None] = print  # a line beside the progress bar
    accumulate: Callable[..., float] = accumulate  # forward and backward of the micro-batches (a test replaces it)


def step_batches(parts: StepParts, step: ScheduledStep) -> tuple[list[dict], list[float], list[dict]]:
    """This rank's micro-batches of ``step``, collated; their weights; and the real ones among them. A rank with no
    example left runs a filler (the step's shortest example) with weight 0, only to join the collectives."""
    ex = parts.examples
    filler = [min(step.examples, key=lambda i: len(ex[i]))]
    batches = [parts.objective.collate(ex, ids or filler, parts.pad_id, parts.packing, parts.max_tokens_per_batch)
               for ids in step.micro_batches]
    weights = [1.0 if ids else 0.0 for ids in step.micro_batches]
    return batches, weights, [b for b, ids in zip(batches, step.micro_batches) if ids]


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["input_ids"].numel() if "attention_mask" not in batch else batch["attention_mask"].sum())


def optimizer_step(parts: StepParts, step: ScheduledStep) -> StepResult:
    """Forward and backward this rank's share of ``step``, clip the gradients, update the adapter and advance the
    learning-rate schedule. A non-finite loss or gradient norm skips the update (``skip_nonfinite``)."""
    info, device, objective, sums = parts.info, parts.device, parts.objective, {}
    batches, weights, real = step_batches(parts, step)
    n_units = processes.all_sum(objective.count(real), info, device)  # trained tokens (or their weight), or examples
    n_units = int(n_units) if float(n_units).is_integer() else n_units
    if objective.preference:
        objective.begin_step(parts.model, batches, device, parts.use_bf16, weights, info)  # every rank: a collective
    summed = parts.accumulate(parts.model, batches, device, parts.use_bf16, n_units, grad_scale=info.world_size,
                              weights=weights, chunked=parts.chunked_loss, offload=parts.offload_activations,
                              objective=objective, metrics=sums)
    loss = processes.all_sum(summed, info, device) / n_units
    metrics = {k: processes.all_sum(v, info, device) / n_units for k, v in sorted(sums.items())}
    n_tokens = int(processes.all_sum(count_trained(real), info, device)) if objective.preference else n_units
    clip = parts.max_grad_norm if parts.max_grad_norm > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(parts.params, clip)
    lr = parts.scheduler.get_last_lr()[0]
    finite = math.isfinite(loss) and bool(torch.isfinite(norm))
    if finite:
        parts.optimizer.step()
        parts.state.nonfinite_in_a_row = 0
    else:
        skip_nonfinite(parts.state, loss, float(norm), limit=parts.max_nonfinite_steps, say=parts.say,
                       checkpoints=parts.checkpoints)
    parts.optimizer.zero_grad(set_to_none=True)
    parts.scheduler.step()
    seen = int(processes.all_sum(sum(real_tokens(b) for b in real), info, device))
    return StepResult(loss, n_tokens, seen, float(norm), lr, skipped=not finite, metrics=metrics)


def skip_nonfinite(state: ckpt.TrainState, loss: float, norm: float, *, limit: int, say: Callable[[str], None],
                   checkpoints: Path | None) -> None:
    """The non-finite policy: the update is not made and the step is counted; ``limit`` (max_nonfinite_steps) such
    steps in a row stop the run (TrainingStopped), naming the last good checkpoint in ``checkpoints``."""
    state.nonfinite_in_a_row += 1
    state.skipped_steps += 1
    say(f"step {state.step + 1}: non-finite loss {loss} or gradient norm {norm}; update skipped")
    if state.nonfinite_in_a_row >= limit:
        last = ckpt.list_checkpoints(checkpoints) if checkpoints is not None else []
        raise TrainingStopped(
            f"{state.nonfinite_in_a_row} steps in a row had a non-finite loss or gradient (last at "
            f"step {state.step + 1}); lower learning_rate or check the data"
            + (f"; the last good checkpoint is {last[-1]}" if last else ""))
