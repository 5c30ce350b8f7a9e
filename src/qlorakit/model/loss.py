"""Cross entropy of the output head without full-vocabulary float32 logits.

The plain loss projects every trained position onto the vocabulary and casts the result to float32: (N, V) logits in
the compute dtype, their float32 copy, the log-softmax and its gradient, all alive at once (N = 8,192 trained tokens
of a 128,256-token vocabulary: about 4 GiB per copy). Here the hidden states of the trained positions are projected
a chunk of rows at a time; each chunk's loss and its gradients (of the hidden states, and of the head weight where it
trains) are computed at once and the chunk's logits freed, so at most one chunk of logits exists, in forward and in
backward. The arithmetic is the plain path's (logits in the compute dtype, log-softmax in float32, the gradient of
the logits cast back to the compute dtype before the head's backward), so the sum agrees to float rounding
(tests/model/test_loss.py). On CUDA, Liger-Kernel's fused linear cross entropy (Triton) does the same where installed
(``pip install qlorakit[cuda]``).

Normalization is the caller's: these functions return the SUM over trained positions, and the training step divides
by the trained tokens of the whole optimizer step (train/step.py), so accumulation and processes stay exact.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .lora import unwrap

# Model types whose logits are exactly ``lm_head(final hidden state)``: no softcapping, no logit scale.
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3"})
CHUNK_BYTES = 256 << 20  # logits and their gradient per chunk


def default_chunk_rows(vocab: int) -> int:
    """Rows per chunk: about ``CHUNK_BYTES`` of float32 logits, compute-dtype logits and gradient (8 bytes/entry)."""
    return max(32, CHUNK_BYTES // (8 * vocab))


class _ChunkedLinearCE(torch.autograd.Function):
    """Sum over rows of cross_entropy(hidden @ weight.T + bias, targets), one chunk of rows at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows: int, ignore_index: int, want_h: bool,
                want_w: bool, compute_dtype):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) \
            if want_w and bias is not None else None
        w = weight.to(compute_dtype)
        b = bias.to(compute_dtype) if bias is not None else None
        for s in range(0, hidden.shape[0], chunk_rows):
            h = hidden[s:s + chunk_rows].to(compute_dtype)
            t = targets[s:s + chunk_rows]
            valid = t != ignore_index
            safe = torch.where(valid, t, 0)
            logits = F.linear(h, w, b).float()  # (n, V): the compute dtype's rounding, then float32
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, safe[:, None])[:, 0]
            total += ((lse - picked) * valid).sum()
            if not (want_h or want_w):
                continue
            grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            grad[torch.arange(len(t), device=t.device), safe] -= 1.0
            grad.mul_(valid[:, None])
            grad = grad.to(compute_dtype)  # as the plain path's cast back from float32
            if want_h:
                grad_h[s:s + chunk_rows] = (grad @ w).to(hidden.dtype)
            if want_w:
                grad_w += (grad.t() @ h).float()
                if grad_bias is not None:
                    grad_bias += grad.float().sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_bias)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w, grad_bias = ctx.saved_tensors
        gh = grad_h * grad_total.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_total).to(ctx.dtypes[0]) if grad_w is not None else None
        gb = (grad_bias * grad_total).to(ctx.dtypes[1]) if grad_bias is not None else None
        return gh, gw, gb, None, None, None, None, None, None


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 bias: torch.Tensor | None = None, chunk_rows: int | None = None,
                                 ignore_index: int = -100) -> torch.Tensor:
    """Summed cross entropy of ``hidden @ weight.T (+ bias)`` against ``targets``: hidden (N, d), weight (V, d),
    targets (N,) -> a float32 scalar. Under autocast the logits are computed in the autocast dtype, as the plain
    head would; gradients flow to ``hidden`` (and to ``weight``/``bias`` where they require grad)."""
    device_type = hidden.device.type
    autocast = torch.is_autocast_enabled(device_type)
    compute_dtype = torch.get_autocast_dtype(device_type) if autocast else weight.dtype
    grad_on = torch.is_grad_enabled()
    want_h = grad_on and hidden.requires_grad
    want_w = grad_on and (weight.requires_grad or (bias is not None and bias.requires_grad))
    rows = chunk_rows or default_chunk_rows(weight.shape[0])
    with torch.autocast(device_type, enabled=False):
        return _ChunkedLinearCE.apply(hidden, weight, bias, targets, rows, ignore_index, want_h, want_w,
                                      compute_dtype)


