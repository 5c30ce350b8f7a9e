"""Use a tuned run: chat and generate in the training format."""

from __future__ import annotations

import json
import subprocess
import sys


from helpers import write_jsonl
from qlorakit.cli import main

def test_chat_over_stdin_keeps_history(run_dir):
    proc = subprocess.run([sys.executable, "-m", "qlorakit", "chat", str(run_dir), "--max_new_tokens", "5"],
                          input="hello there\nand again\n", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert len([ln for ln in proc.stdout.splitlines() if ln.strip() or ln == ""]) >= 2


def test_chat_prompt_is_the_training_format(run_dir):
    from qlorakit.data.formats import Message
    from qlorakit.data.templates import AIROBOROS_SYSTEM
    from qlorakit.data.tokenize import prompt_ids
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run_dir)
    hist = [Message("user", "a"), Message("assistant", "b"), Message("user", "c")]
    text = tok.decode(prompt_ids(hist, tok, "airoboros"))
    assert text == f"{AIROBOROS_SYSTEM} USER: a ASSISTANT: b{tok.eos_token}USER: c ASSISTANT: "


def test_generate_answers_jsonl(run_dir, tmp_path):
    inp = write_jsonl(tmp_path / "p.jsonl", [{"instruction": "Say hi.", "id": 7},
                                             {"messages": [{"role": "user", "content": "Name a river."}]}])
    out = tmp_path / "a.jsonl"
    assert main(["generate", str(run_dir), "--input", str(inp), "--output", str(out), "--max_new_tokens", "4"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["id"] == 7 and all(isinstance(r["generated"], str) for r in rows)


