"""The Ollama Modelfile written beside a GGUF: its TEMPLATE, rendered the way Ollama renders it, must give the text
the run was trained on (data/templates.py), and its stop text must be the run's.

Ollama is not installed here, so ``ollama_render`` re-implements what Ollama's template.Execute does with a template
that has no ``.Messages`` (the per-turn variables qlorakit writes): one execution per user/assistant turn, the system
text only in the first, the last turn cut at ``{{ .Response }}``; and a Modelfile's SYSTEM is put first when the
conversation has no system message of its own.
"""

from __future__ import annotations

import json
import re

import pytest

from qlorakit.config import TrainConfig
from qlorakit.data.formats import Message
from qlorakit.data.templates import NAMES, render_text
from qlorakit.export.modelfile import modelfile_text, write_modelfile
from qlorakit.runs import stop_token_ids
from qlorakit.train.finish import prompt_format_record

_IF = re.compile(r"\{\{ if \.(\w+) \}\}(.*?)\{\{ end \}\}", re.S)
_VAR = re.compile(r"\{\{ \.(\w+) \}\}")

CONVERSATIONS = {
    "one question": [Message("user", "Name a prime number.")],
    "two turns": [Message("user", "Name a prime number."), Message("assistant", "Seven."),
                  Message("user", "And an even one?")],
    "own system": [Message("system", "Answer in one word."), Message("user", "Capital of France?"),
                   Message("assistant", "Paris."), Message("user", "Of Italy?")],
}


def parse_modelfile(text: str) -> dict:
    """TEMPLATE, SYSTEM, FROM and the stop parameters of a Modelfile."""
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M)
    system = re.search(r'^SYSTEM """(.*?)"""$', text, re.S | re.M)
    return {"template": template.group(1), "system": system.group(1) if system else "",
            "from": re.search(r"^FROM (.*)$", text, re.M).group(1),
            "stop": [json.loads(v) for v in re.findall(r"^PARAMETER stop (.*)$", text, re.M)]}


def _execute(template: str, values: dict[str, str]) -> str:
    text = _IF.sub(lambda m: m.group(2) if values.get(m.group(1)) else "", template)
    return _VAR.sub(lambda m: values.get(m.group(1), ""), text)


def ollama_render(template: str, default_system: str, messages: list[Message]) -> str:
    """The prompt Ollama builds from a per-turn template (template.go's Execute without .Messages)."""
    if default_system and (not messages or messages[0].role != "system"):
        messages = [Message("system", default_system), *messages]
    out, turn = [], {"System": "", "Prompt": "", "Response": ""}
    for m in messages:
        if (m.role == "system" and (turn["Prompt"] or turn["Response"])) or (m.role == "user" and turn["Response"]):
            out.append(_execute(template, turn))
            turn = {"System": "", "Prompt": "", "Response": ""}
        turn[{"system": "System", "user": "Prompt", "assistant": "Response"}[m.role]] = m.content
    out.append(_execute(template[:template.index("{{ .Response }}")], turn))
    return "".join(out)


@pytest.mark.parametrize("fmt", NAMES)
def test_template_renders_the_training_format_and_stops_on_its_end(fmt, tokenizer):
    record = prompt_format_record(TrainConfig(prompt_format=fmt), tokenizer)  # what train/finish.py writes
    modelfile = parse_modelfile(modelfile_text(record, "run-q4_k_m.gguf"))

    assert modelfile["from"] == "./run-q4_k_m.gguf"
    assert modelfile["stop"] == [record["stop"]]
    assert tokenizer.convert_tokens_to_ids(record["stop"]) in stop_token_ids(tokenizer, fmt)
    conversations = CONVERSATIONS if fmt != "tokenizer" else {"one question": CONVERSATIONS["one question"]}
    for name, messages in conversations.items():
        expected = render_text(messages, fmt, tokenizer, add_generation_prompt=True)
        assert ollama_render(modelfile["template"], modelfile["system"], messages) == expected, name


def test_multi_turn_text_between_replies_is_kept(tokenizer):
    # chatml puts a newline after <|im_end|> between turns; a template without it would glue the turns together.
    record = prompt_format_record(TrainConfig(prompt_format="chatml"), tokenizer)
    modelfile = parse_modelfile(modelfile_text(record, "m.gguf"))
    rendered = ollama_render(modelfile["template"], "", CONVERSATIONS["two turns"])
    assert "Seven.<|im_end|>\n<|im_start|>user\nAnd an even one?<|im_end|>\n<|im_start|>assistant\n" in rendered


def test_a_record_its_spec_does_not_render_falls_back_to_the_recorded_example(tokenizer):
    record = prompt_format_record(TrainConfig(prompt_format="airoboros"), tokenizer)
    record["example"] = record["example"].replace("A chat between", "A talk between")  # an older spec's text
    modelfile = parse_modelfile(modelfile_text(record, "m.gguf"))
    assert modelfile["system"] == ""
    prompt = ollama_render(modelfile["template"], "", CONVERSATIONS["one question"])
    assert prompt == record["example"].split("{response}")[0].replace("{instruction}", "Name a prime number.")


def test_modelfile_is_written_beside_the_gguf_from_the_run_record(tmp_path, tokenizer):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    record = prompt_format_record(TrainConfig(prompt_format="alpaca"), tokenizer)
    (run_dir / "prompt_format.json").write_text(json.dumps(record))
    out = write_modelfile(run_dir, tmp_path / "mine.gguf")
    assert out == tmp_path / "mine.Modelfile"
    assert parse_modelfile(out.read_text())["from"] == "./mine.gguf"


def test_a_record_without_placeholders_is_refused(tokenizer):
    with pytest.raises(ValueError, match="one {instruction} and then one {response}"):
        modelfile_text({"name": "custom", "example": "no slots here", "stop": ""}, "m.gguf")
