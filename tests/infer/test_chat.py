"""Use a tuned run: chat and generate in the training format."""

from __future__ import annotations

import io
import json
import sys

import pytest

from helpers import write_jsonl
from qlorakit.cli import main


def test_chat_second_turn_sees_the_first_and_reset_forgets_it(run_dir, capsys):
    """The prompt of turn 2 is the whole conversation (turn 1 and the model's reply to it), not turn 2 alone;
    after /reset it is the opening again (the system message kept), and greedy decoding answers as the first time.
    The loop (infer.chat.chat_loop) gets the lines and a reply function: here the model's streamed reply, recorded."""
    from qlorakit.data.formats import Message
    from qlorakit.data.tokenize import prompt_ids
    from qlorakit.generation import Sampling, stream_reply
    from qlorakit.infer.chat import chat_loop
    from qlorakit.runs import load_run

    model, tokenizer, cfg = load_run(run_dir)
    prompts, replies = [], []

    def reply(conversation):
        prompts.append(prompt_ids(conversation, tokenizer, cfg.prompt_format))
        replies.append(stream_reply(model, tokenizer, cfg.prompt_format, conversation, Sampling(max_new_tokens=6)))
        return replies[-1]

    lines = io.StringIO("hello there\n\nand again\n/reset\nhello there\n/quit\nignored\n")
    assert chat_loop(lines, reply, system="Be brief.") == 3

    def ids(*messages):
        return prompt_ids(list(messages), tokenizer, cfg.prompt_format)

    system, first, again = Message("system", "Be brief."), Message("user", "hello there"), Message("user", "and again")
    assert len(prompts) == 3  # the blank line asks nothing; /quit ends before 'ignored'
    assert prompts[0] == ids(system, first)
    assert prompts[1] == ids(system, first, Message("assistant", replies[0]), again)
    assert prompts[1] != ids(system, again)  # the twin that forgets the first turn
    assert prompts[2] == prompts[0] and replies[2] == replies[0]
    printed = capsys.readouterr().out  # each reply streamed to the stdout of the time
    assert printed.count("\n") >= 3 and all(r in printed for r in replies)


CLOSED_CONTEXT = """BEGININPUT
BEGINCONTEXT
date: 2021-04-14
ENDCONTEXT
The Varnel bridge opened in 1932 and carries two lanes over the Osk river.
ENDINPUT
BEGININSTRUCTION
When did the Varnel bridge open?
ENDINSTRUCTION"""


@pytest.mark.parametrize("history", [True, False])
def test_a_piped_closed_context_question_is_one_message(history):
    """Airoboros' nine-line closed-context question between \"\"\" lines, as ollama takes it: one user message, one
    reply; a second question then carries the first (history) or stands alone (--no_history)."""
    from qlorakit.data.formats import Message
    from qlorakit.infer.chat import chat_loop

    asked = []

    def reply(conversation):
        asked.append(conversation)
        return f"answer {len(asked)}"

    piped = io.StringIO(f'"""\n{CLOSED_CONTEXT}\n"""\n')
    assert chat_loop(piped, reply, history=history) == 1
    assert asked == [[Message("user", CLOSED_CONTEXT)]] and len(CLOSED_CONTEXT.splitlines()) == 9
    asked.clear()
    piped = io.StringIO(f'"""{CLOSED_CONTEXT}\n"""\nAnd its river?\n')  # text beside the opening quotes counts
    assert chat_loop(piped, reply, system="Be brief.", history=history) == 2
    first = [Message("system", "Be brief."), Message("user", CLOSED_CONTEXT)]
    assert asked[0] == first
    assert asked[1] == ([*first, Message("assistant", "answer 1")] if history else first[:1]) + \
        [Message("user", "And its river?")]


def test_multi_line_messages_show_a_continuation_prompt():
    from qlorakit.infer.chat import read_message

    shown = []
    lines = iter(['"""first\n', "second\n", 'third"""\n', '"""one line"""\n', '"""\n', "cut off\n"])
    got = [read_message(lines, shown.append) for _ in range(4)]
    assert got == ["first\nsecond\nthird", "one line", "cut off", None]  # the input may end inside a message
    assert shown == ["you> ", "... ", "... ", "you> ", "you> ", "... ", "... ", "you> "]


@pytest.mark.parametrize("flags", [[], ["--no_history"]])
def test_chat_command_answers_a_piped_question_as_it_streams(run_dir, monkeypatch, capsys, flags):
    monkeypatch.setattr(sys, "stdin", io.StringIO(f'"""\n{CLOSED_CONTEXT}\n"""\n'))
    assert main(["chat", str(run_dir), "--max_new_tokens", "4", "--system", "Answer from the context.", *flags]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n") and "you>" not in out  # piped: the reply alone, no prompts


def test_chat_prompt_is_the_training_format(run_dir):
    from qlorakit.data.formats import Message
    from qlorakit.data.templates import AIROBOROS_SYSTEM
    from qlorakit.data.tokenize import prompt_ids
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run_dir)
    hist = [Message("user", "a"), Message("assistant", "b"), Message("user", "c")]
    text = tok.decode(prompt_ids(hist, tok, "airoboros"))
    assert text == f"{AIROBOROS_SYSTEM} USER: a ASSISTANT: b{tok.eos_token}USER: c ASSISTANT: "


def test_generate_answers_each_row_in_order(run_dir, tmp_path):
    """Each output row is its input row, in input order, with the reply generate_replies gives for its prompt."""
    from qlorakit.data.formats import read_prompts
    from qlorakit.generation import Sampling, generate_replies
    from qlorakit.runs import load_run

    rows = [{"instruction": "Say hi.", "id": 7},
            {"messages": [{"role": "user", "content": "Name a river."}], "id": "b"},
            {"instruction": "Repeat some words about maple orbit quartz.", "topic": "words", "id": None}]
    inp = write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "a.jsonl"
    assert main(["generate", str(run_dir), "--input", str(inp), "--output", str(out), "--max_new_tokens", "8",
                 "--batch_size", "2"]) == 0
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert [{k: v for k, v in g.items() if k != "generated"} for g in got] == rows

    model, tok, cfg = load_run(run_dir)
    want = generate_replies(model, tok, cfg.prompt_format, [p.messages for p in read_prompts(inp)],
                            Sampling(max_new_tokens=8), batch_size=2)
    assert len(set(want)) == len(want)  # the premise: the replies tell the rows apart
    assert [g["generated"] for g in got] == want
