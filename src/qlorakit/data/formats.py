"""Raw JSONL rows (airoboros, alpaca, chat messages) -> conversations, with file:line errors.

A conversation is a list of ``Message(role, content)`` with roles ``system``, ``user`` and ``assistant``; it always
ends with an assistant message, which is what the model is trained to produce.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError


class DataError(UserError):
    """A mistake in the user's data. The message names file, line and field, and is printed without a traceback."""


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]
    source: str  # "file:line", for messages about this row


ROW_LAYOUTS = ("airoboros", "alpaca", "messages", "pairs", "kto")  # pairs, kto: preference rows (data/pairs.py)
PREFERENCE_LAYOUTS = ("pairs", "kto")
ALIASES = {"sharegpt": "messages"}  # ShareGPT's conversations/from/value rows are read by the messages parser
ROLES = ("system", "user", "assistant")
# The fields each layout reads; a source's ``columns`` mapping renames them to its own column names.
FIELDS = {"airoboros": ("instruction", "response", "system"), "alpaca": ("instruction", "input", "output"),
          "messages": ("messages", "role", "content"), "pairs": ("prompt", "chosen", "rejected", "system"),
          "kto": ("prompt", "completion", "label", "system")}


@dataclass(frozen=True)
class Fields:
    """Where a parser finds its fields: ``names`` maps a layout's field to the row's key (a dataset whose columns
    are named differently), and ``noun`` is what messages call them ("field" in JSON, "column" in a table)."""

    names: tuple[tuple[str, str], ...] = ()
    noun: str = "field"

    def key(self, field_name: str) -> str:
        return dict(self.names).get(field_name, field_name)


PLAIN = Fields()


def detect_format(row: dict) -> str | None:
    """The layout of ``row`` guessed from its keys, or None."""
    if "chosen" in row and "rejected" in row:
        return "pairs"
    if "completion" in row and "label" in row:
        return "kto"
    if "messages" in row or "conversations" in row:
        return "messages"
    if "output" in row and "instruction" in row:
        return "alpaca"
    if "response" in row and "instruction" in row:
        return "airoboros"
    return None


def _text(row: dict, key: str, where: str, *, required: bool = True, allow_blank: bool = False,
          fields: Fields = PLAIN) -> str:
    key, noun = fields.key(key), fields.noun
    if key not in row:
        if not required:
            return ""
        keys = ", ".join(sorted(row)) or "none"
        raise DataError(f"{where}: missing {noun} '{key}' (row has: {keys})")
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: {noun} '{key}' must be a string, got {type(value).__name__}")
    if not allow_blank and not value.strip():
        raise DataError(f"{where}: {noun} '{key}' is blank")
    return value


def airoboros_row(row: dict, where: str, fields: Fields = PLAIN) -> Conversation:
    msgs = []
    system = _text(row, "system", where, required=False, allow_blank=True, fields=fields)
    if system.strip():
        msgs.append(Message("system", system))
    msgs += [Message("user", _text(row, "instruction", where, fields=fields)),
             Message("assistant", _text(row, "response", where, fields=fields))]
    return Conversation(tuple(msgs), where)


def alpaca_row(row: dict, where: str, fields: Fields = PLAIN) -> Conversation:
    instruction = _text(row, "instruction", where, fields=fields)
    extra = _text(row, "input", where, required=False, allow_blank=True, fields=fields)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    # The optional input is appended to the instruction, as the instruction's context.
    output = _text(row, "output", where, fields=fields)
    return Conversation((Message("user", user), Message("assistant", output)), where)


