"""The tokenized cache: each source's examples under a key made of everything that decides them.

The key hashes the source's content, its layout and column mapping, the tokenizer, the prompt format, the length
policy and the code that makes examples, so a second run with the same inputs (and every resume) loads the examples
instead of tokenizing, and any change builds them anew. A build writes into a temporary folder and renames it into
place, so a reader never sees half a cache; a file lock keeps two builders of one key from both working. Under
torchrun one rank builds (``mode="build"``) and the others wait for the folder to appear (``mode="wait"``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from .formats import DataError

CACHE_FORMAT = 2  # bump when the stored columns change
_CODE = ("formats.py", "pairs.py", "templates.py", "tokenize.py", "build.py")  # the modules that decide an example


def default_cache_dir() -> Path:
    """$QLORAKIT_DATA_CACHE, else $XDG_CACHE_HOME/qlorakit/data, else ~/.cache/qlorakit/data."""
    if os.environ.get("QLORAKIT_DATA_CACHE"):
        return Path(os.environ["QLORAKIT_DATA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qlorakit" / "data"


def tokenizer_fingerprint(tokenizer) -> str:
    """A digest of what the tokenizer does to text: its vocabulary and rules, special tokens and chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        if backend.truncation is not None or backend.padding is not None:  # call settings, not the tokenizer
            from tokenizers import Tokenizer

            backend = Tokenizer.from_str(backend.to_str())
            backend.no_truncation(), backend.no_padding()
        h.update(backend.to_str().encode())
    else:  # a tokenizer without a Rust backend: its pickled state
        from datasets.fingerprint import Hasher

        h.update(Hasher.hash(tokenizer).encode())
    from .tokenize import bos_ids

    extra = {"class": type(tokenizer).__name__, "special": getattr(tokenizer, "special_tokens_map", {}),
             "chat_template": getattr(tokenizer, "chat_template", None), "bos": bos_ids(tokenizer),
             "size": len(tokenizer)}
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def code_fingerprint() -> str:
    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for name in _CODE:
        h.update((here / name).read_bytes())
    return h.hexdigest()


def cache_key(**parts) -> str:
    """A short hex key of ``parts`` (JSON-serializable values) with the cache format and the code's digest."""
    blob = json.dumps({"cache_format": CACHE_FORMAT, "code": code_fingerprint(), **parts}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _read_meta(folder: Path) -> dict:
    return json.loads((folder / "meta.json").read_text(encoding="utf-8"))


def cached(root: Path, key: str, build: Callable[[Path], dict], mode: str = "build",
           wait_timeout_s: float = 3600.0) -> tuple[Path, dict, str]:
    """The cache folder of ``key`` under ``root``, its meta, and "loaded" or "built".

    ``mode="build"``: load it, or build it with ``build(tmp_folder) -> meta`` under a lock.
    ``mode="wait"``: never build; wait until another process (rank 0) has, then load it.
    """
    if mode not in ("build", "wait"):
        raise ValueError(f"mode must be 'build' or 'wait', got {mode!r}")
    final = root / key
    if (final / "meta.json").is_file():
        return final, _read_meta(final), "loaded"
    if mode == "wait":
        deadline = time.monotonic() + wait_timeout_s
        while not (final / "meta.json").is_file():
            if time.monotonic() > deadline:
                raise DataError(f"data cache: waited {wait_timeout_s:.0f} s for {final} to be built by another "
                                "process; is the cache folder shared by every process of the job?")
            time.sleep(0.2)
        return final, _read_meta(final), "loaded"
    root.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(str(root / f"{key}.lock")):
        if (final / "meta.json").is_file():  # built by another process while this one waited for the lock
            return final, _read_meta(final), "loaded"
        for stale in list(root.glob(f".{key}.tmp-*")) + ([final] if final.exists() else []):
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed build: only the lock holder builds
        tmp = root / f".{key}.tmp-{os.getpid()}"
        try:
            tmp.mkdir()
            meta = build(tmp)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")  # written last
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final, meta, "built"
