"""``qlorakit chat RUN_DIR`` and ``qlorakit generate RUN_DIR``: talk to a tuned model, or answer a JSONL of prompts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..data.formats import Message, read_prompts
from ..generation import Sampling, generate_replies, stream_reply
from ..options import Parser, non_negative_integer, non_negative_number, positive_integer, positive_number
from ..runs import load_run
from .chat import chat_loop

SAMPLING_HELP = {
    "max_new_tokens": (positive_integer, "longest reply in tokens"),
    "temperature": (non_negative_number, "0 = greedy (the most likely token each step, the same reply every time); "
                    "above 0 samples, more varied the higher"),
    "top_p": (positive_number, "when sampling: keep the most likely tokens that together hold this share of "
              "probability (1 = all)"),
    "top_k": (non_negative_integer, "when sampling: keep only the k most likely tokens (0 = no limit)"),
    "repetition_penalty": (positive_number, "above 1 makes repeating earlier tokens less likely"),
}


def add_run_dir_and_sampling(p: Parser) -> Parser:
    """RUN_DIR and the sampling options (the fields of ``Sampling``) that chat and generate share."""
    p.add_argument("run_dir", metavar="RUN_DIR", type=Path,
                   help="a run directory of 'qlorakit train', or a checkpoint-STEP folder in one")
    g = p.add_argument_group("sampling")
    for name, default in vars(Sampling()).items():
        typ, help = SAMPLING_HELP[name]
        g.add_argument(f"--{name}", type=typ, default=default, metavar="N" if isinstance(default, int) else "X",
                       help=f"{help}. Default: {default}.")
    return p


def sampling_of(args) -> Sampling:
    return Sampling(**{name: getattr(args, name) for name in vars(Sampling())})


CHAT_DESCRIPTION = """Talk to the tuned model in the prompt format it was trained in; each reply is shown as it is
generated. A line on stdin is a message; so are all the lines between a line that starts with \"\"\" and one that
ends with it, as in ollama: a multi-line prompt such as airoboros' closed-context question, typed or piped:

  \"\"\"
  BEGININPUT
  BEGINCONTEXT
  ...
  ENDINSTRUCTION
  \"\"\"

The model sees the whole conversation so far (--no_history: each message alone). /reset starts over (the --system
message stays), /quit or Ctrl-D ends."""


def chat_parser() -> Parser:
    p = Parser("qlorakit chat", usage="qlorakit chat RUN_DIR [--system TEXT] [--no_history] [--temperature T "
               "--top_p P --top_k K --max_new_tokens N --repetition_penalty R]", description=CHAT_DESCRIPTION)
    p.add_argument("--system", default="", metavar="TEXT", help="a system message that opens the conversation, "
                   "instead of the prompt format's own")
    p.add_argument("--no_history", action="store_true", help="answer each message alone, without the earlier turns")
    return add_run_dir_and_sampling(p)


def generate_parser() -> Parser:
    p = Parser("qlorakit generate", usage="qlorakit generate RUN_DIR --input FILE --output FILE [--batch_size N] "
               "[--temperature T --top_p P --top_k K --max_new_tokens N --repetition_penalty R]",
               description="Answer a JSONL of prompts with the tuned model, in its training format. Each output row "
               "is the input\nrow, in the same order, with its reply added as \"generated\".")
    p.add_argument("--input", metavar="FILE", required=True, help="JSONL of prompts: rows in a training layout "
                   "(airoboros, alpaca) without the response, or {\"messages\": [...]} ending on a user turn")
    p.add_argument("--output", metavar="FILE", required=True, help="the JSONL to write")
    p.add_argument("--batch_size", type=positive_integer, default=8, metavar="N", help="prompts per batch. Default: 8.")
    return add_run_dir_and_sampling(p)


def chat_main(argv: list[str]) -> int:
    """``qlorakit chat RUN_DIR [--system TEXT] [--no_history] [sampling options]``: ``chat_loop`` over stdin, each
    reply streamed to stdout."""
    args = chat_parser().parse_args(argv)
    sampling = sampling_of(args)
    model, tokenizer, cfg = load_run(args.run_dir)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"qlorakit chat: {cfg.prompt_format} format; a message between \"\"\" lines may span lines; "
              "/reset clears the history, /quit or Ctrl-D ends.")

    def show(text: str) -> None:
        print(text, end="", flush=True)

    def reply(conversation: list[Message]) -> str:
        if interactive:
            show("assistant> ")
        return stream_reply(model, tokenizer, cfg.prompt_format, conversation, sampling)

    chat_loop(sys.stdin, reply, system=args.system, history=not args.no_history,
              show_prompt=show if interactive else None)
    return 0


def generate_main(argv: list[str]) -> int:
    """``qlorakit generate RUN_DIR --input prompts.jsonl --output answers.jsonl [sampling options]``."""
    args = generate_parser().parse_args(argv)
    prompts = read_prompts(Path(args.input))
    model, tokenizer, cfg = load_run(args.run_dir)
    replies = generate_replies(model, tokenizer, cfg.prompt_format, [p.messages for p in prompts], sampling_of(args),
                               args.batch_size)
    with open(args.output, "w", encoding="utf-8") as f:
        for p, r in zip(prompts, replies):
            f.write(json.dumps({**p.row, "generated": r}, ensure_ascii=False) + "\n")
    print(f"qlorakit generate: {len(replies)} replies written to {args.output}", file=sys.stderr)
    return 0
