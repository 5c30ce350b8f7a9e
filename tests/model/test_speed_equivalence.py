"""Speed techniques keep the numbers: cached dequantized weights give exactly what bitsandbytes computes."""

from __future__ import annotations

import pytest
import torch

from qlorakit.model.load import cache_dequantized, load_base_model
from qlorakit.model.lora import add_lora, target_modules

pytestmark = pytest.mark.numerics  # rerun on AVX2 kernels where the CPU has AVX512


def _lora_model(path, cache: bool):
    base = load_base_model(str(path), bits=4, bf16=False, device=torch.device("cpu"))
    if cache:
        assert cache_dequantized(base, torch.float32) > 0
    return add_lora(base, r=4, alpha=8, dropout=0.0, modules=target_modules(base, "all"), seed=0)


def test_cached_dequantized_weights_are_numerically_identical(tiny_llama):
    import bitsandbytes as bnb

    quant, cached = _lora_model(tiny_llama, False), _lora_model(tiny_llama, True)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in quant.modules())
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in cached.modules())
    for m in (quant, cached):
        for n, p in m.named_parameters():
            if "lora_B" in n:
                torch.nn.init.constant_(p, 0.01)
    ids = torch.arange(5, 60)[None]
    outs = []
    for m in (quant, cached):
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        outs.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-6, atol=1e-6)
    for n, g in outs[0][1].items():
        torch.testing.assert_close(g, outs[1][1][n], rtol=1e-5, atol=1e-6)
