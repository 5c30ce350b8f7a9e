"""``qlorakit serve RUN_DIR | FILE.gguf``: parse the options, pick the backend, check the port before loading the
model, and serve until Ctrl-C."""

from __future__ import annotations

import errno
import importlib.util
import socket
import sys
import threading
from pathlib import Path

from ..errors import UserError
from ..options import Parser, positive_integer
from . import llama

BACKENDS = ("auto", "transformers", "llama.cpp", "vllm")

DESCRIPTION = """Serve a tuned run behind an OpenAI-compatible API: /v1/chat/completions (streaming too),
/v1/completions, /v1/models and /health. Every chat request is rendered in the run's prompt format, with its system
message and history, and generation stops at the run's end-of-reply token and at the client's stop strings.

Backends: transformers (the base plus the adapter, no export), llama.cpp (llama-cpp-python's server on the run's GGUF,
exported into the run directory first when it has none; needs the llama extra), vllm (starts vLLM's server with the
adapter; needs a CUDA machine with vLLM). auto: llama.cpp for a .gguf file or where it is installed, else
transformers."""


def serve_parser() -> Parser:
    p = Parser("qlorakit serve", usage="qlorakit serve RUN_DIR | FILE.gguf [--host H] [--port N] [--api_key KEY] "
               "[--backend auto|transformers|llama.cpp|vllm] [--max_tokens N] [--name NAME]",
               description=DESCRIPTION)
    p.add_argument("target", metavar="RUN_DIR | FILE.gguf", type=Path,
                   help="a run directory of 'qlorakit train' (or a checkpoint-STEP folder), or a GGUF file")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface, reachable "
                   "from other machines; pair it with --api_key). Default: 127.0.0.1, this machine only.")
    p.add_argument("--port", type=positive_integer, default=8000, metavar="N", help="Default: 8000, the port "
                   "OpenAI-compatible clients and vLLM use.")
    p.add_argument("--api_key", default=None, metavar="KEY", help="require 'Authorization: Bearer KEY' (what the "
                   "openai client sends as api_key); a wrong or missing key gets 401. Default: none required.")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="Default: auto.")
    p.add_argument("--max_tokens", type=positive_integer, default=512, metavar="N", help="longest reply when a "
                   "request names no max_tokens (transformers backend). Default: 512.")
    p.add_argument("--name", default=None, metavar="NAME", help="the model name clients send and /v1/models lists. "
                   "Default: the run directory's (or the GGUF file's) name.")
    return p


def check_port(host: str, port: int) -> None:
    """A one-line UserError unless a server can listen on ``host:port`` now (checked by binding, as the server
    will, before any model is loaded)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UserError(f"port {port} on {host} is in use; pass --port N") from None
            if e.errno == errno.EACCES:
                raise UserError(f"port {port} on {host} needs administrator rights; pass --port N above 1023") \
                    from None
            raise UserError(f"--host {host}: cannot listen there ({e.strerror}); pass --host 127.0.0.1") from None


def choose_backend(backend: str, target: Path) -> str:
    gguf = target.suffix == ".gguf"
    if backend == "auto":
        return "llama.cpp" if gguf or llama.available() else "transformers"
    if gguf and backend != "llama.cpp":
        raise UserError(f"{target} is a GGUF file, which only --backend llama.cpp serves; give the run directory "
                        f"for --backend {backend}")
    return backend


def serve_main(argv: list[str]) -> int:
    o = serve_parser().parse_args(argv)
    target = o.target
    if not target.exists():
        raise UserError(f"{target}: no such run directory or GGUF file")
    backend = choose_backend(o.backend, target)
    name = o.name or (target.stem if target.suffix == ".gguf" else target.name)
    check_port(o.host, o.port)
    if backend == "vllm":
        from .vllm import serve_vllm

        return serve_vllm(target, name, o.host, o.port, o.api_key)
    app = build_app(backend, target, name, o.api_key, o.max_tokens)
    url = f"http://{o.host}:{o.port}/v1"
    print(f"qlorakit serve: {backend} backend, model {name!r} at {url} (Ctrl-C stops)", file=sys.stderr, flush=True)
    run_server(app, o.host, o.port)
    return 0


def build_app(backend: str, target: Path, name: str, api_key: str | None, max_tokens: int):
    """The HTTP app of ``backend`` (transformers or llama.cpp) for the run or GGUF ``target``."""
    if backend == "llama.cpp":
        llama.require()
        if target.suffix == ".gguf":  # a file alone: its own chat template formats the chats
            return llama.create_app(target, name, api_key)
        return llama.create_app(llama.run_gguf(target), name, api_key, run_format(target))
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"--backend transformers needs {', '.join(missing)}, not installed here: "
                        "pip install 'qlorakit[serve]'")
    from ..runs import load_run
    from .app import create_app
    from .engine import Engine

    model, tokenizer, cfg = load_run(target)
    return create_app(Engine(model, tokenizer, cfg.prompt_format, name, max_tokens), api_key)


def run_format(run_dir: Path) -> tuple:
    """(tokenizer, prompt format) of a run: what renders its chats."""
    from ..config import load_run_config
    from ..model.load import load_tokenizer
    from ..runs import run_files

    _, cfg_dir, tok_dir = run_files(run_dir)
    cfg = load_run_config(cfg_dir)
    return load_tokenizer(str(tok_dir), cfg.trust_remote_code), cfg.prompt_format


def _uvicorn_server(app, host: str, port: int):
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))


def run_server(app, host: str, port: int) -> None:
    """Serve ``app`` in this thread until Ctrl-C."""
    _uvicorn_server(app, host, port).run()


class BackgroundServer:
    """``app`` served on ``host:port`` from a thread (tests, benchmarks): ``with BackgroundServer(app) as url``."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, timeout: float = 60.0):
        self.host, self.port = host, port or free_port(host)
        self.server = _uvicorn_server(app, self.host, self.port)
        self.timeout = timeout
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        import time

        self.thread.start()
        deadline = time.monotonic() + self.timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.host}:{self.port} did not start")
            time.sleep(0.05)
        return f"http://{self.host}:{self.port}/v1"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=self.timeout)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
