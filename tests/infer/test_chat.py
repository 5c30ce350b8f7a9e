"""Use a tuned run: chat and generate in the training format."""

from __future__ import annotations

import io
import json
import sys

from helpers import write_jsonl
from qlorakit.cli import main


def test_chat_second_turn_sees_the_first_and_reset_forgets_it(run_dir, monkeypatch, capsys):
    """The prompt of turn 2 is the whole conversation (turn 1 and the model's reply to it), not turn 2 alone;
    after /reset it is the opening again (the --system message kept), and greedy decoding answers as the first time."""
    from qlorakit.data.formats import Message
    from qlorakit.data.tokenize import prompt_ids
    from qlorakit.infer import commands

    prompts, replies, seen = [], [], {}
    stream_reply = commands.stream_reply

    def recording(model, tokenizer, prompt_format, history, sampling, out=None):
        seen.update(tokenizer=tokenizer, prompt_format=prompt_format)
        prompts.append(prompt_ids(history, tokenizer, prompt_format))
        replies.append(stream_reply(model, tokenizer, prompt_format, history, sampling, out=out))
        return replies[-1]

    monkeypatch.setattr(commands, "stream_reply", recording)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello there\n\nand again\n/reset\nhello there\n/quit\nignored\n"))
    assert main(["chat", str(run_dir), "--max_new_tokens", "6", "--system", "Be brief."]) == 0

    def ids(*messages):
        return prompt_ids(list(messages), seen["tokenizer"], seen["prompt_format"])

    system, first, again = Message("system", "Be brief."), Message("user", "hello there"), Message("user", "and again")
    assert len(prompts) == 3  # the blank line asks nothing; /quit ends before 'ignored'
    assert prompts[0] == ids(system, first)
    assert prompts[1] == ids(system, first, Message("assistant", replies[0]), again)
    assert prompts[1] != ids(system, again)  # the twin that forgets the first turn
    assert prompts[2] == prompts[0] and replies[2] == replies[0]
    printed = capsys.readouterr().out  # each reply streamed to the stdout of the time
    assert printed.count("\n") >= 3 and all(r in printed for r in replies)


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
