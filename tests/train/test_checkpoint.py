"""Checkpoints: exact resume after SIGKILL, atomic saves, pruning that keeps the best, refused config changes,
and SIGTERM / Ctrl-C handling."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import adapter_weights as adapter
from helpers import airoboros_rows, read_metrics, rel_diff, scripted_eval, train_with, write_jsonl
from qlorakit.cli import main
from qlorakit.config import build_config, save_config
from qlorakit.train import checkpoint as ckpt
from qlorakit.train.fit import StopRequest

RESUME = ["--optim", "adamw_torch", "--lr_scheduler_type", "cosine", "--warmup_ratio", "0.25", "--lora_dropout", "0.1",
          "--max_steps", "8", "--save_strategy", "steps", "--save_steps", "4", "--per_device_train_batch_size", "2",
          "--learning_rate", "0.01", "--eval_dataset_size", "0"]


def start_train(args: list[str], log: Path) -> subprocess.Popen:
    """``python -m qlorakit train ARGS`` in its own process, stdout and stderr to ``log``."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    with log.open("w") as f:
        return subprocess.Popen([sys.executable, "-m", "qlorakit", "train", *args], stdout=f, stderr=subprocess.STDOUT,
                                env=env, cwd=log.parent)


def wait_until(ready, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    t0 = time.monotonic()
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"training exited with {proc.returncode} too early:\n{log.read_text()[-2000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            proc.wait()
            pytest.fail(f"timed out waiting:\n{log.read_text()[-2000:]}")
        time.sleep(0.005)


def kill_after_checkpoint_4(args: list[str], killed: Path, log: Path) -> dict:
    """Train ARGS into ``killed`` in a child process and SIGKILL it as soon as checkpoint-4 is written; checks that it
    died there (step 4 of epoch 0, no checkpoint-8) and returns checkpoint-4's trainer_state.json."""
    proc = start_train([*args, "--output_dir", str(killed)], log)
    try:
        wait_until(lambda: (killed / "checkpoint-4" / "trainer_state.json").exists(), proc, log)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-2000:]  # killed, not finished
    assert not (killed / "checkpoint-8").exists()
    state = json.loads((killed / "checkpoint-4" / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["step_in_epoch"]) == (4, 0, 4)
    return state


def assert_resumed_like_full(killed: Path, full: Path) -> None:
    """The resumed run's adapter and its logged losses and learning rates, one row per step, equal the uninterrupted
    run's."""
    assert rel_diff(adapter(full, only_b=True), adapter(killed, only_b=True)) < 1e-3  # B starts at 0: all learned
    assert rel_diff(adapter(full), adapter(killed)) < 1e-3
    resumed = read_metrics(killed, "loss")
    assert [r["step"] for r in resumed] == list(range(1, 9))  # one row per step, none twice
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in read_metrics(full)], rel=1e-5)
    assert [r["learning_rate"] for r in resumed] == pytest.approx([r["learning_rate"] for r in read_metrics(full)])


def test_resume_after_sigkill_is_exact(tiny_llama, tmp_path):
    """Killed right after checkpoint-4 (mid-epoch: 12 rows, 6 steps per epoch), resumed with 'latest': the adapter
    and every logged loss equal those of an uninterrupted run (dropout RNG, data position, schedule and AdamW
    state all restored)."""
    data = write_jsonl(tmp_path / "d.jsonl", airoboros_rows(12))
    common = ["--model_name_or_path", str(tiny_llama), "--dataset", str(data), *RESUME]
    killed, log = tmp_path / "killed", tmp_path / "killed.log"
    kill_after_checkpoint_4(common, killed, log)
    assert not (killed / "adapter_model.safetensors").exists()

    assert main(["train", *common, "--output_dir", str(killed), "--resume_from_checkpoint", "latest"]) == 0
    full = tmp_path / "full"
    assert main(["train", *common, "--output_dir", str(full)]) == 0

    assert_resumed_like_full(killed, full)


