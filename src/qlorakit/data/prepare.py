"""The data of a run in one call: sources -> cached examples -> the mixture -> train and eval sequences + report.

    data = prepare_data(DataOptions.from_config(cfg), tokenizer)          # rank 0, or a single process
    data = prepare_data(DataOptions.from_config(cfg), tokenizer, mode="wait")  # other ranks, after a barrier

``data.train[i]`` / ``data.eval[i]`` are ``Example``s read from memory-mapped Arrow files, ``data.train.lengths``
their lengths; ``data.lines`` are the log lines and ``data.sources`` the per-source summary for the model card.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..errors import UserError
from .build import BLANK, Recipe, detect_layout, tokenize_part
from .cache import cache_key, cached, default_cache_dir, tokenizer_fingerprint
from .examples import ExampleSequence, ExampleStore, PartInfo
from .formats import DataError, Fields
from .mixture import SourceSummary, assemble, held_out, select_rows
from .reading import content_fingerprint, open_parts
from .sources import SourceSpec, parse_dataset_arg, parse_dataset_list
from .tokenize import STATUSES, policy_lines


@dataclass(frozen=True)
class DataOptions:
    """What decides a run's examples (the config's data keys)."""

    sources: tuple[SourceSpec, ...]
    eval_sources: tuple[SourceSpec, ...] = ()
    eval_size: float = 0.0  # held out of the training rows: a count (>= 1) or a fraction; unused with eval_sources
    seed: int = 42
    prompt_format: str = "airoboros"
    model_max_len: int = 1024
    truncation: str = "truncate"
    train_on_source: bool = False
    cache_dir: str = ""  # "" = default_cache_dir()
    num_proc: int = 0  # processes that tokenize; 0 = as many as pay
    source_max_len: int = 0  # qlora's cut of each prompt and each reply, in tokens (0 = none)
    target_max_len: int = 0

    @classmethod
    def from_config(cls, cfg) -> DataOptions:
        """The options of a TrainConfig: ``dataset`` (compact syntax) or ``datasets`` (a YAML list), the same for
        eval, and the keys that shape examples. Keys a config does not have yet take their defaults."""
        fmt = cfg.dataset_format
        listed, eval_listed = getattr(cfg, "datasets", None), getattr(cfg, "eval_datasets", None)
        if listed and cfg.dataset not in ("", "default"):
            raise DataError("give the training data as 'dataset' or as a 'datasets' list, not both")
        sources = parse_dataset_list(listed, "datasets", fmt) if listed else \
            parse_dataset_arg(cfg.dataset or "default", "dataset", fmt)
        if eval_listed:
            evals = parse_dataset_list(eval_listed, "eval_datasets", fmt)
        else:
            evals = parse_dataset_arg(cfg.eval_dataset, "eval_dataset", fmt) if cfg.eval_dataset else []
        data_seed = getattr(cfg, "data_seed", -1)  # the split's and the mixture's seed; -1: the run's seed
        return cls(tuple(sources), tuple(evals), cfg.eval_dataset_size, cfg.seed if data_seed < 0 else data_seed,
                   cfg.prompt_format, cfg.model_max_len, cfg.truncation, cfg.train_on_source,
                   getattr(cfg, "data_cache_dir", ""), getattr(cfg, "data_num_proc", 0),
                   getattr(cfg, "source_max_len", 0), getattr(cfg, "target_max_len", 0))

    def cache_root(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else default_cache_dir()


@dataclass
class Loaded:
    """One source's cached examples, as loaded or just built."""

    spec: SourceSpec
    table: object  # pyarrow.Table, memory-mapped
    parts: list[PartInfo]
    part_rows: list[int]
    meta: dict
    state: str  # built or loaded
    folder: Path
    sha256: dict[str, str]


@dataclass
class PreparedData:
    train: ExampleSequence
    eval: ExampleSequence
    lines: list[str]  # for the log, in order
    sources: list[SourceSummary]  # for the model card: every source with the rows it gave
    fingerprint: str  # of every input that decides which examples the run sees, in which order


