"""Two command lines as their authors wrote them, through ``qlorakit train``: the fork's llama-2-70b airoboros example
(jondurbin/qlora's README; $BASE_DIR/conversations.json is a JSON array of its conversations) and qlora's
scripts/finetune_guanaco_7b.sh. Only the model (and guanaco's hub dataset) are swapped for the tests' tiny model and
local files, and a step cap is added at the end; each honoured flag is checked for its effect."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import pytest
import torch

from helpers import airoboros_rows, read_metrics, write_jsonl
from qlorakit.cli import main

FORK_70B = """--model_name_or_path $BASE_DIR/llama-2-70b-hf --working_dir $BASE_DIR/$WANDB_PROJECT-checkpoints
--output_dir $BASE_DIR/$WANDB_PROJECT-peft --merged_output_dir $BASE_DIR/$WANDB_PROJECT --num_train_epochs 5
--logging_steps 1 --save_strategy steps --save_steps 75 --save_total_limit 3 --data_seed 11422
--evaluation_strategy steps --per_device_eval_batch_size 2 --eval_dataset_size 0.01 --eval_steps 75
--max_new_tokens 4096 --dataloader_num_workers 3 --logging_strategy steps --do_train --lora_r 64 --lora_alpha 16
--lora_modules all --bf16 --bits 4 --double_quant --quant_type nf4 --lr_scheduler_type constant
--dataset $BASE_DIR/conversations.json --dataset_format airoboros_chat --model_max_len 4096
--per_device_train_batch_size 2 --learning_rate 0.00008 --adam_beta2 0.999 --max_grad_norm 0.3 --lora_dropout 0.0
--weight_decay 0.0 --seed 11422 --report_to wandb --gradient_checkpointing --use_flash_attention_2
--ddp_find_unused_parameters False"""

GUANACO_7B = """--model_name_or_path huggyllama/llama-7b --output_dir ./output/guanaco-7b --logging_steps 10
--save_strategy steps --data_seed 42 --save_steps 500 --save_total_limit 40 --evaluation_strategy steps
--eval_dataset_size 1024 --max_eval_samples 1000 --per_device_eval_batch_size 1 --max_new_tokens 32
--dataloader_num_workers 3 --group_by_length --logging_strategy steps --remove_unused_columns False --do_train
--do_eval --do_mmlu_eval --lora_r 64 --lora_alpha 16 --lora_modules all --double_quant --quant_type nf4 --bf16
--bits 4 --warmup_ratio 0.03 --lr_scheduler_type constant --gradient_checkpointing --dataset oasst1
--source_max_len 16 --target_max_len 512 --per_device_train_batch_size 1 --gradient_accumulation_steps 16
--max_steps 1875 --eval_steps 187 --learning_rate 0.0002 --adam_beta2 0.999 --max_grad_norm 0.3 --lora_dropout 0.1
--weight_decay 0.0 --seed 0"""


def command(text: str, swap: dict[str, str], cap: int) -> list[str]:
    """The command's arguments, with the values in ``swap`` replaced, and ``--max_steps cap`` added."""
    argv = text.split()
    for flag, value in swap.items():
        argv[argv.index(flag) + 1] = value
    return [*argv, "--max_steps", str(cap)]


def sharegpt_rows(n: int) -> list[dict]:
    """The fork's airoboros 3.0 conversations: ShareGPT turns, some with a system turn, some multi-turn."""
    rows = []
    for i, r in enumerate(airoboros_rows(n)):
        turns = [{"from": "human", "value": r["instruction"]}, {"from": "gpt", "value": r["response"]}]
        if i % 3 == 0:
            turns = [{"from": "system", "value": "You are a terse assistant."}, *turns,
                     {"from": "human", "value": "Once more?"}, {"from": "gpt", "value": "Once more."}]
        rows.append({"id": str(i), "category": "general", "conversations": turns})
    return rows


@contextlib.contextmanager
def recorded():
    """The run's stderr and its log lines."""
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("qlorakit")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            yield err, lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


@pytest.fixture(scope="module")
def fork_run(tiny_llama, tmp_path_factory):
    base = tmp_path_factory.mktemp("workspace")
    project = "airoboros-l2-70b-3.0"
    (base / "conversations.json").write_text(json.dumps(sharegpt_rows(100)))  # a JSON array, as the fork reads it
    argv = command(FORK_70B.replace("$BASE_DIR", str(base)).replace("$WANDB_PROJECT", project),
                   {"--model_name_or_path": str(tiny_llama)}, cap=75)
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_PROJECT", project)
    try:
        with recorded() as (err, log):
            assert main(["train", *argv]) == 0
    finally:
        mp.undo()
    return {"peft": base / f"{project}-peft", "work": base / f"{project}-checkpoints", "merged": base / project,
            "stderr": err.getvalue(), "log": log}


def test_fork_command_warns_once_for_each_name_without_effect(fork_run):
    warned = [x for x in fork_run["stderr"].splitlines() if x.startswith("qlorakit train: warning: ")]
    assert [x.split()[3] for x in warned] == ["--max_new_tokens:", "--dataloader_num_workers:", "--do_train:",
                                              "--ddp_find_unused_parameters:"]


def test_fork_command_checkpoints_go_to_working_dir(fork_run):
    assert [p.name for p in fork_run["work"].glob("checkpoint-*")] == ["checkpoint-75"]
    assert not list(fork_run["peft"].glob("checkpoint-*"))
    assert (fork_run["peft"] / "adapter_model.safetensors").is_file() and (fork_run["peft"] / "README.md").is_file()


