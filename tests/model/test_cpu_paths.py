"""Every CPU takes the same numeric path through a 4-bit layer.

bitsandbytes 0.50 picks its CPU path by processor: on AVX512-BF16 it repacks a ``Linear4bit`` in place the first
time the layer runs in eval mode on an input without grad, and from then on multiplies in bf16 through a kernel
with no backward. qlorakit turns that off at load (``keep_bnb_cpu_layout``). These tests hold on every CPU; the
broken twin (the repacking left on) is shown caught where the processor has that path. docs/testing.md says how
to run the suite on the AVX2 kernels of a newer processor.
"""

from __future__ import annotations

import pytest
import torch

from qlorakit.model.load import cache_dequantized, keep_bnb_cpu_layout, load_base_model
from qlorakit.model.lora import add_lora, target_modules

pytestmark = pytest.mark.numerics  # rerun on AVX2 kernels where the CPU has AVX512


def _bnb_has_avx512bf16_path() -> bool:
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


def _lora(path, cache: bool):
    base = load_base_model(str(path), bits=4, bf16=False, device=torch.device("cpu"))
    if cache:
        cache_dequantized(base, torch.float32)
    model = add_lora(base, r=4, alpha=8, dropout=0.0, modules=target_modules(base, "all"), seed=0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.constant_(p, 0.01)
    return model


def _eval_then_train(model, ids):
    """What a training run does around an evaluation: an eval pass without grad, then a training step."""
    model.eval()
    with torch.no_grad():
        eval_loss = model(input_ids=ids, labels=ids).loss
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return eval_loss, loss.detach(), grads


def _agree(quant, dense, ids) -> None:
    """Raises unless the 4-bit model and its dequantized twin agree through an eval pass and a training step."""
    q_eval, q_loss, q_grads = _eval_then_train(quant, ids)
    d_eval, d_loss, d_grads = _eval_then_train(dense, ids)
    torch.testing.assert_close(q_eval, d_eval, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(q_loss, d_loss, rtol=1e-6, atol=1e-6)
    assert q_grads.keys() == d_grads.keys(), "some LoRA weights got no gradient"
    for n, g in d_grads.items():
        torch.testing.assert_close(q_grads[n], g, rtol=1e-5, atol=1e-6)


def test_loaded_4bit_layers_never_repack_for_the_cpu(tiny_llama):
    import bitsandbytes as bnb

    base = load_base_model(str(tiny_llama), bits=4, bf16=False, device=torch.device("cpu"))
    layers = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in layers)
    assert keep_bnb_cpu_layout(base) == 0  # nothing left to turn off


def test_eval_pass_leaves_4bit_training_equal_to_dense(tiny_llama):
    """Eval loss, training loss and every LoRA gradient equal the dequantized model's on any processor."""
    ids = torch.arange(5, 60)[None]
    _agree(_lora(tiny_llama, cache=False), _lora(tiny_llama, cache=True), ids)


@pytest.mark.skipif(not _bnb_has_avx512bf16_path(), reason="bitsandbytes has no AVX512-BF16 path on this CPU")
def test_repacking_twin_is_caught(tiny_llama):
    """With bitsandbytes' repacking left on, the eval pass runs in bf16 and the training step after it loses
    gradients: the comparison above fails."""
    import bitsandbytes as bnb

    quant = _lora(tiny_llama, cache=False)
    for m in quant.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = True
    with pytest.raises(AssertionError):
        _agree(quant, _lora(tiny_llama, cache=True), torch.arange(5, 60)[None])
