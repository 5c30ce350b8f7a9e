"""Safety: nothing in src/ unpickles arbitrary objects, and code shipped with a model runs only when asked, after a
warning that names it."""

from __future__ import annotations

import ast
import inspect
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

import qlorakit
from helpers import write_jsonl
from qlorakit.cli import main
from qlorakit.config import TrainConfig
from qlorakit.model import load

SRC = Path(qlorakit.__file__).parent


def test_every_torch_load_passes_weights_only_true():
    found = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in ("torch", "pickle", "dill", "joblib"):
                assert all(a.name not in ("load", "loads") for a in node.names), f"{path}:{node.lineno}"
            if isinstance(node, ast.Import):
                assert all(a.name not in ("pickle", "dill", "joblib") for a in node.names), f"{path}:{node.lineno}"
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "load" and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "torch"):
                continue
            where = f"{path.relative_to(SRC)}:{node.lineno}"
            kw = {k.arg: k.value for k in node.keywords}
            assert "weights_only" in kw and isinstance(kw["weights_only"], ast.Constant) \
                and kw["weights_only"].value is True, f"{where}: torch.load without weights_only=True"
            found.append(where)
    assert found  # the checkpoint loader is among them: the scan sees real calls


def test_trust_remote_code_defaults_off():
    assert TrainConfig().trust_remote_code is False
    for fn in (load.load_tokenizer, load.load_base_model):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False


@pytest.fixture()
def remote_code_model(tiny_llama, tmp_path) -> tuple[Path, Path]:
    """The tiny LLaMA, declared as a custom architecture whose module leaves a marker file when it is imported."""
    model, marker = tmp_path / "custom_model", tmp_path / "CODE_RAN"
    shutil.copytree(tiny_llama, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(model_type="custom_llama", architectures=["CustomModel"],
               auto_map={"AutoConfig": "custom_arch.CustomConfig", "AutoModelForCausalLM": "custom_arch.CustomModel"})
    (model / "config.json").write_text(json.dumps(cfg))
    (model / "custom_arch.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n\n\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'custom_llama'\n\n\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    return model, marker


def test_model_code_does_not_run_by_default(remote_code_model, tmp_path, capsys):
    model, marker = remote_code_model
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "response": "b"}])
    assert main(["train", "--model_name_or_path", str(model), "--dataset", str(data), "--output_dir",
                 str(tmp_path / "out"), "--bits", "16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs its own code; set --trust_remote_code true" in err, err
    assert not marker.exists()


def test_trust_remote_code_warns_naming_the_code_before_it_runs(remote_code_model, caplog):
    model, marker = remote_code_model
    with caplog.at_level(logging.WARNING, logger="qlorakit"):
        load.load_tokenizer(str(model), trust_remote_code=True)  # the tokenizer may bring code too
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(model) in warnings[0] and "custom_arch.py" in warnings[0], warnings
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qlorakit"):
        m = load.load_base_model(str(model), bits=16, bf16=False, trust_remote_code=True,
                                 device=torch.device("cpu"))
    assert type(m).__name__ == "CustomModel" and marker.exists()  # it did run, as asked
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]  # said once per model, not twice