def messages_row(row: dict, where: str, fields: Fields = PLAIN) -> Conversation:
    key = fields.key("messages")
    if key == "messages" and key not in row:
        key = "conversations"  # ShareGPT's name
    if key not in row:
        raise DataError(f"{where}: missing {fields.noun} '{key}' (row has: {', '.join(sorted(row)) or 'none'})")
    turns = row[key]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: {fields.noun} '{key}' must be a non-empty list of {{role, content}} objects")
    role_key, content_key = fields.key("role"), fields.key("content")
    msgs = []
    for i, turn in enumerate(turns):
        at = f"{where}: {key}[{i}]"
        if not isinstance(turn, dict):
            raise DataError(f"{at} must be an object with '{role_key}' and '{content_key}'")
        role = turn.get(role_key, turn.get("from"))
        role = {"human": "user", "gpt": "assistant"}.get(role, role)
        if role not in ROLES:
            raise DataError(f"{at}.{role_key} is {role!r}; use one of {', '.join(ROLES)}")
        content = turn.get(content_key, turn.get("value"))
        if not isinstance(content, str):
            raise DataError(f"{at}.{content_key} must be a string, got {type(content).__name__}")
        if role == "assistant" and not content.strip():
            raise DataError(f"{at}.{content_key} is blank: an assistant turn must say something")
        msgs.append(Message(role, content))
    if msgs[-1].role != "assistant":
        raise DataError(f"{where}: the last message must be from the assistant (it is the trained response)")
    if not any(m.role == "user" for m in msgs):
        raise DataError(f"{where}: no user message")
    return Conversation(tuple(msgs), where)


PARSERS = {"airoboros": airoboros_row, "alpaca": alpaca_row, "messages": messages_row}


def read_jsonl(path: str | Path, dataset_format: str = "auto") -> list[Conversation]:
    """Every row of ``path`` as a conversation. Raises DataError at the first bad row, naming file and line."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file; check the dataset path")
    if path.is_dir():
        raise DataError(f"{path}: is a directory; give a .jsonl file")
    rows = []
    fmt = None if dataset_format == "auto" else ALIASES.get(dataset_format, dataset_format)
    for lineno, row in _json_rows(path):
        where = f"{path}:{lineno}"
        if fmt is None:
            fmt = detect_format(row)
            if fmt is None:
                keys = ", ".join(sorted(row)) or "none"
                raise DataError(f"{where}: cannot tell the row layout from its fields ({keys}); expected "
                                "instruction+response (airoboros), instruction+input+output (alpaca) or messages")
        rows.append(PARSERS[fmt](row, where))
    if not rows:
        raise DataError(f"{path}: the file has no rows")
    return rows


@dataclass(frozen=True)
class Prompt:
    messages: tuple[Message, ...]  # ends on a user turn
    row: dict  # the input row, kept whole so nothing the user gave is lost


def read_prompts(path: Path) -> list[Prompt]:
    """Prompts for generation: rows with ``instruction`` (or ``prompt``), or ``messages`` ending on a user turn.
    A trailing assistant turn in ``messages`` is dropped from the prompt (it is the reference answer)."""
    out = []
    for lineno, row in _json_rows(path):
        where = f"{path}:{lineno}"
        if "messages" in row:
            turns = row["messages"]
            if isinstance(turns, list) and turns and isinstance(turns[-1], dict) \
                    and turns[-1].get("role") == "assistant":
                turns = turns[:-1]  # the reference answer
            placeholder = {"role": "assistant", "content": "-"}  # lets messages_row validate the prompt turns
            turns = turns + [placeholder] if isinstance(turns, list) else turns
            msgs = messages_row({"messages": turns}, where).messages[:-1]
        else:
            key = "instruction" if "instruction" in row else "prompt"
            msgs = (Message("user", _text(row, key, where)),)
            if "input" in row and isinstance(row["input"], str) and row["input"].strip():
                msgs = (Message("user", f"{msgs[0].content}\n\n{row['input']}"),)
        out.append(Prompt(tuple(msgs), row))
    if not out:
        raise DataError(f"{path}: the file has no rows")
    return out


def _json_rows(path: Path):
    """(line number, JSON object) for each non-blank line; DataError naming the line otherwise."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    data = path.read_bytes()
    # Editors on Windows start UTF-8 files with a byte-order mark; it is not part of the first row.
    data = data.removeprefix(b"\xef\xbb\xbf")
    for lineno, line in enumerate(data.split(b"\n"), start=1):
        row = json_line(line, f"{path}:{lineno}")
        if row is not None:
            yield lineno, row


def json_line(line: bytes, where: str) -> dict | None:
    """The JSON object on one line of a JSONL file, None for a blank line, DataError naming ``where`` otherwise."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: bytes that are not UTF-8 at column {e.start + 1}; re-encode the file "
                        "as UTF-8") from None
    if not text.strip():
        return None
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON at column {e.colno} ({e.msg})") from None
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row
