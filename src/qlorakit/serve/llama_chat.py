"""A llama-cpp-python chat handler that feeds llama.cpp training's own token ids for a conversation.

llama-cpp-python's default handler renders the GGUF's chat template to text and tokenizes it in one piece, while
training tokenized each turn on its own, so at a turn boundary the ids can differ (``USER:`` after a space is one
token in one piece, two when the space ended the previous segment). For a run directory the backend registers this
handler instead: ``prompt_ids`` with the run's tokenizer (the GGUF's vocabulary has the same ids), then llama.cpp's
own completion, converted to a chat reply by llama-cpp-python.
"""

from __future__ import annotations

import itertools

from ..data.formats import Message
from ..data.templates import stop_text
from ..data.tokenize import prompt_ids

#: the handler keywords passed on to ``Llama.create_completion`` as they come
COMPLETION_KEYS = ("temperature", "top_p", "top_k", "min_p", "typical_p", "seed", "presence_penalty",
                   "frequency_penalty", "repeat_penalty", "tfs_z", "mirostat_mode", "mirostat_tau", "mirostat_eta",
                   "model", "logits_processor", "grammar", "logit_bias")
_names = itertools.count()


def conversation(messages: list[dict]) -> list[Message]:
    """OpenAI-shaped messages as qlorakit's; a shape no prompt format renders is a ValueError."""
    out = []
    for m in messages:
        content = m.get("content") or ""
        if not isinstance(content, str):
            content = "".join(part.get("text", "") for part in content)
        out.append(Message(m["role"], content))
    if any(m.role not in ("system", "user", "assistant") for m in out):
        raise ValueError("messages: roles are system, user and assistant")
    if any(m.role == "system" for m in out[1:]) or not out or out[-1].role != "user":
        raise ValueError("messages: a system message only first, and the last message the user's")
    return out


def register_handler(tokenizer, prompt_format: str) -> str:
    """Register the handler for ``prompt_format`` with llama-cpp-python; returns the chat_format name to serve."""
    from llama_cpp import llama_chat_format

    end = stop_text(prompt_format, tokenizer)

    def handler(*, llama, messages, stream: bool = False, max_tokens=None, stop=None,
                logprobs=None, top_logprobs=None, tools=None, functions=None, response_format=None, **kwargs):
        if tools or functions or response_format:
            raise ValueError("tools, functions and response_format are not supported by qlorakit serve")
        ids = prompt_ids(conversation(messages), tokenizer, prompt_format)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        completion = llama.create_completion(
            prompt=ids, stream=stream, max_tokens=max_tokens, stop=stops + ([end] if end else []),
            logprobs=top_logprobs if logprobs else None, **{k: kwargs[k] for k in COMPLETION_KEYS if k in kwargs})
        return llama_chat_format._convert_completion_to_chat(completion, stream=stream)

    name = f"qlorakit-{prompt_format}-{next(_names)}"
    llama_chat_format.register_chat_completion_handler(name)(handler)
    return name
