"""NEFTune: noise of alpha / sqrt(L_i * d) per example, with L_i each example's own length inside a packed row (not
the row's, transformers' twin), none on padding; and none in eval mode, in generation, or outside a training step."""

from __future__ import annotations

import pytest
import torch

from helpers import random_examples
from qlorakit.data.batching import collate_padded, collate_varlen
from qlorakit.model.load import load_base_model
from qlorakit.model.lora import add_lora, target_modules
from qlorakit.model.neftune import add_neftune, example_lengths
from qlorakit.train.step import accumulate

ALPHA = 5.0
LENGTHS = [6, 40, 150]  # a packed row of three examples


def _model(path, alpha: float):
    base = load_base_model(str(path), bits=16, bf16=False, device=torch.device("cpu"))
    model = add_lora(base, r=4, alpha=8, dropout=0.0, modules=target_modules(base, "all"), seed=0)
    add_neftune(model, alpha)
    return model


def _capture(model) -> list[torch.Tensor]:
    """The input embeddings' outputs, as the layers after them see them (after NEFTune's hook)."""
    seen = []
    model.get_input_embeddings().register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    return seen


def _noise(model, batch: dict, seen: list) -> torch.Tensor:
    clean = model.get_input_embeddings().weight.detach()[batch["input_ids"]]
    return seen[-1] - clean  # (B, T, d)


@pytest.fixture(scope="module")
def model(tiny_llama):
    return _model(tiny_llama, ALPHA)


def test_packed_row_noise_is_scaled_by_each_examples_own_length(model):
    seen = _capture(model)
    batch = collate_varlen(random_examples(LENGTHS))
    model.train()
    torch.manual_seed(0)
    with example_lengths(model, batch):
        model(**{k: v for k, v in batch.items() if k != "targets"})
    noise = _noise(model, batch, seen)[0]  # (T, d)
    d, T = noise.shape[1], noise.shape[0]
    start = 0
    for L in LENGTHS:
        part = noise[start:start + L] / (ALPHA / (L * d) ** 0.5)  # uniform on [-1, 1] where the scale is right
        start += L
        assert float(part.abs().max()) <= 1 + 1e-5
        assert float(part.abs().max()) > 0.95  # L*d >= 384 draws: the bound is reached, not a smaller scale
        assert abs(float((part ** 2).mean()) - 1 / 3) < 0.06  # the variance of uniform(-1, 1)
    # transformers' twin scales by the whole row (T tokens): the short example's noise would stay 6x smaller
    whole_row = ALPHA / (T * d) ** 0.5
    assert float(noise[:LENGTHS[0]].abs().max()) > 3 * whole_row


def test_padded_batch_noise_per_row_length_and_none_on_padding(model):
    seen = _capture(model)
    batch = collate_padded(random_examples([9, 30]), pad_id=0)
    model.train()
    with example_lengths(model, batch):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    noise = _noise(model, batch, seen)
    d = noise.shape[-1]
    assert float(noise[0, 9:].abs().max()) == 0.0  # padding
    for row, L in ((0, 9), (1, 30)):
        part = noise[row, :L] / (ALPHA / (L * d) ** 0.5)
        assert 0.95 < float(part.abs().max()) <= 1 + 1e-5


def test_no_noise_in_eval_mode_even_inside_a_training_steps_context(model):
    seen = _capture(model)
    batch = collate_varlen(random_examples(LENGTHS))
    model.eval()
    with example_lengths(model, batch):
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
    assert float(_noise(model, batch, seen).abs().max()) == 0.0
    model.train()


def test_no_noise_outside_a_training_step_nor_in_generation(model):
    """In train mode but with no example lengths set (as generation and any forward outside ``accumulate`` are),
    the embeddings are clean; so is every step of ``generate``, in eval and in train mode."""
    seen = _capture(model)
    ids = torch.arange(5, 25)[None]
    model.train()
    model(input_ids=ids)
    assert float(_noise(model, {"input_ids": ids}, seen).abs().max()) == 0.0
    for mode in (model.eval, model.train):
        mode()
        seen.clear()
        out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert len(seen) >= 4
        inputs = [ids] + [out[:, ids.shape[1] + k:ids.shape[1] + k + 1] for k in range(len(seen) - 1)]
        for got, step_ids in zip(seen, inputs):
            assert torch.equal(got, model.get_input_embeddings().weight.detach()[step_ids])
    model.train()


def test_the_training_step_adds_the_noise(model, tiny_llama):
    """``accumulate`` (the training step's forward and backward) sets the lengths: its loss differs from the same
    step without NEFTune, and the embeddings it saw carry noise; alpha 0 hooks nothing."""
    seen = _capture(model)
    batch = collate_varlen(random_examples(LENGTHS))
    n = int((batch["targets"] != -100).sum())
    model.train()
    torch.manual_seed(1)
    noisy = accumulate(model, [batch], torch.device("cpu"), False, n)
    assert float(_noise(model, batch, seen).abs().max()) > 0
    plain = _model(tiny_llama, 0.0)
    plain.train()
    torch.manual_seed(1)
    clean = accumulate(plain, [batch], torch.device("cpu"), False, n)
    assert noisy != clean
    assert add_neftune(plain, 0.0) is None
    assert not any(hasattr(m, "_qlorakit_neftune") for m in plain.modules())