def write_mixture(tmp_path: Path) -> str:
    """An airoboros JSONL of 12 rows at weight 0.5 and an alpaca parquet of 4 rows at weight 1.5: 12 examples, as
    the compact --dataset string."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = write_jsonl(tmp_path / "chat.jsonl", airoboros_rows(12))
    table = tmp_path / "tasks.parquet"
    pq.write_table(pa.Table.from_pylist([{"instruction": r["instruction"], "input": "", "output": r["response"]}
                                         for r in airoboros_rows(4, seed=5)]), table)
    return f"{jsonl}:0.5,{table}:1.5:format=alpaca"


def test_resume_after_sigkill_from_a_mixture_is_exact(tiny_llama, tmp_path, caplog):
    """The SIGKILL test above with a mixture of a JSONL and a parquet file: the checkpoint records the data's
    fingerprint, the resume loads the examples from the cache, and adapter and losses equal a straight run's."""
    import logging

    common = ["--model_name_or_path", str(tiny_llama), "--dataset", write_mixture(tmp_path), *RESUME]
    killed, log = tmp_path / "killed", tmp_path / "killed.log"
    state = kill_after_checkpoint_4(common, killed, log)
    assert "mixture: " in log.read_text()
    assert state["data"]["train_examples"] == 12 and len(state["data"]["fingerprint"]) == 32

    with caplog.at_level(logging.INFO, logger="qlorakit"):
        assert main(["train", *common, "--output_dir", str(killed), "--resume_from_checkpoint", "latest"]) == 0
    assert caplog.text.count("data cache: ") == 2 and caplog.text.count(" loaded (tokenized ") == 2
    assert "resumed from" in caplog.text and "no data fingerprint" not in caplog.text
    full = tmp_path / "full"
    assert main(["train", *common, "--output_dir", str(full)]) == 0

    assert_resumed_like_full(killed, full)


def test_resume_with_other_data_is_refused_in_one_line(tiny_llama, tmp_path, capsys, caplog):
    """A source edited after the checkpoint: refused, naming it, before the model loads. A checkpoint of an older
    qlorakit (no data record) resumes without the check, and the log says so."""
    import logging

    spec = write_mixture(tmp_path)
    out = tmp_path / "run"
    args = ["train", "--model_name_or_path", str(tiny_llama), "--dataset", spec, "--output_dir", str(out),
            "--per_device_train_batch_size", "4", "--save_strategy", "steps", "--save_steps", "1",
            "--learning_rate", "0.01", "--eval_strategy", "no"]
    assert main([*args, "--max_steps", "1"]) == 0
    jsonl = tmp_path / "chat.jsonl"
    original = jsonl.read_text()
    jsonl.write_text(original.replace("Repeat", "Say", 1))
    capsys.readouterr()
    assert main([*args, "--max_steps", "2", "--resume_from_checkpoint", "latest"]) == 2
    errors = [x for x in capsys.readouterr().err.splitlines() if "error" in x]
    assert errors == [f"qlorakit train: error: cannot resume from {out / 'checkpoint-1'}: the training data differs "
                      f"from the checkpoint's: {jsonl} changed since the checkpoint (its files' sha256 differ); "
                      "resume with the checkpoint's data or start a new run"]

    jsonl.write_text(original)
    state_file = out / "checkpoint-1" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["data"]  # as an older qlorakit wrote it
    state_file.write_text(json.dumps(state))
    with caplog.at_level(logging.INFO, logger="qlorakit"):
        assert main([*args, "--max_steps", "2", "--resume_from_checkpoint", "latest"]) == 0
    assert f"{out / 'checkpoint-1'} records no data fingerprint (an older qlorakit wrote it)" in caplog.text
    assert [r["step"] for r in read_metrics(out, "loss")] == [1, 2]
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["data"]["train_examples"] == 12


@pytest.mark.parametrize("change,want", [
    ({"selection": "weight 2"}, "a.jsonl: weight 0.5 -> weight 2"),
    ({"examples": "otherkey"}, "a.jsonl gives other examples (the same rows tokenized differently: the tokenizer"),
    ({"name": "c.jsonl"}, "sources a.jsonl (train), b.parquet (train) -> c.jsonl (train), b.parquet (train)"),
])
def test_a_data_change_is_named(tmp_path, change, want):
    def record(**first):
        sources = [{"name": "a.jsonl", "role": "train", "rows": 8, "selection": "weight 0.5", "content": "c1",
                    "examples": "k1"}, {"name": "b.parquet", "role": "train", "rows": 4, "selection": "all rows",
                                        "content": "c2", "examples": "k2"}]
        sources[0].update(first)
        return {"fingerprint": json.dumps(first), "train_examples": 8, "eval_examples": 0, "sources": sources}

    c = tmp_path / "checkpoint-1"
    c.mkdir()
    (c / "trainer_state.json").write_text(ckpt.TrainState(step=1, data=record()).to_json())
    assert ckpt.check_data(c, record()) is True
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.check_data(c, record(**change))
    assert f"the training data differs from the checkpoint's: {want}" in str(e.value)


