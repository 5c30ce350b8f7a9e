"""The llama.cpp backend: llama-cpp-python's OpenAI server (``llama_cpp.server``, from the optional ``llama`` extra)
on the run's GGUF. The GGUF carries the run's prompt format as its Jinja chat template (``qlorakit export`` writes
it), and the server formats every chat request with that template, so requests are rendered as the run was trained.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from ..errors import UserError

log = logging.getLogger("qlorakit")

#: what the server imports beside llama_cpp itself (llama-cpp-python's ``[server]`` extra)
SERVER_MODULES = ("llama_cpp", "fastapi", "uvicorn", "sse_starlette", "pydantic_settings", "starlette_context")
INSTALL = "pip install 'qlorakit[llama]' 'llama-cpp-python[server]' (the README's GGUF section says how)"


def missing_modules() -> list[str]:
    return [m for m in SERVER_MODULES if importlib.util.find_spec(m) is None]


def available() -> bool:
    return not missing_modules()


def require() -> None:
    missing = missing_modules()
    if missing:
        raise UserError(f"--backend llama.cpp needs {', '.join(missing)}, not installed here: {INSTALL}; or "
                        "--backend transformers serves the run without llama.cpp")


def run_gguf(run_dir: Path) -> Path:
    """The run's GGUF: the newest ``*.gguf`` in the run directory, else an f16 one exported into it now."""
    found = sorted(run_dir.glob("*.gguf"), key=lambda p: p.stat().st_mtime)
    if found:
        log.info("qlorakit serve: using %s (exported earlier; delete it to export the run again)", found[-1])
        return found[-1]
    from ..export.merge import export_main

    out = run_dir / f"{run_dir.name}-f16.gguf"
    log.info("qlorakit serve: no GGUF in %s; exporting %s (f16) first", run_dir, out.name)
    export_main([str(run_dir), "--output", str(out), "--outtype", "f16"])
    return out


def create_app(gguf_file: Path, name: str, api_key: str | None, run_format: tuple | None = None, n_ctx: int = 2048):
    """llama-cpp-python's server app on ``gguf_file`` with a ``/health`` route added. Chats are fed training's own
    ids where ``run_format`` (the run's tokenizer and prompt format) is given (``llama_chat``), else rendered with
    the file's own chat template."""
    from llama_cpp.server.app import create_app as llama_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    from .llama_chat import register_handler

    chat_format = register_handler(*run_format) if run_format else "chat_template.default"
    model = ModelSettings(model=str(gguf_file), model_alias=name, chat_format=chat_format, n_ctx=n_ctx,
                          n_threads=os.cpu_count() or 1, verbose=False)
    app = llama_app(server_settings=ServerSettings(api_key=api_key), model_settings=[model])

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": name, "backend": "llama.cpp"}

    return app
