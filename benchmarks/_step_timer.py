"""The step timer of the loop benchmarks (step_time.py, levers_cost.py): an ``accumulate`` hook for
``qlorakit.train.loop.Hooks`` that times each optimizer step's forward and backward (``step.accumulate``). They run
as scripts, so this folder is on sys.path and they import it by name."""

from __future__ import annotations

import time
from typing import Callable


def timed_accumulate(seconds: list[float]) -> Callable[..., float]:
    """``step.accumulate``, each call's wall seconds appended to ``seconds``; what it returns unchanged."""
    from qlorakit.train.step import accumulate

    def timed(*a, **k):
        t0 = time.perf_counter()
        out = accumulate(*a, **k)
        seconds.append(time.perf_counter() - t0)
        return out

    return timed
