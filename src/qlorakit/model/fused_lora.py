"""A fused LoRA branch for peft's ``lora.Linear`` and ``lora.Linear4bit``: the same function, fewer passes over memory.

peft computes ``result + lora_B(lora_A(dropout(x))) * scaling``; on a 4-bit base it first copies the base output
(``result.clone()``), and under autocast it casts the float32 LoRA weights to bfloat16 on every call. That is a
dropout mask drawn with ``bernoulli_`` and four full-width tensors per layer (the clone, B's output, its scaled copy,
the sum). On a CPU the mask alone was 20% of a SmolLM2 training step (torch.profiler over a packed 960-token step, 2
AVX2 cores). Here, per adapted layer:

* the dropout mask comes from 16-bit random integers compared with a threshold (32-bit where the rate is not a
  multiple of 2**-16 to 0.1%), about 4x cheaper to draw on a CPU than ``bernoulli_`` (``keep_mask``); with
  dropout 0 no mask is drawn nor kept at all;
* the scale (``scaling / (1 - p)``, p as ``mask_rate`` applies it) is applied to the r-wide intermediate, not to
  the output;
* the LoRA product is added into the base output in place (one ``addmm_``; out of place where that output is a view);
* under autocast the branch computes in the autocast dtype from low-precision copies of A and B; with
  ``cache_lora_casts`` those copies are made once per optimizer step, not once per call;
* backward keeps only the dropped input (x itself without dropout) and the r-wide intermediate.

Same values as peft's forward up to float rounding, with and without dropout, in float32 and under bf16 autocast, on a
dense or a 4-bit base (tests/model/test_fused_lora.py, test_fused_lora_4bit.py): every LoRA layer's dropout is a
``KeepMaskDropout``, so both paths draw the same masks. The fused path runs in the plain case: one active vanilla
LoRA adapter, not merged, adapters enabled, no ``adapter_names``. Anything else falls back to peft's own forward.
"""

from __future__ import annotations

import types

import torch
from torch import nn


def mask_bits(p: float) -> int:
    """Random bits per element of a dropout mask: 16 where ``p`` is a multiple of 2**-16 to within 0.1% of ``p``
    (0.05 is 3277 / 65536, 6e-5 off in relative terms; 0.1 and 0.5 likewise), else 32. Half the random bits of 32,
    and random draws were a tenth of a bf16 training step on a CPU."""
    return 16 if abs(round(p * 2 ** 16) / 2 ** 16 - p) <= 1e-3 * p else 32


