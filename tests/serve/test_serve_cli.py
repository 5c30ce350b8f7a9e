"""``qlorakit serve RUN_DIR`` end to end: the command in a subprocess, its one log line naming the backend and the
URL, answered with the openai client, stopped with Ctrl-C (SIGINT)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import openai

from qlorakit.serve.command import free_port


def test_serve_command_logs_backend_and_url_and_answers(run_dir):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "qlorakit", "serve", str(run_dir), "--backend", "transformers",
                             "--port", str(port), "--max_tokens", "4"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline, ready = time.monotonic() + 300, False  # bounded: imports and loading, on a busy machine
        while not ready and time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                time.sleep(0.5)
        if not ready:
            proc.kill()
            raise AssertionError(f"the server did not come up: {proc.communicate()[1][-2000:]}")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        reply = client.chat.completions.create(model=run_dir.name, messages=[{"role": "user", "content": "Hi"}])
        assert reply.usage.completion_tokens <= 4  # --max_tokens is the default length
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert f"qlorakit serve: transformers backend, model {run_dir.name!r} at http://127.0.0.1:{port}/v1" in err
    assert "Traceback" not in err
