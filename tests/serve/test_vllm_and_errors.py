"""The vLLM command and its refusals (no vLLM here), and the command's one-line errors: a busy port, a backend that
is not installed."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest

from qlorakit.cli import main
from qlorakit.serve import vllm
from qlorakit.serve.command import free_port


def adapter(run_dir: Path) -> dict:
    return json.loads((run_dir / "adapter_config.json").read_text())


def test_vllm_command_carries_the_adapter_rank_quantization_and_template(run_dir):
    cfg = adapter(run_dir)
    cmd = vllm.vllm_command(run_dir, {**cfg, "r": 12}, 4, "mine", "0.0.0.0", 8001, "k", Path("t.jinja"))
    assert cmd[:3] == ["vllm", "serve", cfg["base_model_name_or_path"]]
    joined = " ".join(cmd)
    assert "--enable-lora" in cmd and f"--lora-modules mine={run_dir}" in joined
    assert "--max-lora-rank 16" in joined  # 12 rounded up to a rank vLLM accepts
    assert "--quantization bitsandbytes" in joined and "--chat-template t.jinja" in joined
    assert "--api-key k" in joined and "--port 8001" in joined
    assert "--quantization" not in vllm.vllm_command(run_dir, cfg, 16, "m", "h", 1, None, None)


def test_vllm_refuses_dora_and_modules_to_save_in_one_line(run_dir, tmp_path, capsys):
    for key, value, words in (("use_dora", True, "DoRA"), ("modules_to_save", ["lm_head"], "modules_to_save")):
        bad = tmp_path / key
        shutil.copytree(run_dir, bad)
        (bad / "adapter_config.json").write_text(json.dumps({**adapter(run_dir), key: value}))
        assert main(["serve", str(bad), "--backend", "vllm", "--port", str(free_port())]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err and "Traceback" not in err


def test_vllm_without_cuda_or_vllm_says_how_to_install(run_dir, capsys):
    assert vllm.refusals(adapter(run_dir)) == []
    assert main(["serve", str(run_dir), "--backend", "vllm", "--port", str(free_port())]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install vllm" in err


def test_busy_port_is_one_line_before_the_model_loads(run_dir, capsys, monkeypatch):
    from qlorakit.serve import command

    monkeypatch.setattr(command, "build_app", lambda *a: pytest.fail("loaded the model before checking the port"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", str(run_dir), "--port", str(port), "--backend", "transformers"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"qlorakit serve: error: port {port} on 127.0.0.1 is in use; pass --port N"


def test_a_backend_not_installed_is_one_line(run_dir, capsys, monkeypatch):
    from qlorakit.serve import llama

    monkeypatch.setattr(llama, "SERVER_MODULES", (*llama.SERVER_MODULES, "no_such_module_xyz"))
    assert main(["serve", str(run_dir), "--backend", "llama.cpp", "--port", str(free_port())]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no_such_module_xyz" in err and "pip install" in err
    assert main(["serve", str(run_dir / "nothing.gguf")]) == 2
    assert "no such run directory or GGUF file" in capsys.readouterr().err
