"""``qlorakit data check``: what the model will see, before anyone spends GPU hours."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..config import TrainConfig
from .formats import read_jsonl
from .tokenize import IGNORE, tokenize_all, tokenize_conversation


def percentile(sorted_values: list[int], q: float) -> int:
    if not sorted_values:
        return 0
    k = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


def marked_example(ex, tokenizer) -> str:
    """The example's text with trained spans between « and »."""
    out, trained = [], False
    for tok, lab in zip(ex.input_ids, ex.labels):
        now = lab != IGNORE
        if now != trained:
            out.append("«" if now else "»")
            trained = now
        out.append(tokenizer.decode([tok]))
    if trained:
        out.append("»")
    return "".join(out)


def check_file(cfg: TrainConfig, tokenizer_for: Callable[[TrainConfig], object]) -> str:
    """The report of ``qlorakit data check``; ``tokenizer_for(cfg)`` loads the tokenizer once the rows are valid."""
    convs = read_jsonl(Path(cfg.dataset), cfg.dataset_format)  # bad data is reported before any model loads
    tokenizer = tokenizer_for(cfg)
    full = [tokenize_conversation(c, tokenizer, cfg.prompt_format, cfg.train_on_source) for c in convs]
    lengths = sorted(len(e) for e in full)
    over = [e.source for e in full if len(e) > cfg.model_max_len]
    kept, report = tokenize_all(convs, tokenizer, cfg.prompt_format, cfg.model_max_len, cfg.truncation,
                                cfg.train_on_source)
    trained = sum(e.n_trained for e in kept)
    total = sum(len(e) for e in kept)
    pct = " ".join(f"p{q}={percentile(lengths, q)}" for q in (0, 50, 90, 99, 100))
    lines = [
        f"file: {cfg.dataset}",
        f"rows: {len(convs)}",
        f"prompt format: {cfg.prompt_format}",
        f"tokens per row: {pct} (mean {sum(lengths) / len(lengths):.0f})",
        f"rows over model_max_len {cfg.model_max_len}: {len(over)}"
        + (f" (policy '{cfg.truncation}'; e.g. {', '.join(over[:3])})" if over else ""),
        *[f"after the length policy: {x}" for x in report.lines()],
        f"trained tokens: {trained} of {total} ({100 * trained / max(total, 1):.1f}%)",
        "",
        f"example ({full[0].source}), trained spans between « and »:",
        marked_example(full[0], tokenizer),
    ]
    return "\n".join(lines)