def mask_rate(p: float) -> float:
    """The dropout rate ``keep_mask`` applies for a requested ``p``: ``p`` rounded to the resolution of its bits.
    Kept values are scaled by ``1 / (1 - mask_rate(p))``, so the layer's output stays unbiased."""
    bits = mask_bits(p)
    return round(p * 2 ** bits) / 2 ** bits


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """Boolean mask, each element True with probability 1 - ``mask_rate(p)`` (independently), from 16- or 32-bit
    random integers (``mask_bits``).

    The integers are 64-bit draws over the full range viewed as int16 or int32, each uniform on [-2**(b-1),
    2**(b-1)): on a CPU that is the cheapest way torch has to get random bits (int32 ``random_(0, 2**31)`` takes 2.8x
    as long, ``bernoulli_`` 2x). ``r >= round(p * 2**b) - 2**(b-1)`` holds with probability 1 - mask_rate(p).
    """
    n, bits = shape.numel(), mask_bits(p)
    per = 64 // bits
    r = torch.empty((n + per - 1) // per, dtype=torch.int64, device=device).random_(-2 ** 63, None)
    view = r.view(torch.int16 if bits == 16 else torch.int32)[:n]
    return (view >= round(p * 2 ** bits) - 2 ** (bits - 1)).view(shape)


class KeepMaskDropout(nn.Dropout):
    """``nn.Dropout`` drawing its mask with ``keep_mask``: the dropout of every LoRA layer, fused or not.

    LoRA layers the fusion does not cover (on an 8-bit base, DoRA) use this module, so they draw the same masks from
    the same random stream as the fused branch: a run that switches paths on resume continues with the masks the
    uninterrupted run would draw.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return torch.where(keep_mask(x.shape, self.p, x.device), x, 0) * (1 / (1 - mask_rate(self.p)))


class LoraCastCache:
    """Low-precision copies of LoRA weights, valid until the next optimizer step.

    A copy is reused while its weight has the same storage, the same version counter and no optimizer step has
    happened since it was made (``attach`` counts steps with a step post-hook). The step count is what catches
    optimizers that leave the version counter as it was: torch's fused AdamW (2.13) and bitsandbytes' paged
    optimizers, which write ``p.data`` (tests/model/test_fused_lora_4bit.py shows both).
    """

    def __init__(self):
        self.generation = 0
        self.casts = 0  # copies made, for tests and the curious

    def invalidate(self, *_args) -> None:
        self.generation += 1

    def attach(self, optimizer: torch.optim.Optimizer):
        return optimizer.register_step_post_hook(self.invalidate)

    def get(self, layer: nn.Module, key: str, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        store = layer.__dict__.setdefault("_qlorakit_casts", {})
        stamp = (self.generation, weight.data_ptr(), weight._version, dtype)
        hit = store.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        copy = weight.detach().to(dtype)
        store[key] = (stamp, copy)
        self.casts += 1
        return copy


class _LoraDelta(torch.autograd.Function):
    """``base_out + ((x * keep) @ A.T * s) @ B.T`` in ``dtype``, with the gradients of x, A and B (float32 for the
    float32 master weights); the gradient of base_out passes through. ``a_lp``/``b_lp``: A and B in ``dtype``."""

    @staticmethod
    def forward(ctx, base_out, x, weight_a, weight_b, a_lp, b_lp, scale: float, p: float, training: bool, dtype):
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        keep = keep_mask(x2.shape, p, x2.device) if training and p > 0 else None
        xd = torch.where(keep, x2, 0) if keep is not None else x2  # 3x faster than x2 * keep on a CPU
        hs = (xd @ a_lp.t()).mul_(scale)
        base2 = base_out.reshape(-1, base_out.shape[-1])
        if base2.dtype == dtype and base_out._base is None and base_out.is_contiguous():
            base2.addmm_(hs, b_lp.t())  # into the base output: no full-width copy
            ctx.mark_dirty(base_out)
            out = base_out
        else:
            out = torch.addmm(base2.to(dtype), hs, b_lp.t()).to(base_out.dtype).view(base_out.shape)
        ctx.save_for_backward(xd, hs, keep, a_lp, b_lp)
        ctx.scale, ctx.x_shape, ctx.x_dtype = scale, x.shape, x.dtype
        ctx.w_dtypes = (weight_a.dtype, weight_b.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xd, hs, keep, a_lp, b_lp = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(hs.dtype)
        grad_b = (g.t() @ hs).to(ctx.w_dtypes[1]) if ctx.needs_input_grad[3] else None
        gh = (g @ b_lp).mul_(ctx.scale)
        grad_a = (gh.t() @ xd).to(ctx.w_dtypes[0]) if ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[1]:
            grad_x = gh @ a_lp
            if keep is not None:
                grad_x = torch.where(keep, grad_x, 0)
            grad_x = grad_x.to(ctx.x_dtype).view(ctx.x_shape)
        return grad_out, grad_x, grad_a, grad_b, None, None, None, None, None, None


def _plain_adapter(layer, args, kwargs) -> str | None:
    """The one active vanilla adapter's name when the fused branch computes what peft would, else None."""
    adapters = layer.active_adapters
    if layer.disable_adapters or layer.merged or args or kwargs or len(adapters) != 1:
        return None
    name = adapters[0]
    if name not in layer.lora_A or name in layer.lora_variant or layer.lora_B[name].bias is not None:
        return None
    return name


def _low_precision(layer, name: str, which: str, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if weight.dtype == dtype:
        return weight.detach()
    cache = layer.__dict__.get("_qlorakit_cast_cache")
    return cache.get(layer, f"{name}.{which}", weight, dtype) if cache is not None else weight.detach().to(dtype)


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    name = _plain_adapter(self, args, kwargs)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    weight_a, weight_b = self.lora_A[name].weight, self.lora_B[name].weight
    result = self.base_layer(x)
    device_type = x.device.type
    autocast = torch.is_autocast_enabled(device_type)
    dtype = torch.get_autocast_dtype(device_type) if autocast else weight_a.dtype
    dropout = self.lora_dropout[name]
    p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
    training = self.training and dropout.training and p > 0
    scale = self.scaling[name] / (1 - mask_rate(p)) if training else self.scaling[name]
    a_lp = _low_precision(self, name, "A", weight_a, dtype)
    b_lp = _low_precision(self, name, "B", weight_b, dtype)
    with torch.autocast(device_type, enabled=False):  # the branch is already in its compute dtype
        return _LoraDelta.apply(result, x, weight_a, weight_b, a_lp, b_lp, scale, p, training, dtype)


def fusable_classes() -> tuple[type, ...]:
    """peft's LoRA layer classes the fused branch serves: on a dense base, and on a bitsandbytes 4-bit base."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    try:
        from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
    except ImportError:  # peft without bitsandbytes
        return (LoraLinear,)
    return (LoraLinear, LoraLinear4bit)


def use_fused_lora(model: nn.Module) -> int:
    """Route every peft ``lora.Linear`` and ``lora.Linear4bit`` in ``model`` through the fused branch, and give every
    LoRA layer a ``KeepMaskDropout``; returns how many layers were fused."""
    classes = fusable_classes()
    n = 0
    for mod in model.modules():
        drops = getattr(mod, "lora_dropout", None)
        if isinstance(drops, nn.ModuleDict):
            for name, d in list(drops.items()):
                if type(d) is nn.Dropout:
                    drops[name] = KeepMaskDropout(d.p)
        if type(mod) in classes:  # other LoRA classes (8-bit bases) keep their own forward
            mod.forward = types.MethodType(_fused_forward, mod)
            n += 1
    return n


def cache_lora_casts(model: nn.Module, optimizer: torch.optim.Optimizer) -> LoraCastCache:
    """Make the fused layers of ``model`` reuse their low-precision A and B copies until ``optimizer`` steps.

    Without it each call casts A and B again (as peft does under autocast). Call once, after the optimizer is built;
    the copies are remade after every ``optimizer.step()`` and whenever a weight's storage or version changes (a
    checkpoint load). Returns the cache (``cache.casts`` counts the copies made).
    """
    cache = LoraCastCache()
    cache.attach(optimizer)
    for mod in model.modules():
        if "forward" in vars(mod) and getattr(mod.forward, "__func__", None) is _fused_forward:
            mod.__dict__["_qlorakit_cast_cache"] = cache
    return cache
