"""``qlorakit serve``'s transformers backend, live on 127.0.0.1, queried with the official openai client."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

CHAT = [{"role": "system", "content": "You repeat words."},
        {"role": "user", "content": "Repeat some words about the river stone."}]


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live[0], api_key="test-key", max_retries=0, timeout=120)


def ask(client, **kw):
    return client.chat.completions.create(model="tiny-run", messages=CHAT, temperature=0, **kw)


def test_chat_and_completions_return_text(client):
    reply = ask(client, max_tokens=12)
    assert reply.object == "chat.completion" and reply.model == "tiny-run"
    text = reply.choices[0].message.content
    assert isinstance(text, str) and text.strip()
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > 10
    done = client.completions.create(model="tiny-run", prompt="alpha beta gamma", max_tokens=8, temperature=0)
    assert done.choices[0].text.strip() and done.usage.completion_tokens > 0
    assert [m.id for m in client.models.list().data] == ["tiny-run"]


def test_streaming_yields_chunks_and_a_finish_reason_and_the_same_text(client):
    whole = ask(client, max_tokens=12).choices[0]
    chunks = list(ask(client, max_tokens=12, stream=True))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 2  # text arrives as it is generated, not in one piece
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert "".join(pieces) == whole.message.content  # greedy: streamed and whole replies are the same text
    text_chunks = list(client.completions.create(model="tiny-run", prompt="alpha beta", max_tokens=6, stream=True,
                                                 temperature=0))
    assert text_chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_max_tokens_ends_with_length(client):
    reply = ask(client, max_tokens=3)
    assert reply.usage.completion_tokens == 3 and reply.choices[0].finish_reason == "length"


def test_stop_strings_cut_the_text_streamed_or_not(client):
    full = ask(client, max_tokens=16).choices[0].message.content
    words = full.split()
    assert len(words) >= 3, full
    stop = " " + words[2]
    expected = full[:full.index(stop)]
    reply = ask(client, max_tokens=16, stop=[stop])
    assert reply.choices[0].message.content == expected and reply.choices[0].finish_reason == "stop"
    streamed = list(ask(client, max_tokens=16, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_wrong_or_missing_key_gets_401_in_openai_shape(live):
    bad = openai.OpenAI(base_url=live[0], api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model="tiny-run", messages=CHAT, max_tokens=2)
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    for route in ("/chat/completions", "/models"):  # no key at all
        r = httpx.request("POST" if "chat" in route else "GET", live[0] + route, json={"messages": CHAT}, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(live[0].removesuffix("/v1") + "/health").json()["status"] == "ok"  # no key needed


def test_bad_requests_get_400_with_a_message_and_the_server_stays_up(client, live):
    cases = [
        (dict(messages=[*CHAT, {"role": "assistant", "content": "x"}]), "last message must be the user's"),
        (dict(messages=CHAT, extra_body={"bogus_key": 1}), "bogus_key: unknown key"),
        (dict(messages=[{"role": "robot", "content": "x"}]), "messages.0.role"),
        (dict(messages=CHAT, n=2), "n=2"),
        (dict(messages=CHAT, max_tokens=0), "max_tokens"),
    ]
    for kw, words in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny-run", **kw)
        assert words in e.value.message, e.value.message
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="another-model", messages=CHAT, max_tokens=2)
    assert "tiny-run" in e.value.message
    raw = httpx.post(live[0] + "/chat/completions", content=b"{not json", timeout=30,
                     headers={"Authorization": "Bearer test-key", "Content-Type": "application/json"})
    assert raw.status_code == 400 and "message" in raw.json()["error"]
    assert ask(client, max_tokens=2).choices[0].message.content is not None  # still serving


def test_stream_is_server_sent_events_ending_with_done(live):
    with httpx.stream("POST", live[0] + "/chat/completions", timeout=120, headers={"Authorization": "Bearer test-key"},
                      json={"messages": CHAT, "max_tokens": 4, "stream": True,
                            "stream_options": {"include_usage": True}}) as r:
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    usage = json.loads(events[-2])["usage"]
    assert usage["completion_tokens"] <= 4 and usage["total_tokens"] == usage["prompt_tokens"] + usage[
        "completion_tokens"]
