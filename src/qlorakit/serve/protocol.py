"""The requests the server takes, in OpenAI's shape (pydantic models), and its errors in OpenAI's error JSON.

Every key a client may send is named here; an unknown key is a 400 naming it (never silently dropped), and keys this
server cannot honour (``n`` above 1, penalties other than 0) are refused with a message rather than ignored.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from ..data.formats import Message


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: Optional[str] = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """The keys chat and text completions share: sampling, stop strings, lengths, streaming."""

    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # not OpenAI's, but llama.cpp's and vLLM's servers take it
    repetition_penalty: float = Field(1.0, gt=0)  # likewise
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    seed: Optional[int] = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: Optional[str] = None  # a client's end-user id: logged nowhere, changes nothing

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def refusals(self) -> list[str]:
        """What this request asks that the server does not do (each is a 400, never ignored)."""
        out = []
        if self.n != 1:
            out.append(f"n={self.n}: this server returns one choice per request (n=1)")
        for key in ("presence_penalty", "frequency_penalty"):
            if getattr(self, key):
                out.append(f"{key}: not supported (send 0, or repetition_penalty above 1)")
        if len(self.stop_strings()) > 4:
            out.append("stop: at most 4 strings")
        return out


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)

    def conversation(self) -> list[Message]:
        """The messages as qlorakit's conversation; a shape no prompt format renders is a ValueError."""
        msgs = [Message(m.role, m.text()) for m in self.messages]
        if any(m.role == "system" for m in msgs[1:]):
            raise ValueError("messages: a system message can only come first")
        if msgs[-1].role != "user":
            raise ValueError("messages: the last message must be the user's (the model answers it)")
        return msgs

    def length(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingRequest):
    prompt: Union[str, list[str]]
    echo: bool = False

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise ValueError("prompt: give one string (this server answers one prompt per request)")
        return self.prompt[0]

    def length(self) -> Optional[int]:
        return self.max_tokens


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error JSON: what its clients read into ``APIError.message``."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def validation_message(errors: list) -> str:
    """pydantic's errors as one line: each field's location and what was wrong."""
    parts = []
    for e in errors:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        msg = "unknown key" if e.get("type") == "extra_forbidden" else e.get("msg", "invalid")
        parts.append(f"{loc or 'body'}: {msg}")
    return "; ".join(dict.fromkeys(parts))
