"""``qlorakit chat RUN_DIR`` and ``qlorakit generate RUN_DIR``: talk to a tuned model, or answer a JSONL of prompts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..data.formats import Message, read_prompts
from ..errors import UserError
from ..options import run_options
from ..generation import Sampling, generate_replies, stream_reply
from ..runs import load_run


def _parse_sampling(argv: list[str], usage: str, extra: dict[str, str] | None = None
                    ) -> tuple[Path, Sampling, dict[str, str]]:
    """RUN_DIR, the sampling options, and the other ``--key value`` options named in ``extra`` (their defaults)."""
    s = Sampling()
    fields = list(Sampling.__dataclass_fields__)
    run_dir, opts = run_options(argv, {**{f: str(getattr(s, f)) for f in fields}, **(extra or {})}, usage)
    for f in fields:
        typ, value = type(getattr(s, f)), opts.pop(f)
        try:
            setattr(s, f, typ(value))
        except ValueError:
            raise UserError(f"--{f}: {value!r} is not {'an integer' if typ is int else 'a number'}") from None
    return run_dir, s, opts


def chat_main(argv: list[str]) -> int:
    """``qlorakit chat RUN_DIR [--temperature 0.7 --max_new_tokens 256 --system TEXT]``."""
    usage = "usage: qlorakit chat RUN_DIR [--temperature T --top_p P --top_k K --max_new_tokens N " \
            "--repetition_penalty R --system TEXT]"
    run_dir, sampling, extra = _parse_sampling(argv, usage, {"system": ""})
    model, tokenizer, cfg = load_run(run_dir)
    history: list[Message] = [Message("system", extra["system"])] if extra["system"] else []
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"qlorakit chat: {cfg.prompt_format} format; /reset clears the history, /quit or Ctrl-D ends.")
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.strip() == "/quit":
            break
        if line.strip() == "/reset":
            history = history[:1] if history and history[0].role == "system" else []
            continue
        history.append(Message("user", line))
        if interactive:
            print("assistant> ", end="", flush=True)
        reply = stream_reply(model, tokenizer, cfg.prompt_format, history, sampling)
        history.append(Message("assistant", reply))
    return 0


def generate_main(argv: list[str]) -> int:
    """``qlorakit generate RUN_DIR --input prompts.jsonl --output answers.jsonl [sampling options]``."""
    usage = "usage: qlorakit generate RUN_DIR --input FILE --output FILE [--batch_size N] [sampling options]"
    run_dir, sampling, extra = _parse_sampling(argv, usage, {"input": "", "output": "", "batch_size": "8"})
    if not extra["input"] or not extra["output"]:
        raise UserError("generate: --input FILE and --output FILE are both needed")
    prompts = read_prompts(Path(extra["input"]))
    model, tokenizer, cfg = load_run(run_dir)
    try:
        bs = int(extra["batch_size"])
    except ValueError:
        raise UserError(f"--batch_size: {extra['batch_size']!r} is not an integer") from None
    replies = generate_replies(model, tokenizer, cfg.prompt_format, [p.messages for p in prompts], sampling, bs)
    with open(extra["output"], "w", encoding="utf-8") as f:
        for p, r in zip(prompts, replies):
            f.write(json.dumps({**p.row, "generated": r}, ensure_ascii=False) + "\n")
    print(f"qlorakit generate: {len(replies)} replies written to {extra['output']}", file=sys.stderr)
    return 0
