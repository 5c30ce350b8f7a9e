"""Generation in the run's own prompt format (the token sequence the model was trained on): batched replies and
a streamed reply."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from .data.formats import Message
from .data.templates import stop_text, stop_token_ids
from .data.tokenize import prompt_ids
from .model.generate import compute_bf16, cut_at_stop, generate_batched


@dataclass
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0

    def generate_kwargs(self) -> dict:
        kw = {"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty}
        if self.temperature > 0:
            kw.update(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or None)
        else:
            kw.update(do_sample=False)
        return kw


@torch.no_grad()
def generate_replies(model, tokenizer, prompt_format: str, conversations: list[list[Message]],
                     sampling: Sampling | None = None, batch_size: int = 8) -> list[str]:
    """One reply per conversation (each ending on a user turn), batched with left padding."""
    sampling = sampling or Sampling()
    prompts = [prompt_ids(c, tokenizer, prompt_format) for c in conversations]
    return generate_batched(model, tokenizer, prompts, stop_ids=stop_token_ids(tokenizer, prompt_format),
                            stop=stop_text(prompt_format, tokenizer), batch_size=batch_size,
                            **sampling.generate_kwargs())


def stream_reply(model, tokenizer, prompt_format: str, history: list[Message], sampling: Sampling,
                 out=None) -> str:
    """Generate the next assistant turn for ``history``, printing tokens to ``out`` (``sys.stdout`` as it is at the
    call, not as it was at import) as they come."""
    out = out if out is not None else sys.stdout
    from transformers import TextIteratorStreamer
    import threading

    ids = torch.tensor([prompt_ids(history, tokenizer, prompt_format)], device=next(model.parameters()).device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    stop_ids, stop = stop_token_ids(tokenizer, prompt_format), stop_text(prompt_format, tokenizer)
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), eos_token_id=stop_ids,
                  pad_token_id=tokenizer.pad_token_id, streamer=streamer, **sampling.generate_kwargs())

    def run():
        with torch.no_grad(), torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=compute_bf16(model)):
            model.generate(**kwargs)

    thread = threading.Thread(target=run)
    thread.start()
    text = ""
    for piece in streamer:
        shown = cut_at_stop(text + piece, stop)
        out.write(shown[len(text):])
        out.flush()
        text = shown
    thread.join()
    out.write("\n")
    out.flush()
    return cut_at_stop(text, stop).strip()
