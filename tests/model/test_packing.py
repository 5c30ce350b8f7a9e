"""A packed batch gives each example the loss it has alone; packing without restarting positions leaks attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import airoboros_rows
from qlorakit.data.batching import collate_packed, collate_padded, epoch_order, plan_steps
from qlorakit.data.formats import Conversation, Message
from qlorakit.data.tokenize import IGNORE, tokenize_all

pytestmark = pytest.mark.numerics  # rerun on AVX2 kernels where the CPU has AVX512


@pytest.fixture(scope="module")
def llama(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


def examples(tokenizer, n=3):
    convs = [Conversation((Message("user", r["instruction"]), Message("assistant", r["response"])), f"x:{i}")
             for i, r in enumerate(airoboros_rows(n, seed=3))]
    return tokenize_all(convs, tokenizer, "airoboros", 512)[0]


def per_token_loss(model, batch):
    with torch.no_grad():
        kw = {k: v for k, v in batch.items() if k != "targets"}
        logits = model(**kw, use_cache=False).logits  # a cache would disable the packed-sequence mask
    t = batch["targets"]
    return F.cross_entropy(logits.flatten(0, 1), t.flatten(), reduction="none", ignore_index=IGNORE).view(t.shape)


def test_packed_losses_equal_separate_losses_and_twin_differs(llama, tokenizer):
    exs = examples(tokenizer)
    alone = [per_token_loss(llama, collate_packed([e]))[0] for e in exs]
    packed = collate_packed(exs)
    together = per_token_loss(llama, packed)[0]
    leaky = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1])[None])  # the broken twin
    leaked = per_token_loss(llama, leaky)[0]
    start = 0
    for i, (e, a) in enumerate(zip(exs, alone)):
        seg = slice(start, start + len(e))
        torch.testing.assert_close(together[seg], a, atol=1e-4, rtol=1e-4)
        if i > 0:  # later examples would see earlier ones through attention
            assert (leaked[seg] - a).abs().max() > 1e-3
        start += len(e)


def test_padded_batch_matches_separate(llama, tokenizer):
    exs = examples(tokenizer)
    padded = per_token_loss(llama, collate_padded(exs, tokenizer.pad_token_id))
    for i, e in enumerate(exs):
        alone = per_token_loss(llama, collate_padded([e], tokenizer.pad_token_id))[0]
        torch.testing.assert_close(padded[i, :len(e)], alone, atol=1e-4, rtol=1e-4)
        assert (padded[i, len(e):] == 0).all()  # padding is never trained


def test_order_does_not_depend_on_batch_size():
    order = epoch_order(10, seed=1, epoch=0)
    flat = lambda steps: [i for s in steps for mb in s for i in mb]  # noqa: E731
    four = plan_steps(order, 4, 1)
    ones = plan_steps(order, 1, 4)
    assert [flat([s]) for s in four] == [flat([s]) for s in ones]
    assert sorted(flat(four)) == list(range(10))  # the short last step keeps every example
    assert epoch_order(10, 1, 0) != epoch_order(10, 1, 1)  # a new order each epoch


def test_packed_attention_skips_cross_example_work_with_the_same_numbers(tiny_llama, tokenizer):
    from transformers import AutoModelForCausalLM

    from qlorakit.model.attention import NAME, use_packed_attention

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    exs = examples(tokenizer)
    alone = [per_token_loss(model, collate_packed([e]))[0] for e in exs]
    assert use_packed_attention(model) and model.config._attn_implementation == NAME
    packed = collate_packed(exs)
    together = per_token_loss(model, packed)[0]
    # the twin: the same implementation told nothing about the boundaries attends across examples
    leaky = per_token_loss(model, {k: v for k, v in packed.items() if k != "cu_seq_lens_q"}
                           | {"position_ids": torch.arange(packed["input_ids"].shape[1])[None]})[0]
    start = 0
    for i, (e, a) in enumerate(zip(exs, alone)):
        seg = slice(start, start + len(e))
        torch.testing.assert_close(together[seg], a, atol=1e-4, rtol=1e-4)
        if i > 0:
            assert (leaky[seg] - a).abs().max() > 1e-3
        start += len(e)
    # padded batches (generation, MPT-style) still get their mask
    padded = per_token_loss(model, collate_padded(exs, tokenizer.pad_token_id))
    torch.testing.assert_close(padded[1, :len(exs[1])], alone[1], atol=1e-4, rtol=1e-4)
