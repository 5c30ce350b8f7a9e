"""Progress bar on a terminal, plain log lines elsewhere, and metrics.jsonl."""

from __future__ import annotations

import json
import math
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("qlorakit")


def fmt_seconds(s: float) -> str:
    s = int(max(0, s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


def peak_memory_text(row: dict) -> str | None:
    """A metrics row's CUDA peaks (``model.cuda.peak_memory``) as "12.3 GiB (14.0 reserved)"; None where the row has
    none (a run on a CPU)."""
    allocated, reserved = row.get("peak_allocated_gib"), row.get("peak_reserved_gib")
    if allocated is None:
        return None
    return f"{allocated:.1f} GiB" + (f" ({reserved:.1f} reserved)" if reserved is not None else "")


class Progress:
    """Shows loss, learning rate, tokens/s, peak GPU memory and time left, every ``every`` steps (a bar on a
    terminal)."""

    def __init__(self, total: int, start: int, every: int, enabled: bool = True, stream=None):
        self.total, self.every, self.enabled = total, every, enabled
        self.stream = stream or sys.stderr
        self.t0, self.start = time.perf_counter(), start
        self.bar = None
        if enabled and self.stream.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", file=self.stream,
                            dynamic_ncols=True)

    def update(self, row: dict) -> None:
        """Show a step's metrics row (step, epoch, loss, learning_rate, tokens_per_second, and the CUDA peak memory
        where the row has it)."""
        if not self.enabled:
            return
        step, mem = row["step"], peak_memory_text(row)
        shown = {"loss": f"{row['loss']:.4f}", "lr": f"{row['learning_rate']:.2e}",
                 "tok_s": f"{row['tokens_per_second']:,.0f}"} | ({"mem": mem} if mem else {})
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(shown, refresh=False)
            return
        if step % self.every and step != self.total:
            return
        done = step - self.start
        left = (time.perf_counter() - self.t0) / done * (self.total - step) if done else 0.0
        print(f"step {step}/{self.total} epoch {row['epoch']:.2f} loss {shown['loss']} lr {shown['lr']} "
              f"tok/s {shown['tok_s']}{f' mem {mem}' if mem else ''} left {fmt_seconds(left)}", file=self.stream,
              flush=True)

    def write(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _step(line: str) -> float:
    """The step of a metrics row; infinite for a line a killed run left half-written, so it is dropped."""
    try:
        return json.loads(line).get("step", 0)
    except (json.JSONDecodeError, AttributeError):
        return float("inf")


class Metrics:
    """Appends one JSON object per line to ``metrics.jsonl``; a resumed run truncates rows past its step."""

    def __init__(self, path: Path, resume_step: int | None = None, enabled: bool = True, also=None):
        """``also``: called with each row written too (the run's trackers)."""
        self.path, self.enabled, self.also = path, enabled, also
        if not enabled:
            return
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            keep = [ln for ln in path.read_text().splitlines() if ln and _step(ln) <= resume_step]
            path.write_text("".join(ln + "\n" for ln in keep))

    def write(self, row: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                # NaN and inf are not JSON: a skipped non-finite step is written as null
                clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
                f.write(json.dumps(clean) + "\n")
            if self.also is not None:
                self.also(clean)

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(ln) for ln in self.path.read_text().splitlines() if ln]
