"""Command line: one table of commands; each parses its options with the one parser (``options.Parser``, argparse)
and calls one library function.

Mistakes a user can fix (UserError) end in one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, NamedTuple

from .console import quiet_libraries
from .errors import UserError
from .options import Parser, ParserExit, positive_integer


class Command(NamedTuple):
    module: str  # imported only when the command runs, so 'qlorakit plan' does not pay for torch
    function: str  # takes the arguments after the command name, returns the exit status
    synopsis: str
    summary: str

    def run(self, argv: list[str]) -> int:
        import importlib

        func: Callable[[list[str]], int] = getattr(importlib.import_module(self.module), self.function)
        return func(argv)


COMMANDS = {
    "train": Command("qlorakit.cli", "train_main", "train [CONFIG.yaml] [--key value ...]",
                     "fine-tune (no arguments: the embedded default job)"),
    "data": Command("qlorakit.cli", "data_main", "data check [FILE] [CONFIG.yaml] [--key value ...]",
                    "rows, token lengths, trained share, a rendered example"),
    "merge": Command("qlorakit.export.merge", "merge_main", "merge RUN_DIR --output DIR",
                     "adapter merged into the base: a plain transformers model"),
    "export": Command("qlorakit.export.merge", "export_main", "export RUN_DIR --output FILE",
                      "a GGUF file for llama.cpp (or --format safetensors)"),
    "chat": Command("qlorakit.infer.commands", "chat_main", "chat RUN_DIR",
                    "talk to the tuned model in its training format"),
    "generate": Command("qlorakit.infer.commands", "generate_main", "generate RUN_DIR --input FILE --output FILE",
                        "answer a JSONL of prompts"),
    "serve": Command("qlorakit.serve.command", "serve_main", "serve RUN_DIR | FILE.gguf [--port N]",
                     "an OpenAI-compatible API in the run's prompt format"),
    "eval": Command("qlorakit.evaluate.command", "eval_main", "eval RUN_DIR --tasks T --compare",
                    "lm-eval tasks (or loss and answer scores), base vs tuned"),
    "compare": Command("qlorakit.evaluate.compare", "compare_main", "compare RUN_A RUN_B ...",
                       "runs and their base side by side: scores, answers, update sizes"),
    "plan": Command("qlorakit.plan.command", "plan_main", "plan MODEL [--config run.yaml] [--key value ...]",
                    "peak memory per device before you rent GPUs"),
}


def usage() -> str:
    width = max(len(c.synopsis) for c in COMMANDS.values()) + 3
    lines = [f"  {c.synopsis:<{width}}{c.summary}" for c in COMMANDS.values()]
    return "\n".join(["usage: qlorakit COMMAND ...", "", "commands:", *lines, "",
                      "'qlorakit COMMAND --help' describes each command and all its options."])


# --- train and data: the config keys of TrainConfig as options ---------------------------------------------------


def train_parser() -> Parser:
    from .config import train_parser as config_parser

    p = config_parser()
    p.add_argument("--nproc", type=positive_integer, default=1, metavar="N",
                   help="Processes to train with on this machine: N > 1 starts torchrun with N processes (DDP, or FSDP "
                   "with --fsdp true), one per GPU. Default: 1.")
    return p


WARNED = "QLORAKIT_WARNED"  # set for the processes 'train --nproc' starts: the parent said the warnings already


def train_args(argv: list[str]):
    """(TrainConfig, process count) of ``train``'s arguments; a mistake raises a UserError naming every problem.
    Each name given that has no effect here (qlora's --do_train, ...) gets one warning line, from one process."""
    from .config import read_args

    warnings: list[str] = []
    cfg, ns = read_args(argv, train_parser(), warnings)
    if os.environ.get("RANK", "0") == "0" and not os.environ.get(WARNED):
        for line in warnings:
            print(f"qlorakit train: warning: {line}", file=sys.stderr)
    return cfg, ns.nproc


def train_main(argv: list[str]) -> int:
    cfg, nproc = train_args(argv)
    if nproc > 1:
        from .data.prepare import DataOptions

        opts = DataOptions.from_config(cfg)  # a malformed or missing source: one line here, not one per worker
        for spec in (*opts.sources, *opts.eval_sources):
            spec.kind()
        return _torchrun(nproc, _without_nproc(argv))
    from .train.loop import train

    result = train(cfg)
    if result.stopped == "interrupted":
        return 130
    if cfg.merged_output_dir and os.environ.get("RANK", "0") == "0":
        merge_after_training(cfg)
    return 0


def merge_after_training(cfg) -> None:
    """--merged_output_dir (the fork's): the run's adapter merged into its base, as 'qlorakit merge' writes it. Here,
    above the training library, because merging is a command of its own (train/ does not import export/)."""
    from pathlib import Path

    from .export.merge import merge

    merge(Path(cfg.output_dir), Path(cfg.merged_output_dir), "dequantized", None)


def _without_nproc(argv: list[str]) -> list[str]:
    """``argv`` less its ``--nproc N`` (or ``--nproc=N``): what each torchrun worker parses."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def _torchrun(n: int, argv: list[str]) -> int:
    import subprocess

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # each rank would start its own torchrun
        raise UserError("--nproc: this process was started by torchrun already; drop --nproc and give torchrun "
                        "the process count (--nproc_per_node)")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m",
           "qlorakit", "train", *argv]
    print("qlorakit: " + " ".join(cmd), file=sys.stderr)
    return subprocess.call(cmd, env={**os.environ, WARNED: "1"})


DATA_DESCRIPTION = """Check data before you train on it: for each source its rows, token lengths, the share of tokens
that are trained, and for a mixture the rows each source gives the run; then one example rendered in the prompt
format with its trained part marked. The data is read as training would read it, with the keys below (the
tokenizer of --model_name_or_path, --prompt_format, --model_max_len...), and the examples it tokenizes are the cache
the next run loads.

FILE is one source or a mixture in the syntax of --dataset (a.jsonl:0.7,b.parquet:max_rows=500:format=alpaca).
CONFIG.yaml is a 'qlorakit train' config file: its dataset or datasets list (and eval data) are checked with its
keys; a FILE given with it replaces its training data. A --key value flag wins over the file."""
DATA_USAGE = "qlorakit data check [FILE] [CONFIG.yaml] [--key value ...]"


def data_parser() -> Parser:
    from .config import add_config_options

    return add_config_options(Parser("qlorakit data", usage=DATA_USAGE, description=DATA_DESCRIPTION))


def data_config(argv: list[str], parser: Parser):
    """The TrainConfig ``data check`` reads: a CONFIG.yaml (any argument ending .yaml or .yml), FILE over its
    training data, flags over both."""
    from .config import ConfigError, config_from_mapping, load_yaml, merge_flags, parse_args

    _, positionals, flags = parse_args(argv, parser)
    if positionals[:1] != ["check"] or len(positionals) < 2:
        parser.error("give 'check', then the data: FILE (one source or a mixture) or a CONFIG.yaml")
    configs = [a for a in positionals[1:] if a.lower().endswith((".yaml", ".yml"))]
    files = [a for a in positionals[1:] if a not in configs]
    extra = configs[1:] + files[1:]
    if extra:
        parser.error(f"unexpected argument {extra[0]!r}: give one FILE and/or one CONFIG.yaml, then --key value "
                     "pairs")
    values, problems = {}, []
    if configs:
        try:
            values = load_yaml(configs[0])
        except ConfigError as e:
            problems.append(str(e))
    if files:
        values = {**{k: v for k, v in values.items() if k != "datasets"}, "dataset": (files[0], "FILE")}
    return config_from_mapping(merge_flags(values, flags), problems)


def data_main(argv: list[str]) -> int:
    from .data.check import check_file
    from .model.load import model_tokenizer

    cfg = data_config(argv, data_parser())
    print(check_file(cfg, lambda c: model_tokenizer(c.model_name_or_path, c.trust_remote_code)))
    return 0


# --- dispatch ----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        print(f"qlorakit: unknown command '{name}'; {hint}see 'qlorakit --help'", file=sys.stderr)
        return 2
    quiet_libraries()
    try:
        return COMMANDS[name].run(rest)
    except ParserExit as e:  # --help was answered
        return e.status
    except UserError as e:
        print(f"qlorakit {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qlorakit {name}: aborted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
