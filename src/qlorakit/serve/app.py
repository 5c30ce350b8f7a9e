"""The transformers backend's HTTP app: OpenAI's routes (``/v1/chat/completions``, ``/v1/completions``,
``/v1/models``) and ``/health``, over an ``Engine``. Bad requests get OpenAI's error JSON with a 4xx status and the
server stays up; ``--api_key`` is checked as ``Authorization: Bearer KEY`` on every ``/v1`` route."""

from __future__ import annotations

import json
import time
import uuid
from typing import Iterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..generation import Sampling
from .engine import Engine, Result
from .protocol import ChatRequest, CompletionRequest, error_body, validation_message


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def create_app(engine: Engine, api_key: str | None = None):
    """The FastAPI app serving ``engine``."""
    app = FastAPI(title=f"qlorakit serve: {engine.name}")

    def error(status: int, message: str, **kw) -> JSONResponse:
        kind = "authentication_error" if status == 401 else "invalid_request_error" if status < 500 else "server_error"
        return JSONResponse(error_body(message, kind, **kw), status_code=status)

    @app.exception_handler(RequestError)
    async def request_error(_: Request, e: RequestError):
        return error(e.status, str(e), param=e.param, code=e.code)

    @app.exception_handler(RequestValidationError)
    async def bad_shape(_: Request, e: RequestValidationError):
        return error(400, validation_message(e.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException):
        return error(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def failure(_: Request, e: Exception):
        return error(500, f"generation failed: {type(e).__name__}: {e}")

    def authorized(request: Request) -> None:
        if api_key is None:
            return
        if request.headers.get("authorization", "") != f"Bearer {api_key}":
            raise RequestError(401, "Incorrect API key provided; send it as 'Authorization: Bearer KEY'",
                               code="invalid_api_key")

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": engine.name, "backend": "transformers"}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    def models() -> dict:
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": 0,
                                            "owned_by": "qlorakit"}]}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    def chat(body: ChatRequest):
        try:
            ids = engine.chat_ids(body.conversation())
        except ValueError as e:
            raise RequestError(400, str(e), param="messages") from None
        return _answer(engine, body, ids, chat=True)

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    def completions(body: CompletionRequest):
        try:
            text = body.prompt_text()
        except ValueError as e:
            raise RequestError(400, str(e), param="prompt") from None
        if body.echo:
            raise RequestError(400, "echo: not supported", param="echo")
        return _answer(engine, body, engine.text_ids(text), chat=False)

    return app


def _answer(engine: Engine, body, ids: list[int], chat: bool):
    if body.model and body.model != engine.name:
        raise RequestError(404, f"model {body.model!r} is not served here; this server serves {engine.name!r}",
                           param="model", code="model_not_found")
    refusals = body.refusals()
    if refusals:
        raise RequestError(400, "; ".join(refusals))
    max_tokens = body.length() or engine.max_tokens
    try:
        engine.check_length(ids, max_tokens)
    except ValueError as e:
        raise RequestError(400, str(e), param="max_tokens") from None
    sampling = Sampling(max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                        repetition_penalty=body.repetition_penalty)
    results = engine.generate(ids, sampling, body.stop_strings(), body.seed)
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": engine.name}
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_events(results, head, chat, usage), media_type="text/event-stream")
    final = Result()
    for final in results:
        pass
    choice = ({"message": {"role": "assistant", "content": final.text}} if chat else {"text": final.text})
    return {**head, "object": "chat.completion" if chat else "text_completion",
            "choices": [{"index": 0, **choice, "finish_reason": final.finish_reason, "logprobs": None}],
            "usage": _usage(final)}


def _usage(r: Result) -> dict:
    return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.tokens,
            "total_tokens": r.prompt_tokens + r.tokens}


def _events(results: Iterator[Result], head: dict, chat: bool, usage: bool) -> Iterator[str]:
    """Server-sent events in OpenAI's chunk format: a chunk per new piece of text, a last one with the finish
    reason (and, when asked, one with the usage), then ``data: [DONE]``."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, finish: str | None, first: bool = False) -> str:
        if chat:
            delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        return "data: " + json.dumps({**head, "object": kind, "choices": [choice]}) + "\n\n"

    if chat:
        yield chunk(None, None, first=True)
    shown, last = 0, Result()
    try:
        for last in results:
            if len(last.text) > shown:
                yield chunk(last.text[shown:], None)
                shown = len(last.text)
    except Exception as e:  # the stream has started: the error goes in an event, as OpenAI's servers do
        yield "data: " + json.dumps(error_body(f"generation failed: {type(e).__name__}: {e}", "server_error")) + "\n\n"
        return
    yield chunk(None, last.finish_reason)
    if usage:
        yield "data: " + json.dumps({**head, "object": kind, "choices": [], "usage": _usage(last)}) + "\n\n"
    yield "data: [DONE]\n\n"