def _build_source(spec: SourceSpec, recipe: Recipe, tokenizer, num_proc: int, folder: Path) -> dict:
    """Tokenize every row of ``spec`` into ``folder``; the meta that describes what was written."""
    t0 = time.perf_counter()
    parts, layouts, infos, procs = open_parts(spec, folder), [], [], 1
    for i, part in enumerate(parts):
        layout = detect_layout(part, spec.layout, recipe.fields)
        recipe_i = dataclasses.replace(recipe, layout=layout)
        result, p = tokenize_part(part, recipe_i, tokenizer, folder / f"examples-{i}.arrow", num_proc)
        procs = max(procs, p)
        layouts.append(layout)
        infos.append({"jsonl": part.jsonl, "rows": len(result),
                      "files": [Path(f["filename"]).name for f in result.cache_files]})
    for raw in folder.glob("raw-*"):
        shutil.rmtree(raw, ignore_errors=True)  # the raw rows' copies: the examples are what is kept
    return {"source": spec.describe(), "kind": spec.kind(), "layouts": layouts, "parts": infos,
            "seconds": round(time.perf_counter() - t0, 3), "processes": procs,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _labels(spec: SourceSpec, count: int) -> list[str]:
    from .reading import data_files

    if spec.kind() in ("hub", "arrow"):
        return [spec.describe() if spec.kind() == "hub" else spec.path] * count
    return [str(f) for f in data_files(spec)]


def load_source(spec: SourceSpec, opts: DataOptions, tokenizer, tok_fp: str, mode: str,
                wait_timeout_s: float = 3600.0) -> Loaded:
    """The source's examples from the cache, built first where they are not there yet (``mode="build"``)."""
    import pyarrow as pa

    content, sha = content_fingerprint(spec)
    recipe = Recipe(spec.layout, Fields(spec.columns), opts.prompt_format, opts.model_max_len,
                    opts.truncation, opts.train_on_source, opts.source_max_len, opts.target_max_len)
    key = cache_key(content=content, split=spec.split, subset=spec.subset, format=spec.layout, columns=spec.columns,
                    tokenizer=tok_fp, prompt_format=opts.prompt_format, model_max_len=opts.model_max_len,
                    truncation=opts.truncation, train_on_source=opts.train_on_source,
                    source_max_len=opts.source_max_len, target_max_len=opts.target_max_len)
    folder, meta, state = cached(opts.cache_root(), key, lambda tmp: _build_source(spec, recipe, tokenizer,
                                                                                   opts.num_proc, tmp),
                                 mode, wait_timeout_s)
    tables = [pa.ipc.open_stream(pa.memory_map(str(folder / f))).read_all()
              for info in meta["parts"] for f in info["files"]]
    labels = _labels(spec, len(meta["parts"]))
    parts = [PartInfo(label, info["jsonl"]) for label, info in zip(labels, meta["parts"])]
    table = pa.concat_tables(tables) if tables else None
    return Loaded(spec, table, parts, [info["rows"] for info in meta["parts"]], meta, state, folder, sha)


def prepare_data(opts: DataOptions, tokenizer, *, mode: str = "build", wait_timeout_s: float = 3600.0) -> PreparedData:
    """Train and eval examples of ``opts`` and the lines that account for every row.

    ``mode="build"`` tokenizes what the cache lacks (one process: rank 0); ``mode="wait"`` waits up to
    ``wait_timeout_s`` for the cache another process builds, then loads it (the other ranks of a torchrun job).
    """
    tok_fp = tokenizer_fingerprint(tokenizer)
    train_src = [load_source(s, opts, tokenizer, tok_fp, mode, wait_timeout_s) for s in opts.sources]
    eval_src = [load_source(s, opts, tokenizer, tok_fp, mode, wait_timeout_s) for s in opts.eval_sources]
    everything = train_src + eval_src
    store = ExampleStore([x.table for x in everything], [x.parts for x in everything],
                         [x.part_rows for x in everything])
    rows = [np.flatnonzero(store.status[a:b] != BLANK) + a
            for a, b in zip(store.source_start[:-1], store.source_start[1:])]
    for x, r in zip(everything, rows):
        if not len(r):
            raise DataError(f"{x.spec.path}: the file has no rows" if x.spec.kind() != "hub"
                            else f"{x.spec.describe()}: the dataset has no rows")
    uses = [select_rows(len(r), x.spec, opts.seed, i) for i, (x, r) in enumerate(zip(everything, rows))]
    n_train = len(train_src)
    pool_sizes = [len(u.pool) for u in uses[:n_train]]
    held = held_out(sum(pool_sizes), opts.eval_size, opts.seed) if not eval_src else np.zeros(sum(pool_sizes), bool)
    train_pos, eval_pos = assemble(rows[:n_train], uses[:n_train], held)
    if eval_src:  # the training sources hold nothing out; each eval source gives all its rows
        eval_pos = eval_pos + [r[u.pool] for r, u in zip(rows[n_train:], uses[n_train:])]
    return _finish(store, everything, uses, train_pos, eval_pos, opts)


def _finish(store, everything: list[Loaded], uses, train_pos, eval_pos, opts: DataOptions) -> PreparedData:
    n_train = len(train_pos)
    train_all, eval_all = np.concatenate(train_pos), np.concatenate(eval_pos) if eval_pos else np.zeros(0, int)
    train = ExampleSequence(store, store.usable(train_all))
    evals = ExampleSequence(store, store.usable(eval_all))
    if not len(train):
        raise UserError("no training example left after applying model_max_len; raise model_max_len or "
                        "check the data with 'qlorakit data check'")
    summaries = []
    for i, (x, use) in enumerate(zip(everything, uses)):
        mine = train_pos[i] if i < n_train else np.zeros(0, int)
        theirs = eval_pos[i]
        both = np.concatenate([mine, theirs])
        summaries.append(SourceSummary(
            x.spec.describe(), x.meta["kind"], "+".join(sorted(set(x.meta["layouts"]))),
            "train" if i < n_train else "eval", int((store.status[store.source == i] != BLANK).sum()),
            len(use.pool), x.spec.weight, x.spec.max_rows, len(store.usable(mine)), len(store.usable(theirs)),
            store.policy_counts(both, opts.model_max_len)["truncated"][0],
            int((store.status[both] >= STATUSES.index("dropped_too_long")).sum()), x.state, str(x.folder), x.sha256))
    lines = report_lines(store, everything, summaries, train_all, eval_all, opts)
    blob = json.dumps([[str(x.folder.name) for x in everything], [s.selection() for s in summaries], opts.seed,
                       opts.eval_size, len(train), len(evals)])
    return PreparedData(train, evals, lines, summaries, hashlib.sha256(blob.encode()).hexdigest()[:32])


def _policy(store: ExampleStore, pos: np.ndarray, max_len: int) -> list[str]:
    return policy_lines(len(store.usable(pos)), store.policy_counts(pos, max_len))


def report_lines(store, everything: list[Loaded], summaries: list[SourceSummary], train_all, eval_all,
                 opts: DataOptions) -> list[str]:
    """The log's account of the data: sources, split, length policy, mixture and cache, shaped as before."""
    train_sums = [s for s in summaries if s.role == "train"]
    lines = [f"data: {s.rows} rows from {s.name}" + (f", {s.used} used ({s.selection()})" if s.used != s.rows or
                                                      s.weight else "") for s in train_sums]
    pool = sum(s.used for s in train_sums)
    if any(s.role == "eval" for s in summaries):
        lines += [f"eval: {s.rows} rows from {s.name}" for s in summaries if s.role == "eval"]
    elif len(eval_all):
        lines.append(f"eval: {len(eval_all)} of {pool} rows held out (seed {opts.seed})")
    else:
        lines.append("eval: none (set eval_dataset_size or eval_dataset)")
    lines += [f"train: {x}" for x in _policy(store, train_all, opts.model_max_len)]
    if len(eval_all):
        lines += [f"eval: {x}" for x in _policy(store, eval_all, opts.model_max_len)]
    if len(summaries) > 1 or any(s.weight or s.max_rows for s in summaries):
        lines += [s.line() for s in summaries]
    for x in everything:
        what = (f"tokenized in {x.meta['seconds']:.1f} s with {x.meta['processes']} process"
                f"{'es' if x.meta['processes'] > 1 else ''}") if x.state == "built" else \
            f"loaded (tokenized {x.meta['created']})"
        lines.append(f"data cache: {x.spec.describe()} {what}: {x.folder}")
    return lines
