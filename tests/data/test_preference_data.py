"""Preference rows: layouts detected from their columns, the prompt tokenized once with an exact boundary (no BOS or
EOS duplicated), truncation that keeps the prompt's end and drops (and counts) a row whose completion it empties."""

from __future__ import annotations

import pytest

from qlorakit.data.formats import DataError
from qlorakit.data.pairs import kto_row, pairs_row
from qlorakit.data.prepare import DataOptions, prepare_data
from qlorakit.data.sources import parse_dataset_arg
from qlorakit.data.tokenize import (IGNORE, KTO_BAD, KTO_GOOD, PAIR, preference_parts, preference_policy,
                                    tokenize_conversation, tokenize_preference)
from qlorakit.data.formats import Conversation, Message
from helpers import write_jsonl

PAIR_ROW = {"system": "Answer from the passage.", "prompt": "What is the capital of Zorvia?",
            "chosen": "The text does not say.", "rejected": "Kelmarsh."}


def _prepare(path, tokenizer, tmp_path, **kw):
    opts = DataOptions(tuple(parse_dataset_arg(str(path), "dataset", "auto")), cache_dir=str(tmp_path / "cache"),
                       **kw)
    return prepare_data(opts, tokenizer)


def test_pair_is_the_two_supervised_examples_with_one_prompt(tokenizer):
    """Each sequence of a pair is token for token what SFT makes of prompt + that completion: the boundary is exact
    and no BOS or EOS is duplicated at it."""
    row = pairs_row(PAIR_ROW, "x:1")
    (ex,) = tokenize_preference([row], tokenizer, "chatml")
    prompt, (chosen, rejected) = preference_parts(ex)
    for reply, comp in ((row.chosen, chosen), (row.rejected, rejected)):
        sft = tokenize_conversation(Conversation((*row.prompt, Message("assistant", reply)), "x:1"), tokenizer,
                                    "chatml")
        assert sft.input_ids == prompt + comp
        assert [t for t in sft.labels if t != IGNORE] == comp  # the completion is exactly the trained reply
    assert ex.pref == (PAIR, len(prompt), len(chosen))
    assert ex.input_ids == prompt + chosen + prompt + rejected
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert chosen[-1] == end and chosen.count(end) == 1  # the end of turn once, inside the completion


def test_conversational_and_string_pairs_agree(tokenizer):
    conv = {"chosen": [{"role": "system", "content": PAIR_ROW["system"]},
                       {"role": "user", "content": PAIR_ROW["prompt"]},
                       {"role": "assistant", "content": PAIR_ROW["chosen"]}],
            "rejected": [{"role": "system", "content": PAIR_ROW["system"]},
                         {"role": "user", "content": PAIR_ROW["prompt"]},
                         {"role": "assistant", "content": PAIR_ROW["rejected"]}]}
    split = {"prompt": conv["chosen"][:2], "chosen": conv["chosen"][2:], "rejected": conv["rejected"][2:]}
    a, b, c = (tokenize_preference([pairs_row(r, "x:1")], tokenizer, "airoboros")[0] for r in (PAIR_ROW, conv, split))
    assert a.input_ids == b.input_ids == c.input_ids


def test_pair_rows_with_different_prompts_are_refused():
    bad = {"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
           "rejected": [{"role": "user", "content": "OTHER"}, {"role": "assistant", "content": "c"}]}
    with pytest.raises(DataError, match="x:3: chosen and rejected have different prompt turns"):
        pairs_row(bad, "x:3")


def test_kto_label_must_be_boolean():
    assert kto_row({"prompt": "p", "completion": "c", "label": False}, "x:1").desirable is False
    with pytest.raises(DataError, match="x:2: field 'label' must be true"):
        kto_row({"prompt": "p", "completion": "c", "label": "yes"}, "x:2")


def test_truncation_keeps_the_prompts_end_and_never_empties_a_completion(tokenizer):
    (ex,) = tokenize_preference([pairs_row(PAIR_ROW, "x:1")], tokenizer, "chatml")
    prompt, (chosen, rejected) = preference_parts(ex)
    cut, status = preference_policy(ex, max_len=100, source_max_len=6, n_bos=0)
    p2, (c2, r2) = preference_parts(cut)
    assert status == "truncated" and p2 == prompt[-6:] and (c2, r2) == (chosen, rejected)
    longest = len(prompt) + max(len(chosen), len(rejected))
    cut, status = preference_policy(ex, max_len=longest - 2)
    p3, (c3, r3) = preference_parts(cut)
    assert status == "truncated" and p3 == prompt and c3 == chosen[:len(c3)] and len(prompt) + len(c3) <= longest - 2
    gone, status = preference_policy(ex, max_len=len(prompt))  # the prompt fills it: no completion token left
    assert gone is None and status == "dropped_no_trained_tokens"


def test_layouts_detected_and_emptied_pairs_counted_through_the_cache(tokenizer, tmp_path):
    long_prompt = dict(PAIR_ROW, prompt="word " * 80)
    path = write_jsonl(tmp_path / "pairs.jsonl", [PAIR_ROW, long_prompt, PAIR_ROW])
    data = _prepare(path, tokenizer, tmp_path, model_max_len=60, prompt_format="chatml")
    assert len(data.train) == 2 and all(ex.pref[0] == PAIR for ex in data.train)
    assert data.sources[0].format == "pairs"
    assert any("1 dropped: no trained token left" in line and "pairs.jsonl:2" in line for line in data.lines)
    kto = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "p", "completion": "yes", "label": True},
                                               {"prompt": "p", "completion": "no", "label": False}])
    kinds = [ex.pref[0] for ex in _prepare(kto, tokenizer, tmp_path).train]
    assert sorted(kinds) == [KTO_GOOD, KTO_BAD]


def test_data_check_shows_a_pairs_spans(tokenizer, tmp_path):
    from qlorakit.data.check import check_data

    path = write_jsonl(tmp_path / "pairs.jsonl", [PAIR_ROW])
    opts = DataOptions(tuple(parse_dataset_arg(str(path), "dataset", "auto")), cache_dir=str(tmp_path / "cache"),
                       prompt_format="chatml")
    report = check_data(opts, tokenizer)
    prompt = report[report.index("prompt ("):report.index("\nchosen (")]
    assert PAIR_ROW["prompt"] in prompt and prompt.endswith("<|im_start|>assistant\n")
    assert "\nchosen (7 tokens): «The text does not say.<|im_end|>»" in report
    assert "\nrejected (" in report and "«Kelmarsh.<|im_end|>»" in report
