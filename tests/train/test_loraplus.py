"""LoRA+ (loraplus_lr_ratio): the B matrices in a parameter group of their own at ratio x the learning rate of A,
kept at that ratio by every schedule; one SGD step moves B by exactly ratio x what it moves without LoRA+; a run
with two groups resumes from its checkpoint exactly."""

from __future__ import annotations

import pytest
import torch

from helpers import SGD_ONE_STEP, adapter_weights, airoboros_rows, rel_diff, train_with, write_jsonl
from qlorakit.model.load import load_base_model
from qlorakit.model.lora import add_lora, target_modules
from qlorakit.train.optim import build_optimizer, build_scheduler, param_groups

LR, RATIO = 1e-3, 16.0


@pytest.fixture(scope="module")
def model(tiny_llama):
    base = load_base_model(str(tiny_llama), bits=16, bf16=False, device=torch.device("cpu"))
    return add_lora(base, r=4, alpha=8, dropout=0.0, modules=target_modules(base, "all"), seed=0)


def test_groups_put_every_b_matrix_at_the_ratio(model):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = param_groups(model.named_parameters(), LR, RATIO)
    assert [g["lr"] for g in groups] == [LR, LR * RATIO]
    b_ids = {id(p) for n, p in named if "lora_B" in n}
    assert {id(p) for p in groups[1]["params"]} == b_ids and len(b_ids) == 14
    assert {id(p) for p in groups[0]["params"]} == {id(p) for n, p in named if "lora_A" in n}
    assert all(not p.requires_grad or id(p) in b_ids | {id(q) for q in groups[0]["params"]}
               for p in model.parameters())
    off = param_groups(model.named_parameters(), LR, 0.0)  # 0 = off: one group, today's optimizer
    assert len(off) == 1 and off[0]["lr"] == LR and len(off[0]["params"]) == len(named)


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("optim", ["adamw_torch", "sgd"])
def test_every_schedule_keeps_b_at_ratio_times_a(model, kind, optim):
    opt = build_optimizer(optim, param_groups(model.named_parameters(), LR, RATIO), LR, 0.0)
    sched = build_scheduler(opt, 10, 0.2, kind)
    seen = []
    for _ in range(10):
        a, b = sched.get_last_lr()
        seen.append(a)
        assert b == pytest.approx(RATIO * a)
        opt.step()
        sched.step()
    assert max(seen) == pytest.approx(LR) and len(set(seen)) > 1  # warmup (and decay) moved both groups


def test_one_sgd_step_moves_b_by_ratio_times_the_plain_step(tiny_llama, tmp_path):
    """From B = 0 the first step's gradient of A is 0, so after one SGD step A is unchanged and B is -lr x ratio x
    its gradient: exactly RATIO times B after the same step without LoRA+."""
    data = write_jsonl(tmp_path / "d.jsonl", airoboros_rows(4))
    common = ["--model_name_or_path", str(tiny_llama), "--dataset", str(data), *SGD_ONE_STEP,
              "--learning_rate", "0.01"]
    train_with([*common, "--output_dir", str(tmp_path / "plain")])
    train_with([*common, "--output_dir", str(tmp_path / "plus"), "--loraplus_lr_ratio", "4"])
    plain, plus = adapter_weights(tmp_path / "plain"), adapter_weights(tmp_path / "plus")
    b = [k for k in plain if "lora_B" in k]
    assert b and all(float(plain[k].abs().max()) > 0 for k in b)
    assert rel_diff({k: 4 * plain[k] for k in b}, {k: plus[k] for k in b}) < 1e-5
    assert all(torch.equal(plain[k], plus[k]) for k in plain if "lora_A" in k)


def test_a_run_with_two_groups_resumes_exactly(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", airoboros_rows(8))
    common = ["--model_name_or_path", str(tiny_llama), "--dataset", str(data), "--optim", "adamw_torch",
              "--loraplus_lr_ratio", "8", "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2",
              "--per_device_train_batch_size", "2", "--learning_rate", "0.01", "--lr_scheduler_type", "cosine",
              "--warmup_ratio", "0.25", "--eval_dataset_size", "0", "--bf16", "false", "--lora_dropout", "0"]
    full = tmp_path / "full"
    train_with([*common, "--output_dir", str(full)])
    state = torch.load(full / "checkpoint-2" / "optimizer.pt", weights_only=True)
    lrs = [g["lr"] for g in state["param_groups"]]
    assert len(lrs) == 2 and lrs[1] == pytest.approx(8 * lrs[0])
    resumed = tmp_path / "resumed"
    train_with([*common, "--output_dir", str(resumed), "--resume_from_checkpoint", str(full / "checkpoint-2")])
    assert rel_diff(adapter_weights(full), adapter_weights(resumed)) < 1e-6
