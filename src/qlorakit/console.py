"""Quiet third-party noise a user cannot act on (library deprecation notices, telemetry, progress bars of
loaders), set once by every entry point before the libraries load."""

from __future__ import annotations

import logging
import os
import sys

# bitsandbytes logs this when it is imported on a CPU without the optional 'kernels' package; it then uses its own
# CPU kernels, which is what qlorakit tests on. Only this message is dropped: the logger's other records still show.
BNB_KERNELS_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


def _not_the_kernels_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(BNB_KERNELS_NOTICE)


def quiet_libraries() -> None:
    """Set before bitsandbytes, transformers and peft are imported (each command calls it first)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_not_the_kernels_notice)  # idempotent
    import warnings

    warnings.filterwarnings("ignore", message=".*Paged optimizers are not supported on CPU.*")
    # Deprecation notices from libraries about their own internals are not the user's to act on.
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers|peft")
    _quiet_datasets()
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _quiet_datasets() -> None:
    """datasets' info logs and progress bars (its loaders, the tokenizing map of the data cache): through the
    variables it reads when imported, so no command pays for importing it; directly where it was imported already."""
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "datasets" in sys.modules:
        import datasets

        datasets.utils.logging.set_verbosity_error()
        datasets.disable_progress_bars()


def _is_ours(record: logging.LogRecord) -> bool:
    return record.name == "qlorakit" or record.name.startswith("qlorakit.")


def _printed_by_its_library(name: str) -> bool:
    """Whether a record of logger ``name`` meets a handler before the root's: the hub client, datasets and
    transformers each print their records with a handler of their own."""
    logger: logging.Logger | None = logging.getLogger(name)
    while logger is not None and logger is not logging.root:
        if logger.handlers or not logger.propagate:
            return True
        logger = logger.parent
    return False


def _once(record: logging.LogRecord) -> bool:
    """qlorakit's records; a library's warnings only where its own handler did not print them already."""
    return _is_ours(record) or (record.levelno >= logging.WARNING and not _printed_by_its_library(record.name))


class _Prefixed(logging.Formatter):
    """``qlorakit: message`` for qlorakit's records, ``peft: message`` (its package) for a library's."""

    def format(self, record: logging.LogRecord) -> str:
        who = "qlorakit" if _is_ours(record) else record.name.split(".")[0]
        return f"{who}: {super().format(record)}"


def log_to_stderr(level: int) -> None:
    """qlorakit's log on stderr at ``level``, where the process has no logging set up yet (an application embedding
    qlorakit, or pytest, keeps its own). The handler sits at the root, so records of libraries without a handler of
    their own still show, once; those of libraries that print their own (the hub client's retries, datasets') are
    not printed a second time under qlorakit's name."""
    root = logging.getLogger()
    if root.handlers:
        return
    logging.getLogger("qlorakit").setLevel(level)  # the root stays at WARNING: libraries' info is not the user's
    handler = logging.StreamHandler()  # stderr
    handler.addFilter(_once)
    handler.setFormatter(_Prefixed("%(message)s"))
    root.addHandler(handler)
