"""Bad input through the CLI ends in one line on stderr and exit status 2, never a traceback; awkward but valid
input (a tokenizer without a pad token, a row whose response is cut away) trains."""

from __future__ import annotations

import json
import logging
import math
import shutil

import pytest

from helpers import write_jsonl
from qlorakit.cli import main

GOOD = '{"instruction": "Say yes.", "response": "Yes."}'

# name: (file content, or None for no file; what the one line must say)
BAD_FILES = {
    "invalid_json": (GOOD + '\n{"instruction": "a", "response": }', [":2:", "invalid JSON"]),
    "missing_field": (GOOD + '\n{"instruction": "a"}', [":2:", "missing field 'response'"]),
    "misnamed_field": (GOOD + '\n{"instruction": "a", "respons": "b"}', [":2:", "'response'", "respons"]),
    "unknown_layout": ('{"question": "a", "answer": "b"}', [":1:", "cannot tell the row layout", "question"]),
    "wrong_type": (GOOD + '\n{"instruction": "a", "response": ["b"]}', [":2:", "must be a string, got list"]),
    "not_utf8": ((GOOD + '\n{"instruction": "caf\xe9", "response": "b"}').encode("latin-1"),
                 [":2:", "not UTF-8", "UTF-8"]),
    "blank_response": (GOOD + '\n{"instruction": "a", "response": "   "}', [":2:", "'response' is blank"]),
    "not_an_object": (GOOD + "\n[1, 2]", [":2:", "expected a JSON object, got list"]),
    "empty_file": ("", ["has no rows"]),
    "only_blank_lines": ("\n  \n\n", ["has no rows"]),
    "no_assistant_reply": ('{"messages": [{"role": "user", "content": "hi"}]}', [":1:", "last message"]),
    "nonexistent": (None, ["no such file"]),
}


def make(tmp_path, name):
    content, want = BAD_FILES[name]
    p = tmp_path / f"{name}.jsonl"
    if isinstance(content, bytes):
        p.write_bytes(content)
    elif content is not None:
        p.write_text(content + ("\n" if content else ""), encoding="utf-8")
    return p, want


def one_line_error(capsys, command: str) -> str:
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err and cap.out == ""
    assert cap.err.count("\n") == 1 and cap.err.startswith(f"qlorakit {command}: error: "), cap.err
    return cap.err


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_training_file(name, tmp_path, capsys):
    p, want = make(tmp_path, name)
    assert main(["train", "--dataset", str(p), "--output_dir", str(tmp_path / "out")]) == 2
    err = one_line_error(capsys, "train")
    assert p.name in err and all(w in err for w in want), err


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_file_in_data_check(name, tmp_path, capsys):
    p, want = make(tmp_path, name)
    assert main(["data", "check", str(p)]) == 2
    err = one_line_error(capsys, "data")
    assert p.name in err and all(w in err for w in want), err


def test_bad_eval_file(tmp_path, capsys):
    train = write_jsonl(tmp_path / "t.jsonl", [GOOD])
    p, want = make(tmp_path, "blank_response")
    assert main(["train", "--dataset", str(train), "--eval_dataset", str(p)]) == 2
    err = one_line_error(capsys, "train")
    assert p.name in err and all(w in err for w in want)


