"""Quiet third-party noise a user cannot act on (library deprecation notices, telemetry, progress bars of
loaders), set once by every entry point before the libraries load."""

from __future__ import annotations

import os


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import warnings

    warnings.filterwarnings("ignore", message=".*Paged optimizers are not supported on CPU.*")
    # Deprecation notices from libraries about their own internals are not the user's to act on.
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers|peft")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
