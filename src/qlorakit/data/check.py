"""``qlorakit data check``: what the model will see, before anyone spends GPU hours.

Works on every kind of source and on a mixture: each source gets its block (rows, token lengths, rows over the
limit, what the length policy did, the trained share), a mixture adds the rows each source gives the run, and one
example is shown with its trained spans marked. The examples it tokenizes are the cache the next run loads.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..config import TrainConfig
from .build import BLANK
from .examples import ExampleStore
from .prepare import DataOptions, load_source, prepare_data
from .tokenize import IGNORE, PAIR, policy_lines, preference_parts


def percentile(sorted_values: list[int], q: float) -> int:
    if not len(sorted_values):
        return 0
    k = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return int(sorted_values[k])


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


def marked_preference(ex, tokenizer) -> list[str]:
    """A preference example's spans: the prompt (shared, tokenized once), then each completion between « and »."""
    prompt, comps = preference_parts(ex)
    names = ("chosen", "rejected") if ex.pref[0] == PAIR else \
        ("desirable completion" if ex.pref[0] == PAIR + 1 else "undesirable completion",)
    return [f"prompt ({len(prompt)} tokens): {''.join(tokenizer.decode([t]) for t in prompt)}"] + \
        [f"{name} ({len(c)} tokens): «{''.join(tokenizer.decode([t]) for t in c)}»" for name, c in zip(names, comps)]


def source_block(store: ExampleStore, source: int, name: str, opts: DataOptions) -> list[str]:
    """The report of one source: every row of it, before any mixture weight."""
    pos = np.flatnonzero((store.source == source) & (store.status != BLANK))
    lengths = np.sort(store.full_length[pos])
    over = pos[store.full_length[pos] > opts.model_max_len]
    usable = store.usable(pos)
    changed = store.policy_counts(pos, opts.model_max_len)
    trained, total = int(store.trained[usable].sum()), int(store.length[usable].sum())
    pct = " ".join(f"p{q}={percentile(lengths, q)}" for q in (0, 50, 90, 99, 100))
    return [
        f"file: {name}",
        f"rows: {len(pos)}",
        f"prompt format: {opts.prompt_format}",
        f"tokens per row: {pct} (mean {lengths.mean() if len(lengths) else 0:.0f})",
        f"rows over model_max_len {opts.model_max_len}: {len(over)}"
        + (f" (policy '{opts.truncation}'; e.g. {', '.join(store.where(int(p)) for p in over[:3])})"
           if len(over) else ""),
        *[f"after the length policy: {x}" for x in policy_lines(len(usable), changed)],
        f"trained tokens: {trained} of {total} ({100 * trained / max(total, 1):.1f}%)",
    ]


def check_data(opts: DataOptions, tokenizer) -> str:
    """The report of ``qlorakit data check`` for every source of ``opts``; a mixture adds its summary lines."""
    specs = list(opts.sources) + list(opts.eval_sources)
    from .cache import tokenizer_fingerprint

    tok_fp = tokenizer_fingerprint(tokenizer)
    loaded = [load_source(s, opts, tokenizer, tok_fp, "build") for s in specs]
    store = ExampleStore([x.table for x in loaded], [x.parts for x in loaded], [x.part_rows for x in loaded])
    lines: list[str] = []
    for i, spec in enumerate(specs):
        lines += ([""] if lines else []) + source_block(store, i, spec.describe(), opts)
    if len(specs) > 1 or any(s.weight or s.max_rows for s in specs):
        data = prepare_data(opts, tokenizer)  # the sources are cached now: this only draws the mixture
        lines += [""] + [x for x in data.lines if x.startswith(("mixture:", "eval:"))]
    first = store.usable(np.arange(len(store)))
    if len(first):
        ex = store.example(int(first[0]))
        shown = marked_preference(ex, tokenizer) if ex.pref else [marked_example(ex, tokenizer)]
        lines += ["", f"example ({ex.source}), trained spans between « and »:", *shown]
    return "\n".join(lines)


def check_file(cfg: TrainConfig, tokenizer_for: Callable[[TrainConfig], object]) -> str:
    """``check_data`` for a TrainConfig: its dataset (one source, or a mixture in the compact syntax)."""
    opts = DataOptions.from_config(cfg)
    for spec in list(opts.sources) + list(opts.eval_sources):
        spec.kind()  # a missing file is reported before the tokenizer loads
    return check_data(opts, tokenizer_for(cfg))
