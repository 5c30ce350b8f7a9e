"""A hub id on a machine where the hub cannot be reached: one line, naming the id and what to do, for every command
that can take one; a cached copy is used without a word. "Unreachable" is a closed port on 127.0.0.1 that
HF_ENDPOINT points at (connection refused, as deterministic as no network, and no packet leaves the machine).

Without ``qlorakit.hub.use_hub`` the hub client retries each request five times with backoff and logs two lines per
try before the command's own error: those lines are what the one-line assertions catch."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from helpers import airoboros_rows, write_jsonl
from qlorakit.config import TrainConfig, save_config

MISSING = "someone/not-cached"
NO_NETWORK_TIMEOUT_S = 120  # only so a hung command fails the test; the retries alone would print 10+ lines


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed when the socket is: connecting to it is refused


def unreachable_hub_env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                                            "HF_DATASETS_OFFLINE") and "proxy" not in k.lower()}
    return {**env, "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}", "HF_HOME": str(tmp_path / "hf")}


def qlorakit(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qlorakit", *args], capture_output=True, text=True,
                          env=unreachable_hub_env(tmp_path), cwd=tmp_path, timeout=NO_NETWORK_TIMEOUT_S)


def fake_run_dir(tmp_path, tokenizer_dir, base: str):
    """What ``eval`` reads before it loads the base: the adapter's config (naming ``base``), the run's config and
    its tokenizer."""
    run = tmp_path / "run"
    shutil.copytree(tokenizer_dir, run)
    (run / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base, "peft_type": "LORA"}))
    save_config(TrainConfig(bf16="false"), run / "qlorakit_config.yaml")
    return run


def assert_one_line_naming(proc, repo_id: str):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"{repo_id} is not in the local Hugging Face cache" in lines[0], lines[0]
    assert "cannot be reached" in lines[0] and f"hf download {repo_id}" in lines[0], lines[0]


@pytest.mark.parametrize("command", ["train model", "train dataset", "data check", "plan", "eval"])
def test_a_missing_hub_id_without_network_is_one_line(command, tmp_path, tiny_llama, tokenizer_dir):
    data = write_jsonl(tmp_path / "d.jsonl", airoboros_rows(4))
    args = {"train model": ["train", "--model_name_or_path", MISSING, "--dataset", str(data),
                            "--output_dir", str(tmp_path / "out")],
            "train dataset": ["train", "--model_name_or_path", str(tiny_llama), "--dataset", MISSING,
                              "--output_dir", str(tmp_path / "out")],
            "data check": ["data", "check", MISSING, "--model_name_or_path", str(tiny_llama)],
            "plan": ["plan", MISSING],
            "eval": ["eval", str(fake_run_dir(tmp_path, tokenizer_dir, MISSING)), "--dataset", str(data)]}[command]
    proc = qlorakit(args, tmp_path)
    assert_one_line_naming(proc, MISSING)
    if command in ("train dataset", "data check"):
        assert "--repo-type dataset" in proc.stderr


def test_a_cached_hub_id_is_used_without_network_and_without_a_word(tmp_path, tiny_llama):
    """``plan`` of a hub id whose config.json is in the local cache: the plan, and nothing on stderr (the hub client,
    left to find out alone, would retry five times and log each try before falling back to the cache)."""
    repo = tmp_path / "hf" / "hub" / "models--someone--cached"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "snapshots" / commit).mkdir(parents=True)
    shutil.copy(tiny_llama / "config.json", repo / "snapshots" / commit / "config.json")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    proc = qlorakit(["plan", "someone/cached"], tmp_path)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert "someone/cached" in proc.stdout


def test_a_library_record_is_printed_once():
    """The hub client prints its records with its own handler: qlorakit's handler at the root prints qlorakit's
    records and the warnings of libraries that have none (prefixed with the library's name), never the hub client's
    a second time (logging.basicConfig with qlorakit's format, the twin, prints each of them twice)."""
    code = """if True:
        import logging, sys
        from qlorakit.console import log_to_stderr
        if sys.argv[1] == "twin":
            logging.basicConfig(level=logging.INFO, format="qlorakit: %(message)s")
        else:
            log_to_stderr(logging.INFO)
        from huggingface_hub.utils import logging as hub_logging
        hub_logging.get_logger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
        logging.getLogger("peft.tuners.lora").warning("a library without a handler")
        logging.getLogger("peft.tuners.lora").info("its info")
        logging.getLogger("qlorakit").info("ours")
    """
    err = {}
    for how in ("qlorakit", "twin"):
        proc = subprocess.run([sys.executable, "-c", code, how], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        err[how] = proc.stderr.splitlines()
    assert err["qlorakit"] == ["Retrying in 1s [Retry 1/5].", "peft: a library without a handler", "qlorakit: ours"]
    assert "qlorakit: Retrying in 1s [Retry 1/5]." in err["twin"]  # the double print the handler avoids


def test_reachable_is_one_connect_to_the_endpoint():
    from qlorakit.hub import reachable

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(1)
        assert reachable(f"http://127.0.0.1:{listening.getsockname()[1]}")
    assert not reachable(f"http://127.0.0.1:{closed_port()}")
