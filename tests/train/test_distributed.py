"""Data parallel under torchrun, on CPU (gloo), with real processes: 2 ranks x 2 examples each equal 1 process x
batch 2 x GA 2, with DDP and with FSDP2; a resumed 2-process run equals an uninterrupted one; a rank left without
examples in a short last step still joins the collectives (each rank's slice of a step: test_schedule.py).

Each torchrun of the tiny model costs 20-45 s on a 2-core machine, so the runs are few and each checks several things.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from helpers import SGD_ONE_STEP, airoboros_rows, lora_b, read_metrics, rel_diff, write_jsonl
from qlorakit.cli import main
from qlorakit.data.batching import collate

SGD_TWO_STEPS = [("2" if SGD_ONE_STEP[i - 1] == "--max_steps" else a) for i, a in enumerate(SGD_ONE_STEP)]


def train_2proc(args: list[str], *, via_nproc: bool = False, timeout: int = 300) -> subprocess.CompletedProcess:
    """``qlorakit train`` in 2 processes: through torchrun, or through ``qlorakit train --nproc 2`` (which starts
    torchrun itself). On a timeout the whole process group goes, workers included (a hang must not linger)."""
    if via_nproc:
        cmd = [sys.executable, "-m", "qlorakit", "train", "--nproc", "2", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "qlorakit", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"2-process run did not finish in {timeout} s (a hang?):\n{err[-4000:]}")
    assert proc.returncode == 0, f"{cmd}\n{out[-2000:]}\n{err[-6000:]}"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def metric_rows(run_dir, key: str) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir, key)}


# --- each rank's share of a step -------------------------------------------------------------------------------

def test_zero_weighted_micro_batch_adds_nothing(tiny_llama, tokenizer, tmp_path):
    """The filler pass of an empty rank: forward and backward run, gradients and loss are untouched."""
    from qlorakit.data.formats import read_jsonl
    from qlorakit.data.tokenize import tokenize_all
    from qlorakit.model.load import load_base_model
    from qlorakit.model.lora import add_lora, target_modules
    from qlorakit.train.step import accumulate, count_trained

    convs = read_jsonl(write_jsonl(tmp_path / "r.jsonl", airoboros_rows(3)))
    ex, _ = tokenize_all(convs, tokenizer, "airoboros", 512)
    base = load_base_model(str(tiny_llama), bits=16, bf16=False, device=torch.device("cpu"))
    model = add_lora(base, r=4, alpha=8, dropout=0.0, modules=target_modules(base, "all"), seed=0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    cpu = torch.device("cpu")
    real = [collate(ex[:2], tokenizer.pad_token_id, True)]
    n = count_trained(real)
    want_loss = accumulate(model, real, cpu, False, n)
    want = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    filler = collate(ex[2:], tokenizer.pad_token_id, True)
    got_loss = accumulate(model, [*real, filler], cpu, False, n, weights=[1.0, 0.0])
    got = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert got_loss == want_loss and got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


# --- 2 processes == 1 process with accumulation ----------------------------------------------------------------

@pytest.fixture(scope="module")
def five_rows_one_process(tiny_llama, tmp_path_factory):
    """5 rows of 1- and 40-word responses, 4 examples per step: step 2 has one example, so under 2 processes rank 1
    gets none. The reference: one process, batch 2 x GA 2, two SGD steps."""
    d = tmp_path_factory.mktemp("dp")
    rows = airoboros_rows(5)
    lens = [len(r["response"].split()) for r in rows]
    assert max(lens) / min(lens) >= 40
    # cache_dequantized false: both modes on the packed 4-bit weights, as on a GPU
    args = ["--model_name_or_path", str(tiny_llama), "--dataset", str(write_jsonl(d / "rows.jsonl", rows)),
            *SGD_TWO_STEPS, "--cache_dequantized", "false"]
    assert main(["train", *args, "--output_dir", str(d / "one"), "--per_device_train_batch_size", "2",
                 "--gradient_accumulation_steps", "2"]) == 0
    return d, args


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_equal_one_with_accumulation(mode, five_rows_one_process):
    """DDP: 2 ranks x batch 2. FSDP2 (4-bit codes stored as float32 and sharded): 2 ranks x (batch 1 x GA 2), which
    is also 2 examples per rank and step, and runs several micro-batches per rank with gradients reduced each time."""
    d, args = five_rows_one_process
    out = d / mode
    per_rank = ["--per_device_train_batch_size", "2"] if mode == "ddp" else \
        ["--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2", "--fsdp", "true"]
    run = train_2proc([*args, "--output_dir", str(out), *per_rank])
    assert "4 per step" in run.stderr and "x 2 processes" in run.stderr
    one, two = lora_b(d / "one"), lora_b(out)
    assert sum(float(v.abs().sum()) for v in one.values()) > 0
    diff = rel_diff(one, two)
    print(f"{mode}: lora_B relative difference to 1 process x batch 2 x GA 2: {diff:.2e}")
    assert diff < 1e-3
    ref, got = metric_rows(d / "one", "loss"), metric_rows(out, "loss")
    assert sorted(got) == [1, 2]
    for step in ref:  # the same global token count and loss in every step, the short one included
        assert got[step]["trained_tokens"] == ref[step]["trained_tokens"]
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5)


# --- checkpoint and resume --------------------------------------------------------------------------------------

@pytest.mark.numerics  # it caught bitsandbytes' AVX512-BF16 repacking (docs/testing.md)
def test_resumed_two_process_runs_match_uninterrupted(tiny_llama, tmp_path):
    """A: DDP, 3 AdamW steps with dropout, a checkpoint each step, launched by ``qlorakit train --nproc 2``.
    B: FSDP resumed from A's checkpoint-1 (mid-epoch; position-keyed optimizer state, every rank's RNG).
    C: DDP resumed from B's checkpoint-2 (written by FSDP: gathered adapter, name-keyed optimizer state).
    Both end where A ended. 6 training rows, 4 per step: the second step of each epoch leaves rank 1 empty."""
    data = write_jsonl(tmp_path / "rows.jsonl", airoboros_rows(8))
    args = ["--model_name_or_path", str(tiny_llama), "--dataset", str(data), "--max_steps", "3",
            "--per_device_train_batch_size", "2", "--learning_rate", "0.01", "--warmup_ratio", "0",
            "--bf16", "false", "--eval_dataset_size", "2", "--eval_strategy", "epoch", "--save_strategy", "steps",
            "--save_steps", "1", "--save_total_limit", "0"]
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    run = train_2proc([*args, "--output_dir", str(a)], via_nproc=True)
    assert "torch.distributed.run" in run.stderr and "--nproc_per_node=2" in run.stderr
    assert (a / "checkpoint-1" / "rng_state_1.pt").is_file()
    train_2proc([*args, "--output_dir", str(b), "--fsdp", "true", "--resume_from_checkpoint",
                 str(a / "checkpoint-1")])
    opt = torch.load(b / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert all(isinstance(k, str) and v["exp_avg"].shape == v["exp_avg_sq"].shape for k, v in opt["state"].items())
    train_2proc([*args, "--output_dir", str(c), "--resume_from_checkpoint", str(b / "checkpoint-2")])

    want = lora_b(a)
    for name, run_dir in (("FSDP from DDP's checkpoint-1", b), ("DDP from FSDP's checkpoint-2", c)):
        diff = rel_diff(want, lora_b(run_dir))
        print(f"resumed {name}: lora_B relative difference to the uninterrupted run: {diff:.2e}")
        assert diff < 1e-3
    ref_loss, ref_eval = metric_rows(a, "loss"), metric_rows(a, "eval_loss")
    for run_dir, first in ((b, 2), (c, 3)):
        got = metric_rows(run_dir, "loss")
        assert sorted(got) == list(range(first, 4))
        for step in got:
            assert got[step]["loss"] == pytest.approx(ref_loss[step]["loss"], rel=1e-5)
    assert metric_rows(b, "eval_loss")[2]["eval_loss"] == pytest.approx(ref_eval[2]["eval_loss"], rel=1e-5)


def test_nproc_is_refused_inside_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it: each rank would start a torchrun of its own
    assert main(["train", "--nproc", "2"]) == 2
    assert "started by torchrun already" in capsys.readouterr().err
