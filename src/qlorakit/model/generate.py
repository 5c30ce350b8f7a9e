"""Batched generation from token ids: the core that training's evaluation (train/validate.py) and the commands
(generation.py: chat, generate, eval, compare) share. Prompts are rendered by the caller (data/tokenize.prompt_ids),
so this module knows nothing of prompt formats: it is given the ids to stop on and the text that ends a reply."""

from __future__ import annotations

import torch


def cut_at_stop(text: str, stop: str) -> str:
    """``text`` up to the first ``stop`` (the format's end-of-reply text), if it holds one."""
    return text.split(stop, 1)[0] if stop and stop in text else text


def compute_bf16(model) -> bool:
    return any(p.dtype == torch.bfloat16 for p in model.parameters())


@torch.no_grad()
def generate_batched(model, tokenizer, prompts: list[list[int]], *, stop_ids: list[int], stop: str,
                     batch_size: int = 8, **generate_kwargs) -> list[str]:
    """One reply per prompt (token ids up to where the reply begins), batched with left padding, decoded without
    special tokens, cut at ``stop`` and stripped. ``generate_kwargs`` go to ``model.generate`` (max_new_tokens,
    do_sample, ...); the model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    replies = []
    try:
        for s in range(0, len(prompts), batch_size):
            chunk = prompts[s:s + batch_size]
            width = max(map(len, chunk))
            ids = torch.tensor([[pad] * (width - len(c)) + c for c in chunk], device=device)  # (B, T)
            mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk], device=device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=compute_bf16(model)):
                out = model.generate(input_ids=ids, attention_mask=mask, eos_token_id=stop_ids, pad_token_id=pad,
                                     use_cache=True, **generate_kwargs)
            for row in out[:, width:]:
                replies.append(cut_at_stop(tokenizer.decode(row, skip_special_tokens=True), stop).strip())
    finally:
        model.train(was_training)
    return replies
