"""Command line: each subcommand parses, builds a config, and calls one library function.

Mistakes a user can fix (UserError) end in one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import os
import sys

from .console import quiet_libraries
from .errors import UserError

USAGE = """usage: qlorakit COMMAND ...

commands:
  train [CONFIG.yaml] [--key value ...]   fine-tune (no arguments: the embedded default job)
  data check FILE [--key value ...]       rows, token lengths, trained share, a rendered example
  merge RUN_DIR --output DIR              adapter merged into the base: a plain transformers model
  export RUN_DIR --format gguf --output FILE   a GGUF file for llama.cpp
  chat RUN_DIR                            talk to the tuned model in its training format
  generate RUN_DIR --input FILE --output FILE  answer a JSONL of prompts
  eval RUN_DIR --dataset FILE             loss, perplexity and answer scores, base vs tuned
  plan MODEL [--key value ...]            peak memory per device before you rent GPUs

'qlorakit COMMAND --help' describes each command."""


def cmd_train(argv: list[str]) -> int:
    from .config import build_config, help_text

    if argv and argv[0] in ("-h", "--help"):
        print(help_text())
        return 0
    launch = _pop_nproc(argv)
    cfg = build_config(argv)
    if launch:
        return _torchrun(launch, argv)
    from .train.loop import train

    result = train(cfg)
    if result.stopped == "interrupted":
        return 130
    return 0


def _pop_nproc(argv: list[str]) -> int:
    """Remove ``--nproc N`` from argv; N > 1 means: start torchrun for the user."""
    if "--nproc" not in argv:
        return 0
    i = argv.index("--nproc")
    try:
        n = int(argv[i + 1])
    except (IndexError, ValueError):
        raise UserError("--nproc: needs a whole number of processes, e.g. --nproc 2") from None
    del argv[i:i + 2]
    if n < 1:
        raise UserError(f"--nproc: must be at least 1, got {n}")
    return n if n > 1 else 0


def _torchrun(n: int, argv: list[str]) -> int:
    import subprocess

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # each rank would start its own torchrun
        raise UserError("--nproc: this process was started by torchrun already; drop --nproc and give torchrun "
                        "the process count (--nproc_per_node)")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m",
           "qlorakit", "train", *argv]
    print("qlorakit: " + " ".join(cmd), file=sys.stderr)
    return subprocess.call(cmd)


def cmd_data(argv: list[str]) -> int:
    if not argv or argv[0] != "check" or len(argv) < 2 or argv[1].startswith("--"):
        raise UserError("usage: qlorakit data check FILE [--model_name_or_path M --prompt_format F "
                        "--model_max_len N ...]")
    from .config import build_config
    from .data.check import check_file
    from .model.load import load_tokenizer, resolve_model_path

    cfg = build_config(["--dataset", argv[1], *argv[2:]])
    print(check_file(cfg, lambda c: load_tokenizer(resolve_model_path(c.model_name_or_path), c.trust_remote_code)))
    return 0


def _lazy(module: str, func: str):
    def run(argv: list[str]) -> int:
        import importlib

        return getattr(importlib.import_module(f"qlorakit.{module}"), func)(argv)

    return run


COMMANDS = {
    "train": cmd_train,
    "data": cmd_data,
    "merge": _lazy("export.merge", "merge_main"),
    "export": _lazy("export.merge", "export_main"),
    "chat": _lazy("infer.commands", "chat_main"),
    "generate": _lazy("infer.commands", "generate_main"),
    "eval": _lazy("evaluate.command", "eval_main"),
    "plan": _lazy("plan.command", "plan_main"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"qlorakit: unknown command '{name}'; see 'qlorakit --help'", file=sys.stderr)
        return 2
    quiet_libraries()
    try:
        return COMMANDS[name](rest)
    except UserError as e:
        print(f"qlorakit {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qlorakit {name}: aborted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
