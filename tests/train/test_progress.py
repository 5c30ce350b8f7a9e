"""The progress line and bar show a step's CUDA peak memory where its metrics row has it, and nothing of it where
the row has none (a CPU run); a run passes the peaks it reads to metrics.jsonl, the progress line and the card."""

from __future__ import annotations

import io

from helpers import airoboros_rows, read_metrics, train_with, write_jsonl
from qlorakit.train.progress import Progress, peak_memory_text

ROW = {"step": 2, "epoch": 0.5, "loss": 1.25, "learning_rate": 1e-4, "tokens_per_second": 1234.0}
PEAKS = {"peak_allocated_gib": 12.345, "peak_reserved_gib": 14.0}


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _line(row: dict) -> str:
    out = io.StringIO()
    Progress(total=4, start=0, every=1, stream=out).update(row)
    return out.getvalue()


def test_progress_line_shows_the_peak_only_where_the_row_has_it():
    with_peak, without = _line(ROW | PEAKS), _line(ROW)
    assert "loss 1.2500 lr 1.00e-04 tok/s 1,234 mem 12.3 GiB (14.0 reserved) left" in with_peak
    assert without.startswith("step 2/4 epoch 0.50 loss 1.2500 lr 1.00e-04 tok/s 1,234 left")
    assert "mem" not in without and "GiB" not in without


def test_progress_bar_shows_the_peak_only_where_the_row_has_it():
    bars = []
    for row in (ROW | PEAKS, ROW):
        progress = Progress(total=4, start=0, every=1, stream=Terminal())
        assert progress.bar is not None  # a terminal: the tqdm bar
        progress.update(row)
        bars.append(progress.bar.postfix)
        progress.close()
    assert "mem=12.3 GiB (14.0 reserved)" in bars[0] and "tok_s=1,234" in bars[0]
    assert "mem" not in bars[1] and "tok_s=1,234" in bars[1]


def test_peak_memory_text():
    assert peak_memory_text(PEAKS) == "12.3 GiB (14.0 reserved)"
    assert peak_memory_text({"peak_allocated_gib": 0.5}) == "0.5 GiB"
    assert peak_memory_text(ROW) is None


def test_a_run_passes_its_peaks_to_metrics_progress_and_card(tiny_llama, tmp_path, monkeypatch, capsys):
    """model.cuda.peak_memory replaced where fit reads it (CUDA itself is left alone): each logged step's reading
    reaches its metrics row and its progress line, and the card states the highest of them, not the last."""
    readings = iter([(1.5, 2.0), (3.3, 4.5), (2.0, 4.7)])

    def fake_peak_memory(device):
        allocated, reserved = next(readings)
        return {"peak_allocated_gib": allocated, "peak_reserved_gib": reserved}

    monkeypatch.setattr("qlorakit.train.fit.peak_memory", fake_peak_memory)
    data = write_jsonl(tmp_path / "d.jsonl", airoboros_rows(6))
    out = tmp_path / "run"
    train_with(["--model_name_or_path", str(tiny_llama), "--dataset", str(data), "--output_dir", str(out),
                "--max_steps", "3", "--logging_steps", "1", "--save_strategy", "no", "--eval_strategy", "no",
                "--bf16", "false"])
    rows = read_metrics(out, "loss")
    assert [(r["peak_allocated_gib"], r["peak_reserved_gib"]) for r in rows] == [(1.5, 2.0), (3.3, 4.5), (2.0, 4.7)]
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("step ")]
    assert [ln.split(" mem ")[1].split(" left")[0] for ln in lines] == \
        ["1.5 GiB (2.0 reserved)", "3.3 GiB (4.5 reserved)", "2.0 GiB (4.7 reserved)"]
    card = (out / "README.md").read_text()
    assert "Peak GPU memory in training: 3.30 GiB allocated, 4.70 GiB reserved" in card
