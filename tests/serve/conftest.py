"""The run of conftest's ``run_dir`` loaded once for the serve tests, and a live server on it."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def loaded_run(run_dir):
    from qlorakit.runs import load_run

    return load_run(run_dir)


@pytest.fixture(scope="module")
def live(loaded_run):
    """(base URL, engine) of a transformers-backend server on 127.0.0.1 that wants the key 'test-key'."""
    from qlorakit.serve.app import create_app
    from qlorakit.serve.command import BackgroundServer
    from qlorakit.serve.engine import Engine

    model, tokenizer, cfg = loaded_run
    engine = Engine(model, tokenizer, cfg.prompt_format, "tiny-run", max_tokens=16)
    with BackgroundServer(create_app(engine, api_key="test-key")) as url:
        yield url, engine