def test_folder_without_data_files_as_dataset(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not data")
    assert main(["train", "--dataset", str(tmp_path), "--output_dir", str(tmp_path / "out")]) == 2
    assert f"{tmp_path}: the folder holds no data files" in one_line_error(capsys, "train")


BAD_CONFIG = [
    (["--learning_rate", "abc"], ["learning_rate", "'abc'", "not a number"]),
    (["--max_steps", "1.5"], ["max_steps", "not an integer"]),
    (["--per_device_train_batch_size", "0"], ["per_device_train_batch_size", "at least 1"]),
    (["--lora_dropout", "1"], ["lora_dropout", "[0, 1)"]),
    (["--warmup_ratio", "-0.1"], ["warmup_ratio"]),
    (["--bits", "3"], ["bits", "not one of 4, 8, 16"]),
    (["--eval_strategy", "sometimes"], ["eval_strategy", "sometimes"]),
    (["--bf16", "maybe"], ["bf16", "maybe"]),
    (["--packing", "yes"], ["packing", "true or false"]),
    (["--lerning_rate", "1e-4"], ["lerning_rate", "did you mean 'learning_rate'"]),
    (["--max_steps"], ["--max_steps: expected one argument"]),
    (["--learning-rate", "abc"], ["learning_rate", "'abc'", "not a number"]),  # --some-key is --some_key
    (["--learning", "1e-4"], ["unknown key 'learning'"]),  # no abbreviations
    (["--lerning_rate", "1e-4", "--bits", "3", "a.yaml", "b.yaml"],  # every problem at once
     ["lerning_rate", "bits", "a.yaml does not exist", "unexpected argument 'b.yaml'"]),
    (["--eval_strategy", "no", "--load_best_model_at_end", "true"], ["load_best_model_at_end", "needs evaluation"]),
    (["--eval_dataset_size", "2.5"], ["eval_dataset_size", "whole"]),
    (["--max_nonfinite_steps", "0"], ["max_nonfinite_steps"]),
    (["--nproc", "two"], ["--nproc", "whole number"]),
    (["no_such_config.yaml"], ["no_such_config.yaml", "does not exist"]),
]


@pytest.mark.parametrize("args,want", BAD_CONFIG, ids=[" ".join(a) for a, _ in BAD_CONFIG])
def test_bad_config_value(args, want, tmp_path, capsys):
    data = write_jsonl(tmp_path / "t.jsonl", [GOOD])
    assert main(["train", "--dataset", str(data), "--output_dir", str(tmp_path / "out"), *args]) == 2
    err = one_line_error(capsys, "train")
    assert all(w in err for w in want), err


@pytest.mark.parametrize("args,want", [
    (["--model_name_or_path", "/no/such/model"], ["model_name_or_path", "/no/such/model", "does not exist"]),
    (["--model_name_or_path", "{tmp}"], ["model_name_or_path", "no config.json"]),
    (["--resume_from_checkpoint", "latest"], ["resume_from_checkpoint", "no checkpoint in"]),
    (["--resume_from_checkpoint", "{tmp}"], ["resume_from_checkpoint", "not a checkpoint folder"]),
])
def test_bad_model_or_checkpoint_path(args, want, tmp_path, capsys):
    data = write_jsonl(tmp_path / "t.jsonl", [GOOD])
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main(["train", "--dataset", str(data), "--output_dir", str(tmp_path / "out"), *args]) == 2
    err = one_line_error(capsys, "train")
    assert all(w in err for w in want), err


@pytest.mark.parametrize("argv,want", [
    (["data"], "usage: qlorakit data check [FILE] [CONFIG.yaml]"),
    (["data", "check"], "usage: qlorakit data check [FILE] [CONFIG.yaml]"),
    (["data", "check", "a.jsonl", "b.jsonl"], "unexpected argument 'b.jsonl'"),
    (["data", "check", "x.jsonl", "--model_max_len", "0"], "model_max_len: must be at least 1"),
    (["data", "check", "x.jsonl", "--prompt_format", "llama9"], "prompt_format"),
])
def test_bad_data_check_arguments(argv, want, capsys):
    assert main(argv) == 2
    assert want in one_line_error(capsys, "data")


def test_no_training_example_left(tiny_llama, tmp_path, capsys):
    data = write_jsonl(tmp_path / "t.jsonl", [{"instruction": "word " * 100, "response": "ok"}])
    assert main(["train", "--model_name_or_path", str(tiny_llama), "--dataset", str(data), "--output_dir",
                 str(tmp_path / "out"), "--model_max_len", "32"]) == 2
    assert "no training example left after applying model_max_len" in one_line_error(capsys, "train")


def test_tokenizer_without_pad_and_a_fully_masked_row_train(tiny_llama, tmp_path, caplog):
    """A tokenizer with no pad token trains padded batches; a row whose response is cut away by model_max_len
    (truncate) is dropped and counted, never a NaN loss."""
    from transformers import AutoTokenizer

    model = tmp_path / "nopad"
    shutil.copytree(tiny_llama, model)
    cfg_path = model / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text())
    tok_cfg.pop("pad_token", None)
    cfg_path.write_text(json.dumps(tok_cfg))
    assert AutoTokenizer.from_pretrained(model).pad_token is None  # the premise

    rows = [{"instruction": "Say yes.", "response": "Yes, indeed it is so."},
            {"instruction": "Describe " + "the long river " * 40, "response": "It is long."},
            {"instruction": "Say no.", "response": "No."}]
    data = write_jsonl(tmp_path / "t.jsonl", rows)
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="qlorakit"):
        assert main(["train", "--model_name_or_path", str(model), "--dataset", str(data), "--output_dir", str(out),
                     "--model_max_len", "64", "--truncation", "truncate", "--packing", "false",
                     "--per_device_train_batch_size", "2", "--max_steps", "2", "--save_strategy", "no",
                     "--eval_dataset_size", "0", "--learning_rate", "0.01"]) == 0
    assert "train: 2 examples kept" in caplog.text
    assert f"train: 1 dropped: no trained token left (prompt fills model_max_len) (e.g. {data}:2)" in caplog.text
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)