@functools.lru_cache(maxsize=None)
def liger_available() -> bool:
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy  # noqa: F401
    except ImportError:
        return False
    return True


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             bias: torch.Tensor | None = None, ignore_index: int = -100,
                             backend: str = "auto") -> torch.Tensor:
    """The summed loss by the best backend here: Liger's fused kernel on CUDA where installed, else the chunked one.
    ``backend``: auto, liger or chunked."""
    use_liger = backend == "liger" or (backend == "auto" and hidden.is_cuda and liger_available())
    if not use_liger:
        return chunked_linear_cross_entropy(hidden, weight, targets, bias, ignore_index=ignore_index)
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    with torch.autocast(device_type, enabled=False):
        loss = liger_fused_linear_cross_entropy(hidden.to(dtype), weight.to(dtype), targets,
                                                bias.to(dtype) if bias is not None else None,
                                                ignore_index=ignore_index, reduction="sum")
    return loss.float()


# ----------------------------------------------------------------------------------------------------------------
# From a model and a batch


def causal_lm(model):
    """The transformers model under the peft and DDP wrappers (FSDP2 shards in place and adds no wrapper)."""
    inner = unwrap(model)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def supports_chunked_loss(model) -> bool:
    """Whether ``model``'s logits are exactly its head applied to the last hidden state, with the head's weight a
    plain tensor (under FSDP2 it is a sharded DTensor outside the forward: the plain loss is used there)."""
    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    if getattr(lm.config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES or not isinstance(head, torch.nn.Linear):
        return False
    return type(head.weight) in (torch.Tensor, torch.nn.Parameter)


def trained_positions(targets: torch.Tensor, ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices of the trained positions of ``targets`` (B, T) and their targets, found where ``targets`` is
    (on the host before the batch moves, so finding them waits for no device)."""
    flat = targets.reshape(-1)
    index = (flat != ignore_index).nonzero().squeeze(1)
    return index, flat[index]


def weighted_cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
                               ) -> tuple[torch.Tensor, float]:
    """sum_i w_i * ce_i over rows of ``logits`` (N, V) against ``targets`` (N,) with ``weights`` (N,), and sum_i w_i:
    the loss of ``prompt_loss_weight`` (reply tokens weigh 1, prompt tokens the weight). The step divides the sum
    over all its micro-batches by the summed weight, so weight 0 is the replies-only loss and 1 train_on_source's."""
    ce = F.cross_entropy(logits.float(), targets, reduction="none")
    weights = weights.to(ce.device, non_blocking=True)
    return (ce * weights).sum(), float(weights.sum())


def loss_sum_chunked(model, inputs: dict, targets: torch.Tensor, device: torch.device,
                     ignore_index: int = -100, backend: str = "auto",
                     weights: torch.Tensor | None = None) -> tuple[torch.Tensor, int | float]:
    """Summed cross entropy over the trained positions of a batch, and their count, by the chunked head.

    ``inputs``: the model's keyword arguments, already on ``device``; ``targets``: (B, T), still on the host. The
    model runs with ``output_hidden_states`` and projects one position per row (``logits_to_keep=1``); the last
    hidden state (after the final norm) of the trained positions goes through ``linear_cross_entropy_sum``.
    ``weights`` (B, T) (``prompt_loss_weight``): the weighted sum and the summed weight instead, one chunked sum per
    distinct weight (reply tokens and prompt tokens), each scaled by its weight.
    """
    index, picked = trained_positions(targets, ignore_index)
    out = model(**inputs, use_cache=False, output_hidden_states=True, logits_to_keep=1)
    hidden = out.hidden_states[-1]  # (B, T, d), after the final norm
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index.to(device, non_blocking=True))
    head = causal_lm(model).get_output_embeddings()
    if weights is None:
        loss = linear_cross_entropy_sum(rows, head.weight, picked.to(device, non_blocking=True), head.bias,
                                        ignore_index=ignore_index, backend=backend)
        return loss, int(index.numel())
    w = weights.reshape(-1)[index]
    loss = torch.zeros((), dtype=torch.float32, device=device)
    for value in w.unique().tolist():
        sel = (w == value).nonzero().squeeze(1)
        loss = loss + value * linear_cross_entropy_sum(rows.index_select(0, sel.to(device)), head.weight,
                                                       picked[sel].to(device), head.bias, ignore_index=ignore_index,
                                                       backend=backend)
    return loss, float(w.sum())
