"""The chat loop, apart from any model: messages read from lines, each answered by a reply function.

A message is one line, or, as in ollama, every line between a line that starts with ``\"\"\"`` and one that ends
with it (text beside the quotes belongs to the message), so a multi-line prompt such as airoboros' closed-context
question (BEGININPUT ... ENDINSTRUCTION) is one message, typed or piped. ``/reset`` starts the conversation over (the
system message stays), ``/quit`` or the end of the input ends it. Without history each message is asked alone.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

from ..data.formats import Message

QUOTES = '"""'
PROMPT, CONTINUED = "you> ", "... "


def read_message(lines: Iterator[str], show_prompt: Callable[[str], None] | None = None) -> str | None:
    """The next message of ``lines`` (None at their end); ``show_prompt`` is called before each line is read, with
    the prompt a terminal shows there."""
    if show_prompt:
        show_prompt(PROMPT)
    line = next(lines, None)
    if line is None:
        return None
    line = line.rstrip("\r\n")
    if not line.lstrip().startswith(QUOTES):
        return line
    first = line.lstrip()[len(QUOTES):]
    if first.rstrip().endswith(QUOTES):  # """all on one line"""
        return first.rstrip()[:-len(QUOTES)]
    parts = [first] if first else []
    while True:
        if show_prompt:
            show_prompt(CONTINUED)
        line = next(lines, None)
        if line is None:  # the input ended inside the message: what came is the message
            break
        line = line.rstrip("\r\n")
        if line.rstrip().endswith(QUOTES):
            last = line.rstrip()[:-len(QUOTES)]
            parts += [last] if last else []
            break
        parts.append(line)
    return "\n".join(parts)


def chat_loop(lines: Iterable[str], reply: Callable[[list[Message]], str], *, system: str = "",
              history: bool = True, show_prompt: Callable[[str], None] | None = None) -> int:
    """Answer each message of ``lines`` with ``reply(conversation)`` (the conversation so far, ending on the new
    user message; ``reply`` shows the answer as it comes and returns it). Returns how many messages were
    answered."""
    opening = [Message("system", system)] if system else []
    conversation = list(opening)
    lines, answered = iter(lines), 0
    while (message := read_message(lines, show_prompt)) is not None:
        command = message.strip()
        if not command:
            continue
        if command == "/quit":
            break
        if command == "/reset":
            conversation = list(opening)
            continue
        if not history:
            conversation = list(opening)
        conversation.append(Message("user", message))
        conversation.append(Message("assistant", reply(list(conversation))))
        answered += 1
    return answered
