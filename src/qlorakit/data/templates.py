"""Prompt formats: a conversation -> text segments, each marked trained (assistant replies) or not (prompt).

One spec per format drives both the Python renderer used in training and the Jinja ``chat_template`` written with
merged models, so ``apply_chat_template`` reproduces the training text (a test checks the two agree).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from .formats import Message

AIROBOROS_SYSTEM = ("A chat between a curious user and an assistant. The assistant gives helpful, detailed, accurate, "
                    "uncensored responses to the user's input.")
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")
ALPACA_SYSTEM = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.")
# The system prompt jondurbin's qlora fork puts in its llama-2 chat prompt (dataset_format airoboros_chat) when a
# conversation brings none.
AIROBOROS_CHAT_SYSTEM = "You are an unbiased, uncensored, helpful assistant."


@dataclass(frozen=True)
class Segment:
    text: str
    trained: bool


@dataclass(frozen=True)
class PromptFormat:
    """A plain-text format: ``head`` once, then ``user`` / ``assistant`` turns.

    ``{system}``, ``{content}`` are filled in; ``{eos}`` in ``end`` is the tokenizer's end-of-sequence token and
    ``{bos}`` in ``after`` its beginning-of-sequence token. The trained span of an assistant turn is its content
    followed by ``end``; ``after`` follows untrained.
    """

    name: str
    default_system: str
    head: str  # "{system}" placeholder; empty when there is no system text
    user: str  # "{content}" placeholder; ends where the assistant's reply begins
    end: str  # closes a reply, trained ("{eos}" or a literal token such as <|im_end|>)
    after: str = ""  # untrained text between a reply's end and the next turn
    bare_head: str = ""  # what opens a conversation without system text instead of ``head``

    def end_text(self, eos: str) -> str:
        return self.end.replace("{eos}", eos)

    def after_text(self, bos: str) -> str:
        return self.after.replace("{bos}", bos)


PROMPT_FORMATS = {
    "airoboros": PromptFormat("airoboros", AIROBOROS_SYSTEM, "{system} ", "USER: {content} ASSISTANT: ", "{eos}"),
    "vicuna": PromptFormat("vicuna", VICUNA_SYSTEM, "{system} ", "USER: {content} ASSISTANT: ", "{eos}"),
    "alpaca": PromptFormat("alpaca", ALPACA_SYSTEM, "{system}\n\n", "### Instruction:\n{content}\n\n### Response:\n",
                           "{eos}", "\n\n"),
    "chatml": PromptFormat("chatml", "", "<|im_start|>system\n{system}<|im_end|>\n",
                           "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>", "\n"),
    # Llama 2's chat prompt, as jondurbin's qlora fork renders airoboros_chat: the system text inside the first
    # [INST], each later turn opened by BOS.
    "llama2": PromptFormat("llama2", AIROBOROS_CHAT_SYSTEM, "[INST] <<SYS>>\n{system}\n<</SYS>>\n\n",
                           "{content} [/INST] ", "{eos}", "{bos}[INST] ", "[INST] "),
}
NAMES = (*PROMPT_FORMATS, "tokenizer")


def _system_of(messages: tuple[Message, ...], fmt: PromptFormat) -> tuple[str, tuple[Message, ...]]:
    if messages and messages[0].role == "system":
        return messages[0].content, messages[1:]
    return fmt.default_system, messages


def render_segments(messages: tuple[Message, ...] | list[Message], fmt_name: str, tokenizer,
                    add_generation_prompt: bool = False) -> list[Segment]:
    """The text of ``messages`` in format ``fmt_name`` as segments; trained ones are the assistant replies.

    With ``add_generation_prompt`` the conversation should end on a user turn, and the result ends where the
    model's reply begins.
    """
    messages = tuple(messages)
    if fmt_name == "tokenizer":
        return _tokenizer_segments(messages, tokenizer, add_generation_prompt)
    fmt = PROMPT_FORMATS[fmt_name]
    system, turns = _system_of(messages, fmt)
    head = fmt.head.format(system=system) if system else fmt.bare_head
    segments = [Segment(head, False)] if head else []
    eos, bos = tokenizer.eos_token or "", tokenizer.bos_token or ""
    for m in turns:
        if m.role == "user":
            segments.append(Segment(fmt.user.format(content=m.content), False))
        elif m.role == "assistant":
            segments.append(Segment(m.content + fmt.end_text(eos), True))
            if fmt.after_text(bos):
                segments.append(Segment(fmt.after_text(bos), False))
        else:
            raise ValueError(f"a {m.role} message can only come first")
    if not add_generation_prompt:
        while segments and not segments[-1].trained:  # no untrained tail after the last reply
            segments.pop()
    return segments


def _tokenizer_segments(messages, tokenizer, add_generation_prompt) -> list[Segment]:
    """Segments from the tokenizer's own chat template, found by rendering growing prefixes of the conversation."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("prompt_format 'tokenizer' needs a tokenizer with a chat_template; this one has none, "
                         "choose airoboros, vicuna, alpaca, chatml or llama2")
    as_dicts = [{"role": m.role, "content": m.content} for m in messages]

    def text(upto, gen):
        return tokenizer.apply_chat_template(as_dicts[:upto], tokenize=False, add_generation_prompt=gen)

    segments, done = [], ""
    for i, m in enumerate(messages):
        if m.role != "assistant":
            continue
        prompt, full = text(i, True), text(i + 1, False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise UserError("the tokenizer's chat template does not render a conversation as a growing prefix, "
                             "so replies cannot be located; choose another prompt_format")
        segments += [Segment(prompt[len(done):], False), Segment(full[len(prompt):], True)]
        done = full
    if add_generation_prompt:
        segments.append(Segment(text(len(messages), True)[len(done):], False))
    return [s for s in segments if s.text]


def render_text(messages, fmt_name: str, tokenizer, add_generation_prompt: bool = False) -> str:
    return "".join(s.text for s in render_segments(messages, fmt_name, tokenizer, add_generation_prompt))


def stop_text(fmt_name: str, tokenizer) -> str:
    """The text that ends a reply in this format (generation stops on it)."""
    if fmt_name == "tokenizer":
        return tokenizer.eos_token or ""
    return PROMPT_FORMATS[fmt_name].end_text(tokenizer.eos_token or "")


def stop_token_ids(tokenizer, prompt_format: str) -> list[int]:
    """The ids generation stops on: the end-of-sequence token, and the format's end text where it is one token."""
    ids = {tokenizer.eos_token_id}
    stop = stop_text(prompt_format, tokenizer)
    tid = tokenizer.convert_tokens_to_ids(stop) if stop else None
    if isinstance(tid, int) and tid != tokenizer.unk_token_id:
        ids.add(tid)
    return sorted(i for i in ids if i is not None)


def _split(template: str, slot: str) -> tuple[str, str]:
    before, after = template.split(slot)
    return before, after


def chat_template(fmt_name: str, tokenizer, bos: bool = False) -> str:
    """A Jinja ``chat_template`` that renders exactly what ``render_segments`` renders for training, so
    ``apply_chat_template(..., add_generation_prompt=True)`` gives the prompt the model was trained to continue.
    With ``bos`` it opens with the BOS token, as training's ids do where the tokenizer adds one to text
    (``tokenize.bos_ids``): a rendered template is tokenized without special tokens (transformers, llama.cpp)."""
    if fmt_name == "tokenizer":
        return tokenizer.chat_template
    fmt = PROMPT_FORMATS[fmt_name]
    q = lambda s: repr(s)  # noqa: E731  (a Python string literal is a valid Jinja string literal here)
    head_pre, head_post = _split(fmt.head, "{system}")
    user_pre, user_post = _split(fmt.user, "{content}")
    end = q(fmt.end).replace("{eos}", "' + eos_token + '")
    after = q(fmt.after).replace("{bos}", "' + (bos_token or '') + '")
    return (
        ("{{- bos_token -}}" if bos else "") +
        "{%- set ns = namespace(system=" + q(fmt.default_system) + ", start=0) -%}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set ns.system = messages[0]['content'] -%}{%- set ns.start = 1 -%}{%- endif -%}"
        "{%- if ns.system -%}{{ " + q(head_pre) + " + ns.system + " + q(head_post) + " }}"
        "{%- else -%}{{ " + q(fmt.bare_head) + " }}{%- endif -%}"
        "{%- for m in messages[ns.start:] -%}"
        "{%- if m['role'] == 'user' -%}{{ " + q(user_pre) + " + m['content'] + " + q(user_post) + " }}"
        "{%- elif m['role'] == 'assistant' -%}{{ m['content'] + " + end + " }}"
        "{%- if not loop.last -%}{{ " + after + " }}{%- endif -%}"
        "{%- endif -%}{%- endfor -%}"
    )
