"""Answers generated during training (eval_generate): their scores in metrics.jsonl, the progress line and the card;
the reference each eval example holds; and metric_for_best_model choosing the best checkpoint (what
load_best_model_at_end leaves at the root, what save_total_limit keeps, when early stopping stops)."""

from __future__ import annotations

import json
import logging

import pytest
from safetensors.torch import load_file

from helpers import airoboros_rows, read_metrics, scripted_answers, scripted_eval, train_with, write_jsonl
from qlorakit.cli import main
from qlorakit.config import ConfigError, build_config

ANSWER_KEYS = ("eval_exact_match", "eval_token_f1", "eval_rouge_l")


def test_a_run_with_eval_generate_logs_the_answer_metrics(tiny_llama, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", airoboros_rows(8))
    out = tmp_path / "run"
    assert main(["train", "--model_name_or_path", str(tiny_llama), "--dataset", str(data), "--output_dir", str(out),
                 "--eval_dataset_size", "3", "--eval_strategy", "steps", "--eval_steps", "2", "--max_steps", "2",
                 "--eval_generate", "2", "--eval_max_new_tokens", "6", "--save_strategy", "no",
                 "--bf16", "false"]) == 0
    evals = read_metrics(out, "eval_loss")
    assert len(evals) == 1 and evals[0]["eval_answered"] == 2
    for key in ANSWER_KEYS:
        assert 0.0 <= evals[0][key] <= 1.0
    err = capsys.readouterr().err
    assert "eval at step 2: loss" in err and f"exact match {evals[0]['eval_exact_match']:.4f}" in err
    card = (out / "README.md").read_text()
    assert "| step | epoch | eval loss | perplexity | exact match | token F1 | ROUGE-L |" in card
    e = evals[0]
    assert (f"| 2 | {e['epoch']:.2f} | {e['eval_loss']:.4f} | {e['eval_perplexity']:.2f} | "
            f"{e['eval_exact_match']:.4f} | {e['eval_token_f1']:.4f} | {e['eval_rouge_l']:.4f} |") in card
    assert "greedy answers to 2 eval examples" in card


def test_eval_generate_0_generates_nothing(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", airoboros_rows(6))
    out = tmp_path / "run"
    assert main(["train", "--model_name_or_path", str(tiny_llama), "--dataset", str(data), "--output_dir", str(out),
                 "--eval_dataset_size", "2", "--eval_strategy", "steps", "--eval_steps", "1", "--max_steps", "1",
                 "--eval_generate", "0", "--save_strategy", "no", "--bf16", "false"]) == 0
    (row,) = read_metrics(out, "eval_loss")
    assert not set(ANSWER_KEYS) & set(row)
    assert "exact match" not in (out / "README.md").read_text()


def test_the_reference_is_the_last_reply_and_the_prompt_what_generation_sees(tiny_llama):
    """The prompt of an eval example is the token sequence generation renders for its conversation (data/tokenize's
    prompt_ids), and its reference the reply's text: with a multi-turn conversation, the last reply."""
    from qlorakit.data.formats import Conversation, Message
    from qlorakit.data.templates import stop_text
    from qlorakit.data.tokenize import prompt_ids, tokenize_conversation
    from qlorakit.model.load import load_tokenizer
    from qlorakit.train.validate import prompt_and_reference

    tok = load_tokenizer(str(tiny_llama), False)
    msgs = [Message("user", "Name a river."), Message("assistant", "The Nile."), Message("user", "And a stone?"),
            Message("assistant", "Quartz, https://ex.org/q-1")]
    for fmt in ("airoboros", "chatml", "vicuna"):
        ex = tokenize_conversation(Conversation(msgs, "row 1"), tok, fmt)
        prompt, reference = prompt_and_reference(ex, tok, stop_text(fmt, tok))
        assert prompt == prompt_ids(msgs[:-1], tok, fmt), fmt
        assert reference == "Quartz, https://ex.org/q-1", fmt


def _best_run(tiny_llama, tmp_path, metric: str):
    """Eval loss falls at every step while the answers peak at step 2: a run that evaluates and saves every step,
    keeps one checkpoint (and the best), stops after one evaluation without improvement, and leaves the best
    adapter at the root."""
    data = write_jsonl(tmp_path / "train.jsonl", airoboros_rows(10))
    out = tmp_path / metric
    result = train_with(["--model_name_or_path", str(tiny_llama), "--dataset", str(data), "--output_dir", str(out),
                         "--eval_dataset_size", "2", "--eval_strategy", "steps", "--eval_steps", "1",
                         "--save_strategy", "steps", "--save_steps", "1", "--save_total_limit", "1",
                         "--early_stopping_patience", "1", "--load_best_model_at_end", "true", "--max_steps", "4",
                         "--per_device_train_batch_size", "2", "--learning_rate", "0.01", "--bf16", "false",
                         "--metric_for_best_model", metric],
                        evaluate=scripted_eval([3.0, 2.0, 1.0, 0.5]), answer=scripted_answers([0.5, 0.9, 0.2, 0.1]))
    return result, out


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


@pytest.mark.parametrize("metric", ["exact_match", "rouge_l"])
def test_the_best_checkpoint_follows_an_answer_metric(tiny_llama, tmp_path, caplog, metric):
    with caplog.at_level(logging.INFO, logger="qlorakit"):
        result, out = _best_run(tiny_llama, tmp_path, metric)
    assert (result.stopped, result.best_step, result.best_eval_loss) == ("early_stopping", 2, 2.0)
    assert [r["step"] for r in read_metrics(out, "loss")] == [1, 2, 3]  # no higher answer score at step 3: stop
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]  # the best kept
    root = load_file(out / "adapter_model.safetensors")
    assert _same(root, load_file(out / "checkpoint-2" / "adapter_model.safetensors"))
    assert not _same(root, load_file(out / "checkpoint-3" / "adapter_model.safetensors"))
    label = {"exact_match": "exact match", "rouge_l": "ROUGE-L"}[metric]
    assert f"the adapter at the root is checkpoint-2's ({label} 0.9000)" in caplog.text
    assert f"best {label} 0.9000 at step 2" in caplog.text
    card = (out / "README.md").read_text()
    assert f"**Best evaluation by {label}: epoch 0.50 (step 2), {label} 0.9000, eval loss 2.0000.**" in card
    assert f"the {label} stopped improving" in card
    assert json.loads((out / "trainer_state.json").read_text())["best_metric"] == 0.9


def test_the_eval_loss_twin_picks_the_other_checkpoint(tiny_llama, tmp_path):
    """The same scores under the default metric: the loss improves at every step, so nothing stops the run, and the
    best (the last step) is what stays."""
    result, out = _best_run(tiny_llama, tmp_path, "eval_loss")
    assert (result.stopped, result.best_step, result.best_eval_loss) == ("finished", 4, 0.5)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]
    assert _same(load_file(out / "adapter_model.safetensors"),
                 load_file(out / "checkpoint-4" / "adapter_model.safetensors"))
    assert "**Best evaluation: epoch 1.00 (step 4), eval loss 0.5000.**" in (out / "README.md").read_text()


