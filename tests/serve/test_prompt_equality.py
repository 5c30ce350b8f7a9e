"""The prompt the server feeds the model for a multi-turn chat (system message, history) is, token for token, what
training rendered for the same conversation, in every prompt format."""

from __future__ import annotations

import openai
import pytest

from qlorakit.data.formats import Conversation, Message
from qlorakit.data.templates import NAMES, render_text
from qlorakit.data.tokenize import bos_ids, tokenize_conversation

TURNS = [Message("system", "You answer briefly."), Message("user", "Name a stone."),
         Message("assistant", "Quartz."), Message("user", "And a river?")]
REPLY = Message("assistant", "The harbor river.")


def training_prompt(tokenizer, fmt: str) -> list[int]:
    """What training made of the conversation with its next reply, up to where that reply's trained tokens start."""
    ex = tokenize_conversation(Conversation(tuple(TURNS) + (REPLY,), "test"), tokenizer, fmt)
    n_reply, is_reply = ex.spans[-1]
    assert is_reply
    return ex.input_ids[:len(ex.input_ids) - n_reply]


def fed_ids(loaded_run, fmt: str) -> list[int]:
    """The ids the served model's first forward pass (the prompt) gets for TURNS, through HTTP."""
    from qlorakit.serve.app import create_app
    from qlorakit.serve.command import BackgroundServer
    from qlorakit.serve.engine import Engine

    model, tokenizer, _ = loaded_run
    seen: list[list[int]] = []

    def capture(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not seen:
            seen.append(ids[0].tolist())

    hook = model.get_base_model().register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with BackgroundServer(create_app(Engine(model, tokenizer, fmt, "tiny-run", max_tokens=2))) as url:
            client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)
            client.chat.completions.create(model="tiny-run", max_tokens=1, temperature=0,
                                           messages=[{"role": m.role, "content": m.content} for m in TURNS])
    finally:
        hook.remove()
    return seen[0]


@pytest.mark.parametrize("fmt", NAMES)
def test_server_feeds_the_tokens_training_rendered(loaded_run, fmt):
    tokenizer = loaded_run[1]
    expected = training_prompt(tokenizer, fmt)
    assert fed_ids(loaded_run, fmt) == expected
    # the broken twin: the rendered text tokenized in one piece is not what training saw, and would be caught
    joint = bos_ids(tokenizer) + tokenizer(render_text(TURNS, fmt, tokenizer, add_generation_prompt=True),
                                           add_special_tokens=False)["input_ids"]
    if fmt in ("airoboros", "vicuna", "alpaca"):
        assert joint != expected
