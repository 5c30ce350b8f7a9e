"""The run directory's loss.png: the training loss smoothed (an exponential moving average, as TensorBoard smooths)
over the faint raw curve, and the evaluation losses as markers."""

from __future__ import annotations

import math
from pathlib import Path

SMOOTHING = 0.6  # TensorBoard's default weight: each point keeps 60% of the average before it


def smooth(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """The debiased exponential moving average of ``values`` (TensorBoard's smoothing): the average starts at zero
    and is divided by 1 - weight**n, so the first points are not pulled toward zero. A value that is not finite
    (a skipped step) leaves the average as it was."""
    out, average, n = [], 0.0, 0
    for v in values:
        if v is not None and math.isfinite(v):
            average, n = average * weight + (1 - weight) * v, n + 1
        out.append(average / (1 - weight ** n) if n else math.nan)
    return out


def loss_figure(metrics: list[dict]):
    """The figure (matplotlib, Agg): raw training loss, its smoothed curve and the eval points, by epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [m for m in metrics if "loss" in m]
    evals = [m for m in metrics if "eval_loss" in m]
    epochs, losses = [m["epoch"] for m in train], [m["loss"] for m in train]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    raw, = ax.plot(epochs, [math.nan if v is None else v for v in losses], lw=1, alpha=0.3, label="train (raw)")
    ax.plot(epochs, smooth(losses), lw=1.8, color=raw.get_color(), label=f"train (smoothed, EMA {SMOOTHING})")
    if evals:
        ax.plot([m["epoch"] for m in evals], [m["eval_loss"] for m in evals], "o", label="eval")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss per trained token")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_loss(metrics: list[dict], path: Path) -> bool:
    """loss.png (``loss_figure``); False when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    import matplotlib.pyplot as plt

    fig = loss_figure(metrics)
    fig.savefig(path)
    plt.close(fig)
    return True