def test_metric_for_best_model_is_checked():
    with pytest.raises(ConfigError) as e:
        build_config(["--metric_for_best_model", "token_f1", "--eval_generate", "0"])
    assert "metric_for_best_model: token_f1 scores generated answers; set eval_generate above 0" in str(e.value)
    with pytest.raises(ConfigError) as e:
        build_config(["--metric_for_best_model", "bleu"])
    assert "metric_for_best_model" in str(e.value)
    with pytest.raises(ConfigError) as e:
        build_config(["--metric_for_best_model", "rouge_l", "--greater_is_better", "false"])
    assert "greater_is_better: false contradicts metric_for_best_model rouge_l" in str(e.value)
    with pytest.raises(ConfigError) as e:
        build_config(["--greater_is_better", "true"])  # eval_loss: lower is better
    assert "greater_is_better: true contradicts metric_for_best_model eval_loss" in str(e.value)
    assert build_config(["--metric_for_best_model", "loss"]).metric_for_best_model == "eval_loss"  # the Trainer's
    assert build_config(["--metric_for_best_model", "exact_match", "--greater_is_better", "true"]).eval_generate == 32


def test_a_checkpoint_from_before_metric_for_best_model_resumes_with_its_best(tiny_llama, tmp_path):
    """An older qlorakit's trainer_state.json has best_eval_loss and no best_metric: the resumed run still knows its
    best (step 2, loss 1.0), so a later 1.2 is no improvement. Without that, the resumed run would take step 3's
    1.5 as a first best and step 4's 1.2 as the best."""
    data = write_jsonl(tmp_path / "train.jsonl", airoboros_rows(10))
    out = tmp_path / "run"
    args = ["--model_name_or_path", str(tiny_llama), "--dataset", str(data), "--output_dir", str(out),
            "--eval_dataset_size", "2", "--eval_strategy", "steps", "--eval_steps", "1", "--save_strategy", "steps",
            "--save_steps", "1", "--save_total_limit", "0", "--per_device_train_batch_size", "2", "--bf16", "false",
            "--eval_generate", "0"]
    train_with([*args, "--max_steps", "2"], evaluate=scripted_eval([2.0, 1.0]))
    state_file = out / "checkpoint-2" / "trainer_state.json"
    old = json.loads(state_file.read_text())
    assert old["best_metric"] == old["best_eval_loss"] == 1.0
    del old["best_metric"]
    state_file.write_text(json.dumps(old))
    result = train_with([*args, "--max_steps", "4", "--resume_from_checkpoint", "latest"],
                        evaluate=scripted_eval([1.5, 1.2]))
    assert (result.best_step, result.best_eval_loss) == (2, 1.0)
