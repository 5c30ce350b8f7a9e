"""Attention for packed rows that does no work across examples.

A packed row holds several examples back to back. The stock SDPA path masks attention between them with a
block-diagonal mask, but still computes every (query, key) pair of the whole row: its cost grows with the square of
the packed length. This implementation runs causal SDPA on each example's own span instead (the boundaries come
as ``cu_seq_lens_q``, the same keyword transformers uses for varlen flash attention), which gives the same numbers
for a fraction of the work. Without boundaries it is the stock SDPA path, so generation and padded batches are
unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "qlorakit_packed_sdpa"


def packed_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                        cu_seq_lens_q: torch.Tensor | None = None, **kwargs):
    """query (1, H, T, D), key/value (1, H_kv, T, D) -> (1, T, H, D), as transformers' attention functions return."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    bounds = cu_seq_lens_q.tolist()
    gqa = query.shape[1] != key.shape[1]
    p = dropout if module.training else 0.0
    spans = [F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], dropout_p=p,
                                            is_causal=True, scale=scaling, enable_gqa=gqa)
             for s, e in zip(bounds[:-1], bounds[1:])]
    return torch.cat(spans, dim=2).transpose(1, 2).contiguous(), None


def register() -> None:
    """Make ``NAME`` a valid ``attn_implementation`` (masks as for SDPA when a padded batch needs one)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, packed_sdpa_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def use_packed_attention(model) -> bool:
    """Switch ``model`` from SDPA to the packed implementation; False when it does not use SDPA."""
    config = model.config
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    register()
    model.set_attn_implementation(NAME)
    return True
