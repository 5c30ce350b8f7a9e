"""metric_for_best_model rewards/accuracies: a preference run's best checkpoint is the one whose eval reward accuracy
(the eval row's eval_rewards/accuracies) is highest; the answer metrics are sft's, the reward accuracy a pair
method's, each mistake one line."""

from __future__ import annotations

import json
import logging
import math
import random

import pytest
from safetensors.torch import load_file

from helpers import WORDS, read_metrics, train_with, write_jsonl
from qlorakit.config import ConfigError, build_config


def pairs(n: int, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    say = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    return [{"prompt": f"Which word follows {say(3)}?", "chosen": say(2), "rejected": say(3)} for _ in range(n)]


def dpo(run_dir, data, out, *extra: str) -> list[str]:
    return ["--init_from", str(run_dir), "--method", "dpo", "--dataset", str(data), "--output_dir", str(out),
            "--bf16", "false", "--warmup_ratio", "0", "--per_device_train_batch_size", "2",
            "--load_best_model_at_end", "true", "--metric_for_best_model", "rewards/accuracies", *extra]


def scripted_preference_eval(losses: list[float], accuracies: list[float]):
    """An ``evaluate`` hook giving these eval losses and reward accuracies in turn (the keys a preference eval row
    holds), so which step is best is known beforehand."""
    it = iter(zip(losses, accuracies))

    def evaluate(model, examples, **kw):
        assert kw["objective"].name == "dpo"  # called as a preference eval
        loss, acc = next(it)
        return {"eval_loss": loss, "eval_rewards/accuracies": acc, "eval_rewards/margins": acc - 0.5,
                "eval_examples": len(examples)}

    return evaluate


def test_a_real_dpo_eval_each_epoch_keeps_the_checkpoint_with_the_highest_reward_accuracy(run_dir, tmp_path):
    """The preference eval's own rows: the best step is the first with the highest eval_rewards/accuracies, its
    value the state's best_metric, and its adapter the one at the root."""
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs(8))
    out = tmp_path / "dpo"
    result = train_with(dpo(run_dir, data, out, "--eval_dataset_size", "4", "--num_train_epochs", "3",
                            "--eval_strategy", "epoch", "--save_strategy", "epoch", "--save_total_limit", "0",
                            "--learning_rate", "0.05"))
    evals = read_metrics(out, "eval_loss")
    assert [e["step"] for e in evals] == [2, 4, 6]
    accuracies = [e["eval_rewards/accuracies"] for e in evals]
    assert all(0 <= a <= 1 for a in accuracies) and all(math.isfinite(e["eval_loss"]) for e in evals)
    best = evals[accuracies.index(max(accuracies))]  # the first of the highest: a tie is no improvement
    assert result.best_step == best["step"]
    assert json.loads((out / "trainer_state.json").read_text())["best_metric"] == best["eval_rewards/accuracies"]
    root = load_file(out / "adapter_model.safetensors")
    kept = load_file(out / f"checkpoint-{best['step']}" / "adapter_model.safetensors")
    assert root.keys() == kept.keys() and all((root[k] == kept[k]).all() for k in root)


def test_the_best_by_reward_accuracy_is_not_the_lowest_loss_and_early_stopping_follows_it(run_dir, tmp_path, caplog):
    """Eval loss falls at every step while the reward accuracy peaks at step 2: step 2 is kept and left at the
    root, and the run stops after one evaluation without a higher accuracy. With eval_loss it would be step 4."""
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs(8))
    out = tmp_path / "dpo"
    args = dpo(run_dir, data, out, "--eval_dataset_size", "2", "--eval_strategy", "steps", "--eval_steps", "1",
               "--save_strategy", "steps", "--save_steps", "1", "--save_total_limit", "1",
               "--early_stopping_patience", "1", "--max_steps", "4", "--learning_rate", "0.01")
    with caplog.at_level(logging.INFO, logger="qlorakit"):
        result = train_with(args, evaluate=scripted_preference_eval([0.69, 0.6, 0.5, 0.4], [0.5, 1.0, 0.5, 1.0]))
    assert (result.stopped, result.best_step, result.best_eval_loss) == ("early_stopping", 2, 0.6)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    root = load_file(out / "adapter_model.safetensors")
    assert all((root[k] == v).all() for k, v in load_file(out / "checkpoint-2" / "adapter_model.safetensors").items())
    assert "the adapter at the root is checkpoint-2's (reward accuracy 1.0000)" in caplog.text
    assert "early stopping: no higher reward accuracy in 1 evaluations" in caplog.text
    card = (out / "README.md").read_text()
    assert "**Best evaluation by reward accuracy: epoch 0.67 (step 2), reward accuracy 1.0000, eval loss" in card
    # The twin: by eval loss the same scores never stop the run and the last step is the best.
    twin_args = [{str(out): str(tmp_path / "twin"), "rewards/accuracies": "eval_loss"}.get(a, a) for a in args]
    twin = train_with(twin_args, evaluate=scripted_preference_eval([0.69, 0.6, 0.5, 0.4], [0.5, 1.0, 0.5, 1.0]))
    assert (twin.stopped, twin.best_step) == ("finished", 4)


@pytest.mark.parametrize(("args", "said"), [
    (["--method", "dpo", "--metric_for_best_model", "exact_match"],
     "metric_for_best_model: exact_match scores generated answers, which only method sft makes (eval_generate); "
     "for method dpo choose eval_loss or rewards/accuracies"),
    (["--method", "kto", "--metric_for_best_model", "rouge_l"],
     "metric_for_best_model: rouge_l scores generated answers, which only method sft makes (eval_generate); "
     "for method kto choose eval_loss"),
    (["--metric_for_best_model", "rewards/accuracies"],
     "metric_for_best_model: rewards/accuracies is the reward accuracy of a dpo, orpo or simpo eval; method sft "
     "has none: choose eval_loss, exact_match, token_f1 or rouge_l"),
    (["--method", "kto", "--metric_for_best_model", "rewards/accuracies"],
     "metric_for_best_model: rewards/accuracies is the reward accuracy of a dpo, orpo or simpo eval; method kto "
     "has none: choose eval_loss"),
    (["--method", "orpo", "--metric_for_best_model", "rewards/accuracies", "--greater_is_better", "false"],
     "greater_is_better: false contradicts metric_for_best_model rewards/accuracies (higher is better)"),
])
def test_the_metric_must_be_one_the_method_evaluates(args, said):
    with pytest.raises(ConfigError) as e:
        build_config(args)
    lines = [line for line in str(e.value).splitlines() if "metric_for_best_model" in line]
    assert len(lines) == 1 and said in lines[0]


def test_the_reward_accuracy_is_accepted_by_its_names():
    for method in ("dpo", "orpo", "simpo"):
        cfg = build_config(["--method", method, "--metric_for_best_model", "rewards/accuracies"])
        assert cfg.metric_for_best_model == "rewards/accuracies"
    # the metrics row's key, as TRL users write it (the Trainer adds eval_ where it is missing)
    cfg = build_config(["--method", "dpo", "--metric_for_best_model", "eval_rewards/accuracies",
                        "--greater_is_better", "true"])
    assert cfg.metric_for_best_model == "rewards/accuracies"
