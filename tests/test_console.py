"""What every command prints besides its own output: third-party notices a user cannot act on are dropped, one by
one, not whole loggers."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from qlorakit.console import BNB_KERNELS_NOTICE, quiet_libraries


def test_a_command_that_loads_bitsandbytes_does_not_print_its_kernels_notice(run_dir):
    plain = subprocess.run([sys.executable, "-c", "import bitsandbytes"], capture_output=True, text=True, timeout=300)
    if BNB_KERNELS_NOTICE not in plain.stderr:
        pytest.skip("this bitsandbytes does not log the kernels notice on import (the 'kernels' package is there?)")
    from qlorakit.config import load_run_config

    assert load_run_config(run_dir).bits == 4  # so chat loads its base through bitsandbytes
    proc = subprocess.run([sys.executable, "-m", "qlorakit", "chat", str(run_dir), "--max_new_tokens", "2"],
                          input="hello\n", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert BNB_KERNELS_NOTICE not in proc.stderr and "kernels-community" not in proc.stderr, proc.stderr


def test_only_that_notice_is_dropped(caplog):
    quiet_libraries()
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger=log.name):
        log.warning(BNB_KERNELS_NOTICE + ": %s. Please make sure ...", "No module named 'kernels'")  # as bnb does
        log.warning("something else went wrong")
    assert [r.getMessage() for r in caplog.records] == ["something else went wrong"]


@pytest.mark.parametrize("imported_first", [False, True])
def test_datasets_logs_and_progress_bars_are_quiet(imported_first):
    """Through the variables datasets reads at import (no command pays for importing it), or directly where it was
    imported before."""
    code = ("import datasets\n" if imported_first else "") + (
        "from qlorakit.console import quiet_libraries\nquiet_libraries()\nimport datasets, logging\n"
        "print(datasets.utils.logging.get_verbosity() == logging.ERROR, datasets.is_progress_bar_enabled())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items()
                               if k not in ("DATASETS_VERBOSITY", "HF_DATASETS_DISABLE_PROGRESS_BARS")})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "False"], proc.stdout
