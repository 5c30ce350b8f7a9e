"""Preference training through the whole loop, on a tiny LLaMA started from a tiny SFT run (conftest's run_dir):
DPO's step-0 loss and rewards, the packed pair, accumulation, resume after SIGKILL, the other methods."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import SGD_ONE_STEP, lora_b, lora_model, pair_rows, read_metrics, rel_diff, write_jsonl
from qlorakit.cli import main

def dpo_args(run_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--init_from", str(run_dir), "--method", "dpo", "--dataset", str(data), "--output_dir", str(out),
            "--bf16", "false", "--save_strategy", "no", "--eval_strategy", "no", "--warmup_ratio", "0", *extra]


def test_dpo_step0_is_ln2_with_zero_rewards_and_an_emptied_pair_is_dropped(run_dir, tmp_path, caplog):
    """Started from an SFT run, the policy is its reference: the first step's loss is ln 2 and every reward 0. A pair
    whose prompt fills model_max_len is dropped and counted, and nothing is NaN."""
    rows = pair_rows(7) + [{"prompt": "stone " * 200, "chosen": "a", "rejected": "b"}]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "dpo"
    with caplog.at_level("INFO", logger="qlorakit"):
        assert main(dpo_args(run_dir, data, out, "--max_steps", "2", "--model_max_len", "128",
                             "--per_device_train_batch_size", "7", "--learning_rate", "0.05")) == 0
    assert any("1 dropped: no trained token left" in r.getMessage() for r in caplog.records)
    first, second = read_metrics(out, "loss")
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert first[key] == pytest.approx(0.0, abs=1e-6)
    assert first["logps/chosen"] < 0 and math.isfinite(second["loss"])
    assert second["loss"] < first["loss"] and second["rewards/margins"] > 0  # one update moved it the right way
    card = (out / "README.md").read_text()
    assert "| method | dpo |" in card and f"| init_from | {run_dir.name} |" in card and "| beta | 0.1 |" in card
    assert str(run_dir) not in card  # the starting run by its folder's name: a published card shows no local path
    # A preference run is a run like any other: merge and generate take its directory.
    assert main(["merge", str(out), "--output", str(tmp_path / "merged")]) == 0
    prompts = write_jsonl(tmp_path / "q.jsonl", [{"instruction": "Which word follows alpha?"}])
    assert main(["generate", str(out), "--input", str(prompts), "--output", str(tmp_path / "a.jsonl"),
                 "--max_new_tokens", "4"]) == 0
    assert (tmp_path / "merged" / "config.json").is_file() and (tmp_path / "a.jsonl").read_text().strip()


def test_with_dropout_on_the_step0_rewards_are_not_zero(run_dir, tmp_path):
    """Why preference methods turn dropout off: with it on, the policy's forward differs from the reference's
    (computed without dropout), so the rewards at step 0 are noise, not 0, and the loss is not ln 2."""
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(6))
    out = tmp_path / "dropout"
    assert main(dpo_args(run_dir, data, out, "--max_steps", "1", "--per_device_train_batch_size", "6",
                         "--disable_dropout", "false", "--lora_dropout", "0.3")) == 0
    (row,) = read_metrics(out, "loss")
    assert abs(row["rewards/chosen"]) > 1e-4 and abs(row["loss"] - math.log(2)) > 1e-5


def test_packed_pair_gives_the_separate_log_probabilities(tiny_llama, tokenizer):
    """Prompt + chosen and prompt + rejected packed in one padding-free row give each completion the
    log-probability it has run alone (positions restart, so rejected never attends to chosen)."""
    from transformers import AutoModelForCausalLM

    from qlorakit.data.pairs import pairs_row
    from qlorakit.data.tokenize import tokenize_preference
    from qlorakit.train.objectives.forward import sequence_logps
    from qlorakit.train.objectives.preference import Pairs

    base = AutoModelForCausalLM.from_pretrained(tiny_llama, torch_dtype=torch.float32)
    model = lora_model(base, dropout=0.0, fused=False).eval()
    examples = tokenize_preference([pairs_row(r, f"x:{i}") for i, r in enumerate(pair_rows(3))], tokenizer,
                                   "airoboros")
    obj, cpu = Pairs("dpo", beta=0.1), torch.device("cpu")
    with torch.no_grad():
        packed = sequence_logps(model, obj.collate(examples, [0, 1, 2], tokenizer.pad_token_id, True), cpu)[0]
        alone = torch.cat([sequence_logps(model, obj.collate(examples, [i], tokenizer.pad_token_id, False), cpu)[0]
                           for i in range(3)])
        # The broken twin: rejected appended to prompt + chosen in ONE sequence attends to chosen.
        twin = obj.collate(examples, [0], tokenizer.pad_token_id, True)
        twin["position_ids"] = torch.arange(twin["input_ids"].shape[1])[None]
        for k in ("cu_seq_lens_q", "cu_seq_lens_k", "seq_bounds", "max_length_q", "max_length_k"):
            twin.pop(k, None)
        leaky = sequence_logps(model, twin, cpu)[0]
    assert torch.allclose(packed, alone, atol=1e-5)
    assert not torch.allclose(leaky[1], alone[1], atol=1e-3)


def test_accumulation_4x1_equals_batch_4(run_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(4))
    runs = {}
    for name, micro, accum in (("big", 4, 1), ("accum", 1, 4)):
        out = tmp_path / name
        assert main(dpo_args(run_dir, data, out, *SGD_ONE_STEP, "--per_device_train_batch_size", str(micro),
                             "--gradient_accumulation_steps", str(accum))) == 0
        runs[name] = out
    assert rel_diff(lora_b(runs["big"]), lora_b(runs["accum"])) < 1e-5
    big, acc = read_metrics(runs["big"], "loss")[0], read_metrics(runs["accum"], "loss")[0]
    for key in ("loss", "rewards/accuracies", "logps/chosen"):
        assert acc[key] == pytest.approx(big[key], rel=1e-5)


def _kill_at_checkpoint_4(args: list[str], out: Path) -> None:
    log = out.parent / "killed.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "qlorakit", *args], stdout=f, stderr=subprocess.STDOUT,
                                env=env)
    try:
        t0 = time.monotonic()
        while not (out / "checkpoint-4" / "trainer_state.json").exists():
            assert proc.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() - t0 < 300, log.read_text()[-2000:]
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert not (out / "checkpoint-8").exists()
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["step"] == 4


def test_resume_after_sigkill_ends_with_the_straight_runs_adapter(run_dir, tmp_path):
    """Killed right after checkpoint-4, resumed: the reference is the starting adapter (not the checkpoint's), so
    adapter and losses equal an uninterrupted run's."""
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(6))
    extra = ["--max_steps", "8", "--save_strategy", "steps", "--save_steps", "4", "--per_device_train_batch_size",
             "2", "--learning_rate", "0.01", "--lr_scheduler_type", "cosine"]
    killed, full = tmp_path / "killed", tmp_path / "full"
    _kill_at_checkpoint_4(dpo_args(run_dir, data, killed, *extra), killed)
    assert main([*dpo_args(run_dir, data, killed, *extra), "--resume_from_checkpoint", "latest"]) == 0
    assert main(dpo_args(run_dir, data, full, *extra)) == 0
    assert rel_diff(lora_b(full), lora_b(killed)) < 1e-4
    want = [r["loss"] for r in read_metrics(full, "loss")]
    assert [r["loss"] for r in read_metrics(killed, "loss")] == pytest.approx(want, rel=1e-5)


