"""Preference rows -> a prompt and its completions, with file:line errors (the layouts ``pairs`` and ``kto``).

``pairs``: ``prompt``, ``chosen``, ``rejected`` and an optional ``system`` (TRL's and the truthy-dpo layout), the
completions as strings rendered in the run's prompt format; or conversational: ``chosen`` and ``rejected`` lists of
messages, the last assistant turn of each being the completion and the turns before it the prompt (the same in
both), or ``prompt`` a list of messages and ``chosen``/``rejected`` lists holding one assistant message.
``kto``: ``prompt``, ``completion`` and a boolean ``label`` (desirable or not), the same shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

from .formats import PLAIN, DataError, Fields, Message, _text, messages_row


@dataclass(frozen=True)
class PairRow:
    prompt: tuple[Message, ...]  # ends on a user turn
    chosen: str
    rejected: str
    source: str


@dataclass(frozen=True)
class KtoRow:
    prompt: tuple[Message, ...]
    completion: str
    desirable: bool
    source: str


def _prompt(row: dict, where: str, fields: Fields) -> tuple[Message, ...]:
    """The prompt turns: a string (with the optional system text) or a list of messages ending on a user turn."""
    key = fields.key("prompt")
    value = row.get(key)
    if isinstance(value, list):
        turns = value + [{"role": "assistant", "content": "-"}]  # lets messages_row check the turns
        return messages_row({"messages": turns}, f"{where}: {key}").messages[:-1]
    msgs = []
    system = _text(row, "system", where, required=False, allow_blank=True, fields=fields)
    if system.strip():
        msgs.append(Message("system", system))
    return (*msgs, Message("user", _text(row, "prompt", where, fields=fields)))


def _completion(row: dict, name: str, where: str, fields: Fields) -> tuple[tuple[Message, ...] | None, str]:
    """(the prompt turns a conversational completion carries, or None; the completion's text)."""
    key = fields.key(name)
    value = row.get(key)
    if not isinstance(value, list):
        return None, _text(row, name, where, fields=fields)
    if len(value) == 1 and isinstance(value[0], dict) and value[0].get("role") == "assistant":
        turns = [{"role": "user", "content": "-"}, value[0]]  # the reply alone: its prompt is the row's prompt
        return (), messages_row({"messages": turns}, f"{where}: {key}").messages[-1].content
    conv = messages_row({"messages": value}, f"{where}: {key}")
    return conv.messages[:-1], conv.messages[-1].content


def _prompt_and(row: dict, names: tuple[str, ...], where: str, fields: Fields):
    """The shared prompt and each named completion's text; conversational completions must share their prompt."""
    parts = [_completion(row, n, where, fields) for n in names]
    carried = [p for p, _ in parts if p]
    if carried and any(p != carried[0] for p in carried):
        raise DataError(f"{where}: {' and '.join(fields.key(n) for n in names)} have different prompt turns; a pair "
                        "must share its prompt")
    if carried and fields.key("prompt") not in row:
        return carried[0], [t for _, t in parts]
    prompt = _prompt(row, where, fields)
    return prompt + (carried[0] if carried else ()), [t for _, t in parts]


def pairs_row(row: dict, where: str, fields: Fields = PLAIN) -> PairRow:
    prompt, (chosen, rejected) = _prompt_and(row, ("chosen", "rejected"), where, fields)
    if not any(m.role == "user" for m in prompt):
        raise DataError(f"{where}: the prompt has no user message")
    return PairRow(prompt, chosen, rejected, where)


def kto_row(row: dict, where: str, fields: Fields = PLAIN) -> KtoRow:
    prompt, (completion,) = _prompt_and(row, ("completion",), where, fields)
    key = fields.key("label")
    label = row.get(key)
    if not isinstance(label, bool):
        raise DataError(f"{where}: {fields.noun} '{key}' must be true (desirable) or false (undesirable), got "
                        f"{label!r}")
    return KtoRow(prompt, completion, label, where)


PREFERENCE_PARSERS = {"pairs": pairs_row, "kto": kto_row}
