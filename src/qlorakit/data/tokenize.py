"""Conversation -> input_ids + labels. The ONE place where label masks are made.

Each rendered segment is tokenized on its own and the ids are concatenated, so the boundary between prompt and
reply is exact (no offset mapping guesswork). Labels are -100 on untrained tokens. The same function renders
prompts for generation, so training and inference see identical token sequences.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .formats import Conversation
from .templates import Segment, render_segments

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    source: str = ""
    # (tokens, is a reply) of each run of prompt or reply tokens in order, as rendered (whatever train_on_source
    # makes of the labels): what source_max_len and target_max_len cut. Not kept with cached examples.
    spans: tuple[tuple[int, bool], ...] = field(default=(), compare=False, repr=False)
    # Preference examples (data/pairs.py rows): (kind, prompt tokens, chosen tokens). A pair (PAIR) is stored as
    # the two sequences of its packed row, prompt + chosen then prompt + rejected; a KTO row (KTO_GOOD, KTO_BAD)
    # as prompt + completion, its third number 0. () for a supervised example.
    pref: tuple[int, ...] = ()

    @property
    def n_trained(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class TokenizeReport:
    """What tokenization did to the rows, for the log: nothing is dropped silently."""

    kept: int = 0
    truncated: list[str] = field(default_factory=list)
    dropped_too_long: list[str] = field(default_factory=list)
    dropped_no_trained_tokens: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return policy_lines(self.kept, {status: (len(items), items[:3]) for status, items in
                                        zip(STATUSES[1:], (self.truncated, self.dropped_too_long,
                                                           self.dropped_no_trained_tokens))})


# What the length policy did to one example; the order is the code stored with cached examples.
STATUSES = ("kept", "truncated", "dropped_too_long", "dropped_no_trained_tokens")
_STATUS_LABELS = {"truncated": "truncated to the length limits",
                  "dropped_too_long": "dropped: longer than model_max_len",
                  "dropped_no_trained_tokens": "dropped: no trained token left (prompt fills model_max_len)"}


def policy_lines(kept: int, changed: dict[str, tuple[int, list[str]]]) -> list[str]:
    """Report lines: ``kept`` examples, then for each status its count and up to three example sources."""
    out = [f"{kept} examples kept"]
    for status, label in _STATUS_LABELS.items():
        count, first = changed.get(status, (0, []))
        if count:
            out.append(f"{count} {label} (e.g. {', '.join(first[:3]) + (' ...' if count > 3 else '')})")
    return out


def prompt_weighted(ex: Example, prompt_weight: float) -> tuple[list[int], list[float]]:
    """``prompt_loss_weight``: the labels of ``ex`` with its prompt tokens trained too, and each label's weight (1
    for a reply token, ``prompt_weight`` for a prompt token). The prompt tokens are those ``_example`` masked, so
    with weight 1 the labels are exactly those of ``train_on_source`` true; no boundary is stored besides the mask.
    (An example whose prompt fills model_max_len is still dropped, as with prompt_loss_weight 0.)"""
    labels = [t if lab == IGNORE else lab for t, lab in zip(ex.input_ids, ex.labels)]
    return labels, [prompt_weight if lab == IGNORE else 1.0 for lab in ex.labels]


def bos_ids(tokenizer) -> list[int]:
    """[bos] when the tokenizer adds a BOS token to plain text, else []."""
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and probe and probe[0] == bos else []


def segments_to_ids(segments: list[Segment], tokenizer, train_on_source: bool = False) -> tuple[list[int], list[int]]:
    ex = _example(segments, [tokenizer(s.text, add_special_tokens=False)["input_ids"] for s in segments],
                  bos_ids(tokenizer), train_on_source, "")
    return ex.input_ids, ex.labels


def _example(segments: list[Segment], seg_ids: list[list[int]], bos: list[int], train_on_source: bool,
             source: str) -> Example:
    """The example of rendered ``segments`` and their token ids: BOS (untrained, part of the first prompt), then each
    segment, its ids trained where it is a reply (or everywhere with ``train_on_source``)."""
    ids, labels, spans = list(bos), [IGNORE] * len(bos), [[len(bos), False]] if bos else []
    for seg, these in zip(segments, seg_ids):
        ids += these
        labels += these if (seg.trained or train_on_source) else [IGNORE] * len(these)
        if spans and spans[-1][1] == seg.trained:
            spans[-1][0] += len(these)
        else:
            spans.append([len(these), seg.trained])
    return Example(ids, labels, source, tuple((n, reply) for n, reply in spans))


def tokenize_conversation(conv: Conversation, tokenizer, prompt_format: str,
                          train_on_source: bool = False) -> Example:
    segments = render_segments(conv.messages, prompt_format, tokenizer)
    seg_ids = [tokenizer(s.text, add_special_tokens=False)["input_ids"] for s in segments]
    return _example(segments, seg_ids, bos_ids(tokenizer), train_on_source, conv.source)


def prompt_ids(messages, tokenizer, prompt_format: str) -> list[int]:
    """Token ids of a conversation ending on a user turn, up to where the model's reply begins."""
    segments = render_segments(messages, prompt_format, tokenizer, add_generation_prompt=True)
    return segments_to_ids(segments, tokenizer)[0]