@pytest.mark.parametrize("argv,want", [
    (["merge"], ["required: RUN_DIR", "usage: qlorakit merge RUN_DIR"]),
    (["merge", "run", "--outptu", "m"], ["unknown option --outptu (did you mean --output?)", "usage: qlorakit merge"]),
    (["merge", "run", "--out", "m"], ["unknown option --out (did you mean --output?)"]),  # no abbreviations
    (["merge", "run", "--output", "m", "--base", "fp8"], ["--base: invalid choice: 'fp8'"]),
    (["export", "run", "--format"], ["--format: expected one argument", "usage: qlorakit export"]),
    (["export", "run", "gguf", "--output", "m.gguf"], ["unexpected argument 'gguf'", "usage: qlorakit export"]),
    (["eval", "run", "--mmlu", "m.jsonl", "--bogus", "1"], ["unknown option --bogus", "usage: qlorakit eval"]),
    (["chat", "--temperature", "0.7"], ["usage: qlorakit chat RUN_DIR"]),
    (["chat", "run", "--max_new_tokens", "lots"],
     ["--max_new_tokens: expects a whole number of at least 1, got 'lots'"]),
    (["generate", "run", "--top-p", "high"], ["--top_p: 'high' is not a number"]),
    (["generate", "run", "--top_p", "0"], ["--top_p: must be above 0, got '0'"]),
    (["generate", "run", "--top_p", "nan"], ["--top_p: must be above 0, got 'nan'"]),
    (["chat", "run", "--temperature", "-0.5"], ["--temperature: must be 0 or more, got '-0.5'"]),
    (["chat", "run", "--top_k", "2.5"], ["--top_k: '2.5' is not an integer"]),
    (["chat", "run", "--top_k", "-1"], ["--top_k: must be 0 or more, got '-1'"]),
    (["generate", "run", "--input", "a.jsonl", "--stream", "yes"], ["unknown option --stream", "--batch_size"]),
    (["generate", "run", "--input", "a.jsonl", "--output", "b.jsonl", "--batch_size", "0"],
     ["--batch_size: expects a whole number of at least 1, got '0'"]),
    (["eval", "run"], ["give --tasks T1,T2 (lm-eval), or --dataset FILE and/or --mmlu FILE"]),
    (["compare", "a", "b", "--examples", "x"], ["--examples", "'x'"]),
])
def test_bad_run_command_arguments(argv, want, capsys):
    """merge, export, eval, chat and generate parse with the one parser; each mistake is one line."""
    assert main(argv) == 2
    err = one_line_error(capsys, argv[0])
    assert all(w in err for w in want), err


COMMANDS = ["train", "data", "merge", "export", "chat", "generate", "eval", "compare", "plan", "serve"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_describes_every_option(command, capsys):
    """``qlorakit CMD --help`` exits 0 and gives each option a description; no model is loaded for it."""
    from qlorakit import cli

    assert main([command, "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert out.startswith(f"usage: qlorakit {command}")
    parser = {"train": cli.train_parser, "data": cli.data_parser}.get(command)
    if parser is None:
        import importlib

        c = cli.COMMANDS[command]
        parser = getattr(importlib.import_module(c.module), c.function.replace("_main", "_parser"))
    for action in parser()._actions:
        assert action.help, action.option_strings or action.dest
        assert " ".join(action.help.split()) in out
        for option in action.option_strings:
            assert option in out


def test_train_help_lists_every_config_key_with_its_default(capsys):
    from qlorakit.config import FIELDS, default_of

    assert main(["train", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for name, f in FIELDS.items():
        value = default_of(f)  # a list key's default is made by a factory
        default = str(value).lower() if isinstance(value, bool) else repr(value) if isinstance(value, str) \
            else str(value)
        assert f"--{name} " in out and f"{' '.join(f.metadata['help'].split())} Default: {default}." in out, name
    assert "--nproc N" in out and "CONFIG.yaml" in out


def test_top_level_usage_and_unknown_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {c} " in out for c in COMMANDS)
    assert main(["tran"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown command 'tran'" in err and "did you mean 'train'?" in err