class _FailingSave:
    """Raises ENOSPC while writing ``checkpoint-2`` (its optimizer state or its adapter), after a partial write."""

    def __init__(self, monkeypatch, what: str):
        import peft.peft_model
        import torch

        real_torch_save, real_save_file = torch.save, peft.peft_model.safe_save_file

        def torch_save(obj, f, *a, **kw):
            if what == "optimizer" and Path(f).name == "optimizer.pt" and ".checkpoint-2." in str(f):
                Path(f).write_bytes(b"\0" * 100)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_torch_save(obj, f, *a, **kw)

        def save_file(tensors, filename, *a, **kw):
            if what == "adapter" and ".checkpoint-2." in str(filename):
                from safetensors import SafetensorError

                raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
            return real_save_file(tensors, filename, *a, **kw)

        monkeypatch.setattr(torch, "save", torch_save)
        monkeypatch.setattr(peft.peft_model, "safe_save_file", save_file)


@pytest.mark.parametrize("what", ["optimizer", "adapter"])
def test_failed_save_leaves_previous_checkpoint_usable(what, tiny_llama, tmp_path, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", airoboros_rows(6))
    out = tmp_path / "run"
    args = ["train", "--model_name_or_path", str(tiny_llama), "--dataset", str(data), "--output_dir", str(out),
            "--max_steps", "3", "--save_strategy", "steps", "--save_steps", "1", "--per_device_train_batch_size", "2",
            "--learning_rate", "0.01", "--save_total_limit", "0"]
    _FailingSave(monkeypatch, what)
    assert main(args) == 2
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if "error" in ln]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert "checkpoint-2" in errors[0] and "No space left on device" in errors[0]
    assert "checkpoint-1 is intact" in errors[0]
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-1"]
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-1"]  # no temp folder left
    monkeypatch.undo()

    if what == "optimizer":  # resuming with a changed batch size is refused by name, before any model is loaded
        assert main([*args, "--resume_from_checkpoint", "latest", "--per_device_train_batch_size", "1"]) == 2
        err = capsys.readouterr().err
        assert "per_device_train_batch_size (2 -> 1)" in err and "Traceback" not in err
        assert err.count("\n") == 1

    assert main([*args, "--resume_from_checkpoint", "latest"]) == 0  # checkpoint-1 loads and the run completes
    assert [r["step"] for r in read_metrics(out, "loss")] == [1, 2, 3]
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]


