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


def test_every_lever_is_costed_against_the_responses_only_baseline_and_the_prompt_weight_against_it_too():
    """qlorakit's default prompt loss weight is 0.1: a lever measured without naming 0 would carry it, and its cost
    would include the prompt weight's. Each variant's own flags say the weight; only prompt_weight says 0.1."""
    import levers_cost  # BENCH is on the path (above)

    def weight(flags):
        return dict(zip(flags[::2], flags[1::2])).get("--prompt_loss_weight")
    assert {v: weight(f) for v, f in levers_cost.VARIANTS.items()} == (
        {v: "0" for v in levers_cost.VARIANTS} | {"prompt_weight": "0.1"})
