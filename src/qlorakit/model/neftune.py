"""NEFTune (Jain et al. 2023): uniform noise on the input embeddings in training steps, scaled per example.

Each embedding vector of an example of L tokens gets noise drawn uniformly from [-1, 1] in every coordinate and
scaled by alpha / sqrt(L * d) (d the hidden size), so an example's noise has the same size whatever its length. L is
the example's OWN length, also inside a packed row that holds several examples (transformers' NEFTune divides by the
whole row's length, so a packed short example gets far too little: transformers issue 34659); in a padded batch it
is the example's real length and padding gets none.

The noise is a forward hook on the input embeddings (``add_neftune``), not a patched forward, and it adds anything
only while BOTH hold: the embedding module is in training mode, and the training step has said the lengths of the
batch's examples (``example_lengths``, around the forward of each training micro-batch). So evaluation
(``model.eval()``), generation and any forward outside a training step never see noise. The draws come from torch's
random generator, whose state checkpoints save and restore.
"""

from __future__ import annotations

import contextlib

import torch

from .loss import causal_lm

HOOK_ATTR = "_qlorakit_neftune"


class EmbeddingNoise:
    """The forward hook: ``alpha`` and, while a training step's forward runs, each position's example length."""

    def __init__(self, alpha: float):
        self.alpha = alpha
        self.lengths: torch.Tensor | None = None  # (B, T): the length of the example each position is in; 0 = pad

    def scale(self, lengths: torch.Tensor, d: int) -> torch.Tensor:
        """alpha / sqrt(L * d) per position (B, T), 0 where L is 0 (padding)."""
        L = lengths.float()
        return torch.where(L > 0, self.alpha / (L.clamp(min=1) * d).sqrt(), 0.0)

    def __call__(self, module: torch.nn.Module, args, output: torch.Tensor):
        if not module.training or self.lengths is None:
            return None
        if tuple(self.lengths.shape) != tuple(output.shape[:-1]):
            raise ValueError(f"NEFTune: example lengths of shape {tuple(self.lengths.shape)} for embeddings of shape "
                             f"{tuple(output.shape)}")
        mag = self.scale(self.lengths.to(output.device, non_blocking=True), output.shape[-1])  # (B, T)
        noise = torch.empty_like(output).uniform_(-1, 1)  # (B, T, d)
        return output + noise * mag.to(output.dtype)[..., None]


def add_neftune(model, alpha: float) -> EmbeddingNoise | None:
    """Hook NEFTune noise of ``alpha`` onto the input embeddings of ``model`` (a peft or transformers model); None
    (and nothing hooked) when ``alpha`` is 0."""
    if alpha <= 0:
        return None
    embeddings = causal_lm(model).get_input_embeddings()
    hook = EmbeddingNoise(alpha)
    embeddings.register_forward_hook(hook)
    setattr(embeddings, HOOK_ATTR, hook)
    return hook


def noise_hook(model) -> EmbeddingNoise | None:
    return getattr(causal_lm(model).get_input_embeddings(), HOOK_ATTR, None)


def position_lengths(batch: dict) -> torch.Tensor:
    """(B, T) int: for each token position of a collated batch, the length of the example it belongs to (0 on
    padding). A packed row's examples are told by its ``cu_seq_lens_q`` boundaries (data/batching.py)."""
    ids = batch["input_ids"]
    if "cu_seq_lens_q" in batch:
        sizes = batch["cu_seq_lens_q"].long().diff()
        return sizes.repeat_interleave(sizes)[None]
    if "attention_mask" in batch:
        mask = batch["attention_mask"].long()
        return mask * mask.sum(1, keepdim=True)
    return torch.full(ids.shape, ids.shape[1], dtype=torch.long)


@contextlib.contextmanager
def example_lengths(model, batch: dict):
    """Around a training micro-batch's forward: NEFTune (where ``model`` has it) adds noise scaled by the lengths
    of ``batch``'s examples. Outside it, no noise."""
    hook = noise_hook(model)
    if hook is None:
        yield
        return
    hook.lengths = position_lengths(batch)
    try:
        yield
    finally:
        hook.lengths = None