def test_fork_command_adam_beta2_is_the_optimizers(fork_run):
    state = torch.load(fork_run["work"] / "checkpoint-75" / "optimizer.pt", weights_only=False)
    assert state["param_groups"][0]["betas"] == (0.9, 0.999)


def test_fork_command_merges_into_merged_output_dir(fork_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = fork_run["merged"]
    model = AutoModelForCausalLM.from_pretrained(merged)  # a plain transformers model, no peft
    assert not any("lora" in name for name, _ in model.named_parameters())
    tok = AutoTokenizer.from_pretrained(merged)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi?"}], tokenize=False, add_generation_prompt=True)
    assert prompt == ("[INST] <<SYS>>\nYou are an unbiased, uncensored, helpful assistant.\n<</SYS>>\n\nHi? "
                      "[/INST] ")  # airoboros_chat: the Llama 2 chat prompt


def test_fork_command_reads_airoboros_chat_and_its_seeds(fork_run):
    cfg = (fork_run["peft"] / "qlorakit_config.yaml").read_text()
    assert "dataset_format: messages" in cfg and "prompt_format: llama2" in cfg and "data_seed: 11422" in cfg
    assert "eval: 1 of 100 rows held out (seed 11422)" in fork_run["log"]  # eval_dataset_size 0.01, data_seed
    assert "attn_implementation flash_attention_2 needs a CUDA GPU; this run is on cpu, so it uses sdpa " \
           "(PyTorch's fused attention)" in fork_run["log"]
    assert "gradient checkpointing: on (asked for)" in fork_run["log"] and "compute dtype: bfloat16 (bf16 true)" \
        in fork_run["log"]


def test_fork_command_logs_every_step_and_evaluates_at_eval_steps(fork_run):
    assert [r["step"] for r in read_metrics(fork_run["peft"], "loss")] == list(range(1, 76))
    assert [r["step"] for r in read_metrics(fork_run["peft"], "eval_loss")] == [75]


def test_fork_command_reports_to_wandb_offline(fork_run):
    (run,) = (fork_run["peft"] / "wandb").glob("offline-run-*")
    (records,) = run.glob("run-*.wandb")
    data = records.read_bytes()  # wandb's record log: the history rows, the config and the summary
    assert all(key in data for key in (b"learning_rate", b"eval_loss", b"merged_output_dir", b"model_card",
                                       b"airoboros-l2-70b-3.0"))


@pytest.fixture(scope="module")
def guanaco_run(tiny_llama, tmp_path_factory):
    """Run where qlora's checkout would be: data/mmlu/ holds the five-shot MMLU validation file --do_mmlu_eval
    reads (here ten questions of our own, in its layout)."""
    here = tmp_path_factory.mktemp("qlora-checkout")
    data = write_jsonl(here / "oasst1.jsonl", airoboros_rows(1100))
    (here / "data" / "mmlu").mkdir(parents=True)
    mmlu = [{"subject": ["algebra", "anatomy"][i % 2], "output": "ABCD"[i % 4],
             "input": f"The following are multiple choice questions.\n\n{i} + 1 =\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:"}
            for i in range(10)]
    (here / "data" / "mmlu" / "five_shot_mmlu_val.json").write_text(json.dumps(mmlu))
    argv = command(GUANACO_7B, {"--model_name_or_path": str(tiny_llama), "--dataset": str(data)}, cap=3)
    mp = pytest.MonkeyPatch()
    mp.chdir(here)
    try:
        with recorded() as (err, log):
            assert main(["train", *argv]) == 0
    finally:
        mp.undo()
    return {"out": here / "output" / "guanaco-7b", "stderr": err.getvalue(), "log": log}


def test_guanaco_command_warns_once_for_each_name_without_effect(guanaco_run):
    warned = [x for x in guanaco_run["stderr"].splitlines() if x.startswith("qlorakit train: warning: ")]
    assert [x.split()[3] for x in warned] == ["--max_new_tokens:", "--dataloader_num_workers:",
                                              "--remove_unused_columns:", "--do_train:", "--do_eval:"]


def test_guanaco_command_cuts_prompts_and_caps_the_eval_split(guanaco_run):
    log = guanaco_run["log"]
    assert "eval: 1024 of 1100 rows held out (seed 42)" in log  # data_seed 42, where --seed is 0
    assert "train: 76 examples kept" in log and any(x.startswith("train: 76 truncated") for x in log)  # to 16
    assert "eval: the first 1000 of 1024 examples (max_eval_samples)" in log
    (row,) = read_metrics(guanaco_run["out"], "eval_loss")
    assert row["step"] == 3 and row["mmlu_eval_accuracy"] == pytest.approx(
        (row["mmlu_eval_accuracy_algebra"] + row["mmlu_eval_accuracy_anatomy"]) / 2)


def test_guanaco_command_bare_flags_are_true(guanaco_run):
    cfg = (Path(guanaco_run["out"]) / "qlorakit_config.yaml").read_text()
    for line in ("group_by_length: true", "do_mmlu_eval: true", "double_quant: true", "bf16: 'true'",
                 "gradient_checkpointing: 'true'", "source_max_len: 16", "target_max_len: 512"):
        assert line in cfg, line
