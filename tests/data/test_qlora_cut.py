"""qlora's source_max_len and target_max_len (each prompt and each reply cut to its own limit, as qlora's collator
cuts input and output), and the fork's airoboros_chat prompt (Llama 2's chat format)."""

from __future__ import annotations

from helpers import write_jsonl
from qlorakit.data.formats import Conversation, Message
from qlorakit.data.tokenize import IGNORE, bos_ids, tokenize_all

LONG_PROMPT = "Tell me about " + "the river and the stone and the cloud " * 8
LONG_REPLY = "It flows " + "past maple orbit quartz violet " * 10


def qlora_collate(tokenizer, source: str, target: str, source_max_len: int, target_max_len: int):
    """What artidoro/qlora's DataCollatorForCausalLM makes of one row (train_on_source false): the source and the
    target tokenized each on its own, cut to its limit, concatenated; labels only on the target."""
    src = tokenizer(source, max_length=source_max_len, truncation=True, add_special_tokens=False)["input_ids"]
    tgt = tokenizer(target, max_length=target_max_len, truncation=True, add_special_tokens=False)["input_ids"]
    return src + tgt, [IGNORE] * len(src) + tgt


def test_source_and_target_cut_each_to_its_own_limit_as_qloras_collator(tokenizer):
    """chatml: the format's markers are special tokens, so a text tokenized whole gives the ids of its segments
    tokenized one by one, and qlora's collator can be run on the rendered strings as they are."""
    from qlorakit.data.templates import render_text

    convs = [Conversation((Message("user", LONG_PROMPT), Message("assistant", LONG_REPLY)), "r:1"),
             Conversation((Message("user", "Hi?"), Message("assistant", "Hello.")), "r:2")]
    got, report = tokenize_all(convs, tokenizer, "chatml", 1024, source_max_len=16, target_max_len=12)
    bos = tokenizer.bos_token if bos_ids(tokenizer) else ""
    for conv, ex in zip(convs, got):
        source = bos + render_text(conv.messages[:1], "chatml", tokenizer, add_generation_prompt=True)
        target = conv.messages[1].content + tokenizer.eos_token
        want_ids, want_labels = qlora_collate(tokenizer, source, target, 16, 12)
        assert (ex.input_ids, ex.labels) == (want_ids, want_labels)
    long = got[0]
    assert long.labels.count(IGNORE) == 16 and long.n_trained == 12  # each part to its own limit
    whole, _ = tokenize_all(convs[:1], tokenizer, "chatml", 28)  # the twin: the whole example cut to 16 + 12
    assert whole == []  # leaves no reply token: the long prompt fills it
    assert report.truncated == ["r:1"] and report.kept == 2  # the cut row is counted, the short one is whole


def test_each_turn_of_a_conversation_is_cut_and_train_on_source_keeps_the_cut(tokenizer):
    conv = Conversation((Message("user", LONG_PROMPT), Message("assistant", LONG_REPLY),
                         Message("user", LONG_PROMPT), Message("assistant", "Short.")), "r:1")
    (full,), _ = tokenize_all([conv], tokenizer, "chatml", 1024)
    (cut,), _ = tokenize_all([conv], tokenizer, "chatml", 1024, source_max_len=10, target_max_len=8)
    assert [n for n, _ in cut.spans] == [10, 8, 10, min(8, full.spans[3][0])]
    (both,), _ = tokenize_all([conv], tokenizer, "chatml", 1024, train_on_source=True, source_max_len=10,
                              target_max_len=8)
    assert both.input_ids == cut.input_ids and IGNORE not in both.labels


def test_the_cached_examples_are_cut_alike(tmp_path, tokenizer):
    """The data pipeline (prepare_data, cached Arrow examples) applies the same cut, and its cache tells the limits
    apart."""
    from qlorakit.data.formats import read_jsonl
    from qlorakit.data.prepare import DataOptions, prepare_data
    from qlorakit.data.sources import parse_dataset_arg

    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": LONG_PROMPT, "response": LONG_REPLY}] * 3)
    listed, _ = tokenize_all(read_jsonl(path), tokenizer, "airoboros", 1024, source_max_len=20, target_max_len=9)
    spec = tuple(parse_dataset_arg(str(path)))
    data = prepare_data(DataOptions(spec, source_max_len=20, target_max_len=9), tokenizer)
    assert [(e.input_ids, e.labels) for e in data.train] == [(e.input_ids, e.labels) for e in listed]
    assert any("3 truncated" in line for line in data.lines)
    uncut = prepare_data(DataOptions(spec), tokenizer)
    assert len(uncut.train[0]) > len(data.train[0])


def test_airoboros_chat_is_the_forks_llama2_chat_prompt(tokenizer):
    """The fork's get_chat_prompt (jondurbin/qlora), system prompt and turns; the model's reply follows it."""
    from qlorakit.data.templates import AIROBOROS_CHAT_SYSTEM, render_segments, render_text

    def fork_prompt(message, system):  # its get_chat_prompt with no earlier turns
        return f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{message} [/INST] "

    asked = [Message("user", "What is 2+2?")]
    assert render_text(asked, "llama2", tokenizer, True) == fork_prompt("What is 2+2?", AIROBOROS_CHAT_SYSTEM)
    own = [Message("system", "Be terse."), *asked]
    assert render_text(own, "llama2", tokenizer, True) == fork_prompt("What is 2+2?", "Be terse.")
    segs = render_segments([*own, Message("assistant", "4"), Message("user", "And 3+3?"), Message("assistant", "6")],
                           "llama2", tokenizer)
    assert [s.text for s in segs if s.trained] == [f"4{tokenizer.eos_token}", f"6{tokenizer.eos_token}"]
    assert "".join(s.text for s in segs).count("[INST]") == 2 and f"{tokenizer.bos_token}[INST] And 3+3? [/INST] " \
        in "".join(s.text for s in segs)
