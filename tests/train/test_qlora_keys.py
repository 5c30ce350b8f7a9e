"""The keys of qlora, its fork and the Trainer take effect in the run: the data seed, the samples caps, qlora's cut,
the Adam settings, the logging strategy, working_dir, the attention kernel and MMLU."""

from __future__ import annotations

import json
import logging

import pytest

from helpers import airoboros_rows, read_metrics, train_with, write_jsonl
from qlorakit.data.tokenize import IGNORE


@pytest.fixture()
def args(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", airoboros_rows(16))
    return ["--model_name_or_path", str(tiny_llama), "--dataset", str(data), "--output_dir", str(tmp_path / "run"),
            "--save_strategy", "no", "--bf16", "false", "--max_steps", "1"]


def set_up(argv):
    from qlorakit.config import build_config
    from qlorakit.train.setup import setup

    return setup(build_config(argv), progress=False)


def test_data_seed_draws_the_split_and_the_order_and_seed_does_not(args):
    split = ["--eval_dataset_size", "4"]
    runs = {key: set_up([*args, *split, *key]) for key in
            [("--data_seed", "1"), ("--data_seed", "2"), ("--data_seed", "1", "--seed", "7"), ("--seed", "1")]}
    held = {key: sorted(e.source for e in run.eval_ex) for key, run in runs.items()}
    order = {key: run.epoch_steps(0)[0].examples for key, run in runs.items()}
    a, b, same, plain = runs
    assert held[a] != held[b] and order[a] != order[b]  # data_seed changes the split and the order
    assert held[a] == held[same] and order[a] == order[same]  # seed does not, where data_seed is given
    assert held[a] == held[plain]  # without data_seed, seed draws them: the run as before


def test_samples_caps_take_the_first_examples(args, caplog):
    with caplog.at_level(logging.INFO, logger="qlorakit"):
        run = set_up([*args, "--eval_dataset_size", "6", "--max_train_samples", "5", "--max_eval_samples", "2"])
    whole = set_up([*args, "--eval_dataset_size", "6"])
    assert list(run.train_ex) == list(whole.train_ex)[:5] and list(run.eval_ex) == list(whole.eval_ex)[:2]
    assert "train: the first 5 of 10 examples (max_train_samples)" in caplog.text


def test_source_and_target_max_len_cut_the_trained_examples(args, tokenizer):
    run = set_up([*args, "--source_max_len", "12", "--target_max_len", "5"])
    whole = set_up(args)
    for cut, full in zip(run.train_ex, whole.train_ex):
        prompt = [i for i, t in enumerate(full.labels) if t == IGNORE]
        reply = [i for i, t in enumerate(full.labels) if t != IGNORE]
        assert prompt == list(range(len(prompt))) and len(prompt) > 12  # one prompt, then one reply
        keep = prompt[:12] + reply[:5]  # qlora: the prompt's first 12 tokens, the reply's first 5
        assert cut.input_ids == [full.input_ids[i] for i in keep]
        assert cut.labels == [IGNORE] * 12 + [full.labels[i] for i in reply[:5]]


def test_adam_settings_reach_the_optimizer(args):
    run = set_up([*args, "--adam_beta1", "0.8", "--adam_beta2", "0.95", "--adam_epsilon", "1e-6"])
    group = run.optimizer.param_groups[0]
    assert group["betas"] == (0.8, 0.95) and group["eps"] == 1e-6
    assert set_up(args).optimizer.param_groups[0]["betas"] == (0.9, 0.999)  # the defaults: AdamW's


def test_logging_strategy_epoch_logs_at_epoch_ends(args):
    run_dir = args[args.index("--output_dir") + 1]
    train_with([*args, "--max_steps", "-1", "--num_train_epochs", "2", "--per_device_train_batch_size", "4",
                "--logging_strategy", "epoch", "--eval_strategy", "no"], progress=False)
    assert [r["step"] for r in read_metrics(run_dir, "loss")] == [4, 8]  # 16 rows, 4 per step: 4 steps an epoch


def test_checkpoints_go_to_working_dir_and_resume_finds_them(args, tmp_path):
    work = tmp_path / "work"
    first = [*args, "--working_dir", str(work), "--save_strategy", "steps", "--save_steps", "1",
             "--eval_strategy", "no", "--max_steps", "2"]
    train_with(first, progress=False)
    run_dir = tmp_path / "run"
    assert sorted(p.name for p in work.iterdir()) == ["checkpoint-1", "checkpoint-2"]
    assert not list(run_dir.glob("checkpoint-*")) and (run_dir / "adapter_model.safetensors").is_file()
    result = train_with([*first[:-1], "3", "--resume_from_checkpoint", "latest"], progress=False)
    assert result.steps == 3 and (work / "checkpoint-3").is_dir()


def test_attention_kernel(args, caplog):
    run = set_up([*args, "--attn_implementation", "eager"])
    assert run.model.get_base_model().config._attn_implementation == "eager"
    with caplog.at_level(logging.WARNING, logger="qlorakit"):
        run = set_up([*args, "--use_flash_attention_2", "--packing", "false"])
    assert run.model.get_base_model().config._attn_implementation == "sdpa"
    assert "attn_implementation flash_attention_2 needs a CUDA GPU; this run is on cpu, so it uses sdpa" in caplog.text


def mmlu_rows(n: int) -> list[dict]:
    return [{"subject": ["algebra", "anatomy"][i % 2], "output": "ABCD"[i % 4],
             "input": f"The following are multiple choice questions.\n\nWhat is {i}?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:"}
            for i in range(n)]


def test_mmlu_is_scored_at_each_evaluation(args, tmp_path):
    from qlorakit.train.mmlu import LETTERS, load_mmlu, mmlu_scores

    path = write_jsonl(tmp_path / "mmlu.jsonl", mmlu_rows(6))
    run_dir = args[args.index("--output_dir") + 1]
    train_with([*args, "--max_steps", "2", "--eval_dataset_size", "2", "--eval_strategy", "steps", "--eval_steps",
                "1", "--do_mmlu_eval", "--mmlu_dataset", str(path), "--max_mmlu_samples", "4"], progress=False)
    rows = read_metrics(run_dir, "mmlu_eval_accuracy")
    assert [r["step"] for r in rows] == [1, 2] and all("eval_loss" in r for r in rows)
    card = (tmp_path / "run" / "README.md").read_text()
    assert f"MMLU (eval split) accuracy, qlora's scoring: {rows[0]['mmlu_eval_accuracy']:.4f} at step 1, " in card
    assert set(rows[0]) >= {"mmlu_loss", "mmlu_eval_accuracy_algebra", "mmlu_eval_accuracy_anatomy"}
    # the score: the largest of the A-D logits at the prompt's last token, per subject, then their mean
    run = set_up([*args, "--do_mmlu_eval", "--mmlu_dataset", str(path), "--max_mmlu_samples", "4"])
    mmlu = load_mmlu(run.cfg, run.tokenizer)
    assert len(mmlu.prompts) == 4 and [LETTERS[a] for a in mmlu.answers] == ["A", "B", "C", "D"]
    got = mmlu_scores(run.model, mmlu, batch_size=3, pad_id=run.pad_id, device=run.device, use_bf16=False)
    one_by_one = mmlu_scores(run.model, mmlu, batch_size=1, pad_id=run.pad_id, device=run.device, use_bf16=False)
    assert got == pytest.approx(one_by_one)  # right padding does not change a prompt's last logits
    assert got["mmlu_eval_accuracy"] == (got["mmlu_eval_accuracy_algebra"] + got["mmlu_eval_accuracy_anatomy"]) / 2


def test_qloras_mmlu_names_read_its_data_folder(args, tmp_path, monkeypatch, capsys):
    from qlorakit.cli import main

    monkeypatch.chdir(tmp_path)
    argv = ["train", *args, "--eval_dataset_size", "2", "--do_mmlu_eval", "--mmlu_dataset", "mmlu-zs",
            "--mmlu_split", "test"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "mmlu_dataset: mmlu-zs is read from data/mmlu/zero_shot_mmlu_test.json, as in a qlora checkout" in err
    (tmp_path / "data" / "mmlu").mkdir(parents=True)
    (tmp_path / "data" / "mmlu" / "zero_shot_mmlu_test.json").write_text(json.dumps(mmlu_rows(3)))  # a JSON list
    assert main(argv) == 0
    assert read_metrics(args[args.index("--output_dir") + 1], "mmlu_test_accuracy")