def test_precompute_reference_is_kept_and_reused(run_dir, tmp_path, caplog):
    """precompute_reference: the first run computes the reference log-probabilities into the data cache; a second
    run (or a resume) with the same data and starting adapter loads them and logs the same step."""
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(4))
    extra = ["--max_steps", "1", "--precompute_reference", "true", "--data_cache_dir", str(tmp_path / "cache")]
    with caplog.at_level("INFO", logger="qlorakit"):
        assert main(dpo_args(run_dir, data, tmp_path / "a", *extra)) == 0
        assert main(dpo_args(run_dir, data, tmp_path / "b", *extra)) == 0
    said = [r.getMessage() for r in caplog.records if "reference log-probabilities" in r.getMessage()]
    assert [s.split(":")[1].split()[0] for s in said] == ["computed,", "loaded"]
    assert len(list((tmp_path / "cache" / "reference").glob("*.npy"))) == 1
    assert read_metrics(tmp_path / "b", "loss")[0]["loss"] == read_metrics(tmp_path / "a", "loss")[0]["loss"]


@pytest.mark.parametrize("method", ["orpo", "simpo", "ipo", "kto"])
def test_other_methods_train_and_evaluate(run_dir, tmp_path, method):
    """Each method runs two steps with an eval split and writes its metrics; KTO with a batch of one."""
    if method == "kto":
        rows = [{"prompt": r["prompt"], "completion": r["chosen" if i % 2 else "rejected"], "label": bool(i % 2)}
                for i, r in enumerate(pair_rows(8))]
        keys = ["--method", "kto", "--per_device_train_batch_size", "1"]
    else:
        rows = pair_rows(8)
        keys = ["--method", "dpo", "--loss_type", "ipo"] if method == "ipo" else ["--method", method]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    args = dpo_args(run_dir, data, tmp_path / "out", "--max_steps", "2", "--eval_dataset_size", "2",
                    "--eval_strategy", "steps", "--eval_steps", "2")
    args[args.index("--method") + 1:args.index("--method") + 2] = []
    args.remove("--method")
    assert main([*args, *keys]) == 0
    rows = read_metrics(tmp_path / "out")
    train_rows = [r for r in rows if "loss" in r]
    assert len(train_rows) == 2 and all(math.isfinite(r["loss"]) for r in train_rows)
    evals = [r for r in rows if "eval_loss" in r]
    assert evals and math.isfinite(evals[-1]["eval_loss"])
    if method == "kto":
        assert "kl" in train_rows[0] and "eval_kl" in evals[-1]
    else:
        assert "rewards/accuracies" in train_rows[0] and "eval_rewards/accuracies" in evals[-1]


def test_two_processes_equal_one(run_dir, tmp_path):
    """DDP on CPU (gloo): 2 ranks x 2 pairs give the adapter and each step's loss and rewards of 1 process x 4 pairs
    (the reference log-probabilities computed in shares by the ranks and summed). Two SGD steps, so the second
    step's rewards are not 0."""
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(4))
    one, two = tmp_path / "one", tmp_path / "two"
    sgd = [("2" if SGD_ONE_STEP[i - 1] == "--max_steps" else a) for i, a in enumerate(SGD_ONE_STEP)]
    assert main(dpo_args(run_dir, data, one, *sgd, "--per_device_train_batch_size", "4")) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "qlorakit",
           *dpo_args(run_dir, data, two, *sgd, "--per_device_train_batch_size", "2")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert rel_diff(lora_b(one), lora_b(two)) < 1e-4
    a, b = read_metrics(one, "loss"), read_metrics(two, "loss")
    assert len(a) == len(b) == 2 and abs(a[1]["rewards/margins"]) > 1e-4
    for ra, rb in zip(a, b):
        for key in ("loss", "rewards/chosen", "rewards/margins", "logps/rejected"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-7)