@pytest.fixture
def small_disk(tmp_path):
    """A real 700 KB tmpfs: one checkpoint of the tiny run (about 460 KB) fits, the next one's adapter fits, and its
    optimizer state (280 KB) does not. Mounting needs root or CAP_SYS_ADMIN; elsewhere the test is skipped."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.skip("no mount/umount command to make a small tmpfs")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        yield disk
    finally:  # lazily where a failed test's traceback still holds a file open on it
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(disk)], check=True)


def test_a_real_full_disk_during_a_save_stops_with_one_line(small_disk, tiny_llama, tmp_path, capsys):
    """torch.save of the optimizer state on a full disk raises a RuntimeError from torch's zip writer (no errno);
    the run ends with the one-line message, and the previous checkpoint is whole."""
    import torch

    data = write_jsonl(tmp_path / "d.jsonl", airoboros_rows(6))
    out = small_disk / "run"
    assert main(["train", "--model_name_or_path", str(tiny_llama), "--dataset", str(data), "--output_dir", str(out),
                 "--max_steps", "3", "--save_strategy", "steps", "--save_steps", "1", "--per_device_train_batch_size",
                 "2", "--learning_rate", "0.01", "--save_total_limit", "0"]) == 2
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if "error" in ln]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert "saving checkpoint-2 failed: writing optimizer.pt failed" in errors[0], errors[0]
    assert "inline_container.cc" in errors[0] and "checkpoint-1 is intact" in errors[0]
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-1"]  # no temp folder
    saved = out / "checkpoint-1"
    assert adapter(saved) and torch.load(saved / "optimizer.pt", weights_only=True)["state"]


class _Adapter:
    """What save_checkpoint asks of a model."""

    def save_pretrained(self, path, state_dict=None):
        (Path(path) / "adapter_model.safetensors").write_bytes(b"")


@pytest.mark.parametrize("message,raised", [("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0",
                                             OSError), ("basic_ios::clear: iostream error", OSError),
                                            ("some other failure", RuntimeError)])
def test_only_torch_write_failures_count_as_a_failed_write(tmp_path, monkeypatch, message, raised):
    import torch

    def failing_save(obj, f, *a, **kw):
        raise RuntimeError(message)

    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(raised) as e:
        ckpt.save_checkpoint(tmp_path, _Adapter(), optimizer, scheduler, ckpt.TrainState(step=1), build_config([]))
    assert type(e.value) is raised and message in str(e.value)
    assert raised is RuntimeError or "writing optimizer.pt failed" in str(e.value)
    assert list(tmp_path.iterdir()) == []  # the partial checkpoint is gone either way


def test_partial_saves_of_a_killed_run_are_cleaned_or_recovered(tmp_path):
    """A kill inside a save leaves a temporary folder (removed at the next start) or, when re-saving a step, the
    previous copy under a hidden name (put back)."""
    out = tmp_path / "run"
    for name in ("checkpoint-2", ".checkpoint-4.tmp-123", ".checkpoint-3.old-77"):
        (out / name).mkdir(parents=True)
        (out / name / "trainer_state.json").write_text("{}")
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-2"]
    ckpt.recover_partial_saves(out)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "checkpoint-3"]


def test_resume_refuses_changed_keys_by_name(tmp_path):
    args = ["--dataset", str(tmp_path / "d.jsonl"), "--output_dir", str(tmp_path / "run")]
    c = tmp_path / "run" / "checkpoint-3"
    c.mkdir(parents=True)
    save_config(build_config(args), c / "qlorakit_config.yaml")
    (c / "trainer_state.json").write_text("{}")
    ckpt.check_resumable(c, build_config([*args, "--logging_steps", "5", "--save_steps", "7"]))  # harmless changes
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.check_resumable(c, build_config([*args, "--learning_rate", "1e-3", "--lora_r", "8"]))
    default_lr = build_config(args).learning_rate
    assert f"learning_rate ({default_lr} -> 0.001)" in str(e.value) and "lora_r (16 -> 8)" in str(e.value)
    # where the run ends may change (check_total_steps refuses an end before the checkpoint)
    ckpt.check_resumable(c, build_config([*args, "--num_train_epochs", "5", "--max_steps", "40"]))


def test_more_epochs_continue_a_finished_run_and_fewer_are_refused(tiny_llama, tmp_path, capsys, caplog):
    """A finished 1-epoch run (2 steps, linear decay) resumed from its last checkpoint with 2 epochs trains steps 3
    and 4 on the new schedule, stepped to step 2: 0.01 x (1 - 2/4) and 0.01 x (1 - 3/4). Then 1 epoch again is
    below checkpoint-4's step: refused in one line."""
    import logging

    data = write_jsonl(tmp_path / "d.jsonl", airoboros_rows(4))
    out = tmp_path / "run"
    args = ["train", "--model_name_or_path", str(tiny_llama), "--dataset", str(data), "--output_dir", str(out),
            "--per_device_train_batch_size", "2", "--learning_rate", "0.01", "--lr_scheduler_type", "linear",
            "--warmup_ratio", "0", "--eval_dataset_size", "0", "--save_strategy", "epoch", "--optim", "adamw_torch"]
    assert main([*args, "--num_train_epochs", "1"]) == 0
    first = read_metrics(out, "loss")
    assert [(r["step"], r["learning_rate"]) for r in first] == [(1, 0.01), (2, 0.005)]

    with caplog.at_level(logging.INFO, logger="qlorakit"):
        assert main([*args, "--num_train_epochs", "2", "--resume_from_checkpoint", "latest"]) == 0
    rows = read_metrics(out, "loss")
    assert rows[:2] == first and [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["learning_rate"] for r in rows[2:]] == pytest.approx([0.005, 0.0025])
    assert ("schedule: 4 steps in all instead of the checkpoint's 2; the linear learning-rate schedule is rebuilt for "
            "4 steps and continues at step 2 (lr 5.00e-03)") in caplog.text
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    state = json.loads((out / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["total_steps"]) == (4, 2, 4)

    capsys.readouterr()
    assert main([*args, "--num_train_epochs", "1", "--resume_from_checkpoint", "latest"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"cannot resume from {out / 'checkpoint-4'}: it is at step 4, past the 2 steps of this run " \
           "(num_train_epochs 1); raise num_train_epochs or max_steps" in err


def test_save_total_limit_prunes_oldest_never_best_nor_newest(tiny_llama, tmp_path, caplog):
    import logging

    data = write_jsonl(tmp_path / "d.jsonl", airoboros_rows(10))
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="qlorakit"):
        result = train_with(["--model_name_or_path", str(tiny_llama), "--dataset", str(data), "--output_dir", str(out),
                            "--eval_dataset_size", "2", "--eval_strategy", "steps", "--eval_steps", "1",
                            "--save_strategy", "steps", "--save_steps", "1", "--save_total_limit", "1",
                            "--max_steps", "4", "--per_device_train_batch_size", "2", "--learning_rate", "0.01",
                            "--load_best_model_at_end", "true"],
                            evaluate=scripted_eval([3.0, 1.0, 2.0, 4.0]))  # the best is step 2
    assert (result.stopped, result.best_step) == ("finished", 2)
    # limit 1 keeps the best and, so that a resume loses nothing, the newest
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    assert "removed checkpoint-1 (save_total_limit 1)" in caplog.text
    assert rel_diff(adapter(out / "checkpoint-2"), adapter(out)) == 0  # the best adapter is at the root
    assert rel_diff(adapter(out / "checkpoint-4"), adapter(out)) > 0


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", airoboros_rows(10))
    out, log = tmp_path / "run", tmp_path / "term.log"
    common = ["--model_name_or_path", str(tiny_llama), "--dataset", str(data), "--output_dir", str(out),
              "--max_steps", "5", "--save_strategy", "no", "--per_device_train_batch_size", "2",
              "--learning_rate", "0.01"]
    proc = start_train(common, log)
    try:
        metrics_file = out / "metrics.jsonl"
        wait_until(lambda: metrics_file.exists() and metrics_file.stat().st_size > 0, proc, log)  # step 1 done
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=300)
    finally:
        proc.kill()
        proc.wait()
    text = log.read_text()
    assert rc == 130, text[-2000:]
    assert "Traceback" not in text
    saved = ckpt.list_checkpoints(out)
    assert len(saved) == 1, text[-2000:]
    step = int(saved[0].name.split("-")[1])
    assert 1 <= step < 5
    last = text.strip().splitlines()[-1]
    assert "SIGTERM" in last and saved[0].name in last and "--resume_from_checkpoint latest" in last, last
    assert not (out / "adapter_model.safetensors").exists()  # not mistaken for a finished run

    assert main(["train", *common, "--resume_from_checkpoint", "latest"]) == 0
    assert [r["step"] for r in read_metrics(out, "loss")] == [1, 2, 3, 4, 5]
    assert (out / "adapter_model.safetensors").is_file()


def test_second_ctrl_c_aborts_at_once():
    before = signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested == "SIGINT"  # the first asks for a checkpoint at the step's end
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is before


def test_metrics_of_a_killed_run_are_cut_back_to_the_checkpoint(tmp_path):
    from qlorakit.train.progress import Metrics

    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "eval_loss": 1.5}\n{"step": 3, "loss": 1.0}\n{"step": 4, "lo')
    m = Metrics(p, resume_step=2)  # the row of step 3 and the half-written one are gone
    assert [r["step"] for r in m.rows()] == [1, 2]
