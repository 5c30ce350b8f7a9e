"""An Ollama Modelfile beside a run's GGUF: ``FROM`` the file, a ``TEMPLATE`` that renders the run's prompt format,
its default ``SYSTEM`` text and its ``stop`` text, all taken from the run's ``prompt_format.json``.

The TEMPLATE uses Ollama's per-turn variables (``.System``, ``.Prompt``, ``.Response``). Ollama renders such a
template once per user/assistant turn, the system text only in the first, and cuts the last turn at ``.Response``,
where the model starts writing. So a template that is "system head, user turn, reply, reply end, text between turns"
reproduces a multi-turn conversation exactly as ``data/templates.py`` rendered it in training.

``prompt_format.json`` records the format's name, the example conversation rendered with ``{instruction}`` and
``{response}`` placeholders, the stop text, and the tokenizer's BOS text (llama2 opens each later turn with it).
For the built-in formats the turn pieces come from that format's spec in ``data/templates.py``, used only when it
renders the recorded example exactly; otherwise (the ``tokenizer`` format, or a run made with a different spec) the
template is cut from the example itself, which gives the same single-turn prompt but repeats any system text on
every turn.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from ..data.templates import PROMPT_FORMATS

__all__ = ["write_modelfile", "modelfile_text", "modelfile_path"]


class _Turn(NamedTuple):
    """The literal pieces around Ollama's variables in one turn."""

    system_head: tuple[str, str] | None  # text before and after .System; None: no system slot
    user: tuple[str, str]  # text before and after .Prompt
    reply_end: str  # after .Response: the trained end of a reply, then the untrained text before the next turn
    default_system: str


def modelfile_path(gguf_file: Path) -> Path:
    """Where the Modelfile of ``mine.gguf`` goes: ``mine.Modelfile`` beside it."""
    return gguf_file.with_suffix(".Modelfile")


def write_modelfile(run_dir: Path, gguf_file: Path) -> Path:
    """Write the Modelfile for ``gguf_file``, exported from the run in ``run_dir``; returns its path."""
    record_file = Path(run_dir) / "prompt_format.json"
    if not record_file.is_file():
        record_file = Path(run_dir).parent / "prompt_format.json"  # a checkpoint-STEP folder of the run
    record = json.loads(record_file.read_text(encoding="utf-8"))
    out = modelfile_path(Path(gguf_file))
    out.write_text(modelfile_text(record, Path(gguf_file).name, run_name=Path(run_dir).name), encoding="utf-8")
    return out


def modelfile_text(record: dict, gguf_name: str, run_name: str = "") -> str:
    """The Modelfile for the GGUF named ``gguf_name``, from a ``prompt_format.json`` record."""
    turn = _turn_pieces(record)
    template = ""
    if turn.system_head is not None:
        template += "{{ if .System }}" + turn.system_head[0] + "{{ .System }}" + turn.system_head[1] + "{{ end }}"
    template += "{{ if .Prompt }}" + turn.user[0] + "{{ .Prompt }}" + turn.user[1] + "{{ end }}"
    template += "{{ .Response }}" + turn.reply_end
    lines = [f"# Ollama Modelfile for the qlorakit run {run_name or gguf_name}, prompt format {record['name']!r}.",
             f"# ollama create NAME -f {modelfile_path(Path(gguf_name)).name}",
             f"FROM ./{gguf_name}",
             f'TEMPLATE """{template}"""']
    if turn.default_system:
        lines.append(f'SYSTEM """{turn.default_system}"""')
    if record.get("stop"):
        lines.append(f"PARAMETER stop {json.dumps(record['stop'], ensure_ascii=False)}")
    for text in (template, turn.default_system):
        if '"""' in text:
            raise ValueError(f"Cannot write an Ollama Modelfile: the prompt format {record['name']!r} contains "
                             '""", which ends a Modelfile string.')
    return "\n".join(lines) + "\n"


def _turn_pieces(record: dict) -> _Turn:
    """The pieces of one turn: from the format's spec where it renders the recorded example, else the example."""
    example = record["example"]
    if example.count("{instruction}") != 1 or example.count("{response}") != 1 or "{{" in example:
        raise ValueError(f"Cannot write an Ollama Modelfile from prompt_format.json: its example {example!r} needs "
                         "one {instruction} and then one {response}, and no '{{'.")
    prefix, rest = example.split("{instruction}")
    middle, reply_end = rest.split("{response}")
    spec = PROMPT_FORMATS.get(record["name"])
    if spec is not None:
        head = spec.head.split("{system}")
        user = spec.user.split("{content}")
        rendered_head = spec.head.format(system=spec.default_system) if spec.default_system else ""
        if rendered_head + user[0] == prefix and user[1] == middle:
            between = spec.after_text(record.get("bos", ""))
            if "{bos}" not in spec.after or "bos" in record:  # a record written before the BOS was recorded
                return _Turn((head[0], head[1]), (user[0], user[1]), reply_end + between, spec.default_system)
    return _Turn(None, (prefix, middle), reply_end, "")
