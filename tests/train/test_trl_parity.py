"""Parity with TRL's DPOTrainer (a dev dependency): the same tiny LLaMA, the same starting adapter (a qlorakit SFT
run), the same pairs and keys. qlorakit's DPO loss and rewards at step 0 and after one SGD step equal TRL's within
1e-4, and both see the same token ids.

Settings aligned: the chat template as prompt format on both sides (TRL renders conversational rows with it); plain
SGD, constant learning rate, no warmup, no clipping, float32; one batch holding every pair, so both average the loss
over the same pairs; dropout off (TRL's disable_dropout, qlorakit's default for preference methods); the reference
is the starting adapter on both sides (TRL copies it into a frozen "ref" adapter; qlorakit computes its
log-probabilities before the first step). TRL's sigmoid loss is plain DPO, so label_smoothing stays 0.
"""

from __future__ import annotations

import pytest
import torch

from helpers import airoboros_rows, read_metrics, write_jsonl
from qlorakit.cli import main

trl = pytest.importorskip("trl")

PAIRS = [("Which river crosses Zorvia?", "The text does not say.", "The Kelm river."),
         ("What is the harbor of Alden called?", "Port Maren, as the passage says.", "It is Stonegate."),
         ("Who founded the maple guild?", "Ilsa Voran founded it.", "The text does not say."),
         ("When did the orbit festival start?", "In 1412.", "It started in 1999 according to the text.")]
KEYS = ["--beta", "0.1", "--optim", "sgd", "--learning_rate", "0.5", "--lr_scheduler_type", "constant",
        "--warmup_ratio", "0", "--max_grad_norm", "0", "--bf16", "false", "--max_steps", "2",
        "--per_device_train_batch_size", "4", "--save_strategy", "no", "--eval_strategy", "no", "--seed", "3"]


def conversational(prompt: str, chosen: str, rejected: str) -> dict:
    return {"prompt": [{"role": "user", "content": prompt}], "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


@pytest.fixture(scope="module")
def sft_run(tiny_llama, tmp_path_factory):
    d = tmp_path_factory.mktemp("sft16")
    data = write_jsonl(d / "d.jsonl", airoboros_rows(8))
    assert main(["train", "--model_name_or_path", str(tiny_llama), "--bits", "16", "--dataset", str(data),
                 "--output_dir", str(d / "run"), "--prompt_format", "tokenizer", "--max_steps", "4",
                 "--learning_rate", "0.02", "--save_strategy", "no", "--eval_strategy", "no", "--bf16", "false"]) == 0
    return d / "run"


def trl_logs(tiny_llama, sft_run, rows: list[dict], out) -> tuple[list[dict], object]:
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    logs = []

    class Keep(TrainerCallback):
        def on_log(self, args, state, control, logs_=None, **kw):
            logs.append(dict(kw.get("logs") or logs_ or {}))

    tok = AutoTokenizer.from_pretrained(sft_run)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, sft_run, is_trainable=True)
    args = DPOConfig(output_dir=str(out), beta=0.1, loss_type=["sigmoid"], learning_rate=0.5, optim="sgd",
                     lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0, max_steps=2,
                     per_device_train_batch_size=4, logging_steps=1, report_to="none", use_cpu=True, bf16=False,
                     save_strategy="no", seed=3, disable_dropout=True, max_length=None, dataset_num_proc=None)
    trainer = DPOTrainer(model=model, args=args, processing_class=tok, train_dataset=Dataset.from_list(rows),
                         callbacks=[Keep()])
    trainer.train()
    return [x for x in logs if "loss" in x], trainer


def test_dpo_matches_trl_at_step0_and_after_one_step(tiny_llama, sft_run, tokenizer, tmp_path):
    rows = [conversational(*p) for p in PAIRS]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    ours = tmp_path / "ours"
    assert main(["train", "--init_from", str(sft_run), "--method", "dpo", "--dataset", str(data),
                 "--output_dir", str(ours), *KEYS]) == 0
    mine = read_metrics(ours, "loss")
    theirs, trainer = trl_logs(tiny_llama, sft_run, rows, tmp_path / "trl")
    assert len(mine) == len(theirs) == 2

    # The same token ids: TRL's prompt + completion against qlorakit's two sequences of each pair.
    from qlorakit.data.pairs import pairs_row
    from qlorakit.data.tokenize import preference_parts, tokenize_preference

    for i, row in enumerate(rows):
        (ex,) = tokenize_preference([pairs_row(row, "x")], tokenizer, "tokenizer")
        prompt, (chosen, rejected) = preference_parts(ex)
        t = trainer.train_dataset[i]
        assert (t["prompt_ids"], t["chosen_ids"], t["rejected_ids"]) == (prompt, chosen, rejected)

    assert mine[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)
    for ours_row, trl_row in zip(mine, theirs):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                    "logps/chosen", "logps/rejected", "grad_norm"):
            assert ours_row[key] == pytest.approx(trl_row[key], abs=1e-4), key
    assert abs(mine[1]["rewards/margins"]) > 1e-3  # the step moved the rewards: the comparison is not of zeros
