"""What the commands that use a run (merge, export, eval, chat, generate) share: ``RUN_DIR --key value ...``
parsing, and where a run directory (or a checkpoint in it) keeps its files."""

from __future__ import annotations

from pathlib import Path

from .errors import UserError


def run_options(argv: list[str], defaults: dict[str, str], usage: str) -> tuple[Path, dict[str, str]]:
    """The leading RUN_DIR and ``defaults`` updated by ``--key value`` pairs (``--some-key`` = ``--some_key``).

    A missing RUN_DIR, a key not in ``defaults`` or a key without a value is a one-line error that ends with
    ``usage``."""
    if not argv or argv[0].startswith("-"):
        raise UserError(usage)
    opts, rest = dict(defaults), argv[1:]
    for i in range(0, len(rest), 2):
        key = rest[i].lstrip("-").replace("-", "_")
        if not rest[i].startswith("--"):
            raise UserError(f"unexpected {rest[i]!r} (options are --key value pairs); {usage}")
        if key not in defaults:
            raise UserError(f"unknown option {rest[i]}; {usage}")
        if i + 1 >= len(rest):
            raise UserError(f"{rest[i]} needs a value; {usage}")
        opts[key] = rest[i + 1]
    return Path(argv[0]), opts
