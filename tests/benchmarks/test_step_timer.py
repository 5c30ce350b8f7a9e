"""benchmarks/_step_timer.py: the accumulate hook step_time.py and levers_cost.py time their steps with (one copy,
not one per script)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from helpers import lora_model, random_examples
from qlorakit.data.batching import collate
from qlorakit.train.step import accumulate

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

from _step_timer import timed_accumulate  # noqa: E402


def test_the_timed_hook_returns_what_accumulate_does_and_times_each_call(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = lora_model(AutoModelForCausalLM.from_pretrained(tiny_llama, torch_dtype=torch.float32), 0.0, False)
    batch = collate(random_examples([6, 4]), 0, True)
    cpu, seconds = torch.device("cpu"), []
    timed = timed_accumulate(seconds)
    got = [timed(model, [batch], cpu, False, 8) for _ in range(2)]
    assert got == [accumulate(model, [batch], cpu, False, 8)] * 2
    assert len(seconds) == 2 and all(s >= 0 for s in seconds)


def test_both_loop_benchmarks_use_it():
    for script in ("step_time.py", "levers_cost.py"):
        text = (BENCH / script).read_text()
        assert "from _step_timer import timed_accumulate" in text and "timed_accumulate(seconds)" in text, script
        assert "def timed(" not in text, f"{script} has its own copy of the timer again"