def tokenize_many(convs: list[Conversation], tokenizer, prompt_format: str,
                  train_on_source: bool = False) -> list[Example]:
    """``tokenize_conversation`` for each of ``convs``, with one tokenizer call for all their segments (the
    tokenizer encodes each text on its own, so the ids are the same as segment by segment, only faster)."""
    segments = [render_segments(c.messages, prompt_format, tokenizer) for c in convs]
    texts = [seg.text for segs in segments for seg in segs]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    bos = bos_ids(tokenizer)
    return [_example(segs, [next(encoded) for _ in segs], bos, train_on_source, conv.source)
            for conv, segs in zip(convs, segments)]


def cut_spans(ex: Example, source_max_len: int = 0, target_max_len: int = 0) -> Example:
    """qlora's truncation: each prompt keeps its first ``source_max_len`` tokens (the BOS counts, as in qlora's
    collator) and each reply its first ``target_max_len`` (its end-of-sequence token counts); 0 = no limit. For a
    single-turn row this is exactly what qlora's DataCollatorForCausalLM makes of input and output."""
    if not ex.spans or not (source_max_len or target_max_len):
        return ex
    ids, labels, spans, at = [], [], [], 0
    for n, reply in ex.spans:
        limit = target_max_len if reply else source_max_len
        keep = min(n, limit) if limit > 0 else n
        ids += ex.input_ids[at:at + keep]
        labels += ex.labels[at:at + keep]
        spans.append((keep, reply))
        at += n
    return Example(ids, labels, ex.source, tuple(spans))


def apply_length_policy(ex: Example, max_len: int, truncation: str = "truncate", source_max_len: int = 0,
                        target_max_len: int = 0) -> tuple[Example | None, str]:
    """The example as training sees it (None when dropped) and its status, one of STATUSES: first each prompt and
    reply cut to ``source_max_len`` and ``target_max_len`` (``cut_spans``; 0 = no limit), then the whole to
    ``max_len``. A truncated example left with no trained token is dropped (and counted as truncated too)."""
    cut = cut_spans(ex, source_max_len, target_max_len)
    status = "kept" if len(cut) == len(ex) else "truncated"
    ex = cut
    if len(ex) > max_len:
        if truncation == "drop":
            return None, "dropped_too_long"
        ex, status = Example(ex.input_ids[:max_len], ex.labels[:max_len], ex.source), "truncated"
    if ex.n_trained == 0:
        return None, "dropped_no_trained_tokens"
    return ex, status


PAIR, KTO_GOOD, KTO_BAD = 1, 2, 3


def prompt_and_completions(prompt: tuple, completions: list[str], tokenizer, prompt_format: str
                           ) -> tuple[list[Segment], list[Segment]]:
    """The prompt's segments (through the assistant prefix) and each completion's segment (its text and the
    format's end of turn, trained), rendered as the conversation prompt + that completion. The prompt segments must
    not depend on the completion, so the boundary is exact and nothing is duplicated at it."""
    from .formats import Message

    rendered = [render_segments((*prompt, Message("assistant", c)), prompt_format, tokenizer) for c in completions]
    head = rendered[0][:-1]
    if any(r[:-1] != head or not r[-1].trained for r in rendered):
        raise ValueError("the prompt format renders the prompt differently for different completions; choose "
                         "another prompt_format")
    return head, [r[-1] for r in rendered]


