"""The transformers backend's generation: the exact token ids training rendered, generated one request at a time,
as a stream of text pieces that stops at the run's stop tokens, at the client's stop strings, or at max_tokens.

A text piece is held back while it could still be the start of a stop string, so a stream never shows part of a stop
string; the finish reason is "stop" (a stop token or string) or "length" (max_tokens reached), as OpenAI's.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Iterator

import torch

from ..data.templates import stop_text
from ..data.tokenize import bos_ids, prompt_ids
from ..generation import Sampling
from ..runs import stop_token_ids


@dataclass
class Result:
    """What one generation produced so far: its text, its token count, and why it ended (None while running)."""

    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None
    prompt_tokens: int = 0


class _Streamer:
    """A transformers streamer that hands each generated token id to a queue (the prompt, sent first, is skipped)."""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for tid in value.reshape(-1).tolist():
            self.queue.put(tid)

    def end(self) -> None:
        self.queue.put(None)


class _Cancelled:
    """A stopping criterion that ends generation once the consumer found a stop string or went away."""

    def __init__(self):
        self.event = threading.Event()

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _held_back(text: str, stops: list[str]) -> int:
    """How many characters at the end of ``text`` could begin a stop string (or are an unfinished character)."""
    keep = 1 if text.endswith("\ufffd") else 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                keep = max(keep, n)
                break
    return keep


class Engine:
    """A model and its tokenizer in one prompt format; ``generate`` is safe to call from many threads (one runs at a
    time: the model is not re-entrant)."""

    def __init__(self, model, tokenizer, prompt_format: str, name: str, max_tokens: int):
        self.model, self.tokenizer, self.prompt_format = model, tokenizer, prompt_format
        self.name, self.max_tokens = name, max_tokens
        self.stop_ids = stop_token_ids(tokenizer, prompt_format)
        self.format_stop = stop_text(prompt_format, tokenizer)
        self.context = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        self.lock = threading.Lock()

    def chat_ids(self, messages) -> list[int]:
        """The ids training renders for ``messages`` up to the reply: the ones the model is fed."""
        return prompt_ids(messages, self.tokenizer, self.prompt_format)

    def text_ids(self, text: str) -> list[int]:
        """A raw completion prompt: BOS where the tokenizer adds one, then the text as it is."""
        return bos_ids(self.tokenizer) + self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def check_length(self, ids: list[int], max_tokens: int) -> None:
        if self.context and len(ids) + max_tokens > self.context:
            raise ValueError(f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds the model's "
                             f"context of {self.context} tokens; shorten the messages or lower max_tokens")

    def generate(self, ids: list[int], sampling: Sampling, stops: list[str], seed: int | None = None
                 ) -> Iterator[Result]:
        """Yield the result after each new piece of text; the last one has its finish_reason."""
        with self.lock:
            yield from self._generate(ids, sampling, stops, seed)

    def _generate(self, ids, sampling, stops, seed) -> Iterator[Result]:
        from transformers import StoppingCriteriaList

        device = next(self.model.parameters()).device
        input_ids = torch.tensor([ids], device=device)
        streamer, cancelled = _Streamer(), _Cancelled()
        if seed is not None:
            torch.manual_seed(seed)
        kwargs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), eos_token_id=self.stop_ids,
                      pad_token_id=self.tokenizer.pad_token_id, streamer=streamer,
                      stopping_criteria=StoppingCriteriaList([cancelled]), **sampling.generate_kwargs())
        failure: list[BaseException] = []

        def run():
            try:
                with torch.no_grad():
                    self.model.generate(**kwargs)
            except BaseException as e:  # handed to the request, which answers 500 with its message
                failure.append(e)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        try:
            yield from self._pieces(streamer, sampling.max_new_tokens, stops + [self.format_stop], len(ids), cancelled)
        finally:
            cancelled.event.set()  # the client went away, or a stop string was found: end generation
            thread.join()
        if failure:
            raise failure[0]

    def _pieces(self, streamer: _Streamer, limit: int, stops: list[str], n_prompt: int, cancelled: _Cancelled
                ) -> Iterator[Result]:
        stops = [s for s in stops if s]
        out, generated, shown = Result(prompt_tokens=n_prompt), [], 0
        while (tid := streamer.queue.get()) is not None:
            generated.append(tid)
            out.tokens = len(generated)
            if tid in self.stop_ids:  # the run's end of a reply (not part of the text)
                generated.pop()
                out.finish_reason = "stop"
                break
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            hits = [text.find(s, max(0, shown - len(s))) for s in stops]
            hits = [h for h in hits if h >= 0]
            if hits:
                out.text, out.finish_reason = text[:min(hits)], "stop"
                cancelled.event.set()
                yield out
                return
            ready = len(text) - _held_back(text, stops)
            if ready > shown:
                out.text, shown = text[:ready], ready
                yield out
        out.text = self.tokenizer.decode(generated, skip_special_tokens=True)
        if out.finish_reason is None:
            out.finish_reason = "length" if out.tokens >= limit else "stop"
        yield out