def tokenize_preference(rows: list, tokenizer, prompt_format: str) -> list[Example]:
    """Examples of preference rows (PairRow or KtoRow), with one tokenizer call for all their texts: the prompt's
    ids once (BOS first where the tokenizer adds one), each completion's ids after it. A pair is stored as the two
    sequences of its packed row: prompt + chosen, prompt + rejected."""
    rendered = []
    for row in rows:
        texts = [row.chosen, row.rejected] if hasattr(row, "chosen") else [row.completion]
        rendered.append(prompt_and_completions(row.prompt, texts, tokenizer, prompt_format))
    texts = [s.text for head, tails in rendered for s in (*head, *tails)]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    bos, out = bos_ids(tokenizer), []
    for row, (head, tails) in zip(rows, rendered):
        prompt = list(bos) + [t for _ in head for t in next(encoded)]
        comps = [next(encoded) for _ in tails]
        if len(comps) == 2:
            ids = prompt + comps[0] + prompt + comps[1]
            labels = [IGNORE] * len(prompt) + comps[0] + [IGNORE] * len(prompt) + comps[1]
            pref = (PAIR, len(prompt), len(comps[0]))
        else:
            ids, labels = prompt + comps[0], [IGNORE] * len(prompt) + comps[0]
            pref = (KTO_GOOD if row.desirable else KTO_BAD, len(prompt), 0)
        out.append(Example(ids, labels, row.source, pref=pref))
    return out


def preference_parts(ex: Example) -> tuple[list[int], list[list[int]]]:
    """The prompt ids and the completions' ids of a preference example."""
    kind, p, c = ex.pref
    ids = ex.input_ids
    if kind == PAIR:
        return ids[:p], [ids[p:p + c], ids[2 * p + c:]]
    return ids[:p], [ids[p:]]


def preference_example(prompt: list[int], comps: list[list[int]], kind: int, source: str) -> Example:
    ids = [t for c in comps for t in prompt + c]
    labels = [t for c in comps for t in [IGNORE] * len(prompt) + c]
    return Example(ids, labels, source, pref=(kind, len(prompt), len(comps[0]) if kind == PAIR else 0))


def preference_policy(ex: Example, max_len: int, truncation: str = "truncate", source_max_len: int = 0,
                      target_max_len: int = 0, n_bos: int = 0) -> tuple[Example | None, str]:
    """The length policy of a preference example, on each of its sequences (prompt + one completion): the prompt
    keeps its LAST ``source_max_len`` tokens (after its BOS, ``n_bos`` tokens, which stays), each completion its
    first ``target_max_len``; then a sequence over ``max_len`` drops the row ("drop") or has its completion cut to
    the room the prompt leaves ("truncate"). A completion left empty drops the row (counted, never a NaN)."""
    prompt, comps = preference_parts(ex)
    status = "kept"
    if source_max_len and len(prompt) > source_max_len:
        keep = max(source_max_len - n_bos, 0)
        prompt, status = prompt[:n_bos] + (prompt[len(prompt) - keep:] if keep else []), "truncated"
    if target_max_len and any(len(c) > target_max_len for c in comps):
        comps, status = [c[:target_max_len] for c in comps], "truncated"
    if len(prompt) + max(len(c) for c in comps) > max_len:
        if truncation == "drop":
            return None, "dropped_too_long"
        comps, status = [c[:max(max_len - len(prompt), 0)] for c in comps], "truncated"
    if any(not c for c in comps):
        return None, "dropped_no_trained_tokens"
    return preference_example(prompt, comps, ex.pref[0], ex.source), status


def tokenize_all(convs: list[Conversation], tokenizer, prompt_format: str, max_len: int,
                 truncation: str = "truncate", train_on_source: bool = False, source_max_len: int = 0,
                 target_max_len: int = 0) -> tuple[list[Example], TokenizeReport]:
    """Examples for ``convs`` with the length policy applied; the report counts every change."""
    report = TokenizeReport()
    out = []
    changed = {"truncated": report.truncated, "dropped_too_long": report.dropped_too_long,
               "dropped_no_trained_tokens": report.dropped_no_trained_tokens}
    for conv in convs:
        full = tokenize_conversation(conv, tokenizer, prompt_format, train_on_source)
        ex, status = apply_length_policy(full, max_len, truncation, source_max_len, target_max_len)
        cut = cut_spans(full, source_max_len, target_max_len)
        if status == "dropped_no_trained_tokens" and (len(cut) != len(full) or len(cut) > max_len):
            changed["truncated"].append(conv.source)
        if status != "kept":
            changed[status].append(conv.source)
        if ex is not None:
            out.append(ex)
    report.kept = len(out)
    return out, report
