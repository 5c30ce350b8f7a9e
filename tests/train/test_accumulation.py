"""Gradient accumulation is exactly a bigger batch: batch 4 x GA 1 == batch 1 x GA 4, and mean-of-means is not."""

from __future__ import annotations

import pytest
import torch

from helpers import SGD_ONE_STEP, airoboros_rows, lora_b, rel_diff, write_jsonl
from qlorakit.cli import main
from qlorakit.data.batching import collate
from qlorakit.data.formats import read_jsonl
from qlorakit.data.tokenize import tokenize_all
from qlorakit.train.step import accumulate, count_trained, loss_sum

pytestmark = pytest.mark.numerics  # rerun on AVX2 kernels where the CPU has AVX512

def forty_fold_rows(tmp_path):
    rows = airoboros_rows(4)
    lens = [len(r["response"].split()) for r in rows]
    assert max(lens) / min(lens) >= 40  # responses differ forty-fold
    return write_jsonl(tmp_path / "rows.jsonl", rows)


def test_batch_equals_accumulation_through_cli(tiny_llama, tmp_path):
    data = forty_fold_rows(tmp_path)
    common = ["--model_name_or_path", str(tiny_llama), "--dataset", str(data), *SGD_ONE_STEP]
    assert main(["train", *common, "--output_dir", str(tmp_path / "b4"), "--per_device_train_batch_size", "4",
                 "--gradient_accumulation_steps", "1"]) == 0
    assert main(["train", *common, "--output_dir", str(tmp_path / "ga4"), "--per_device_train_batch_size", "1",
                 "--gradient_accumulation_steps", "4"]) == 0
    b4, ga4 = lora_b(tmp_path / "b4"), lora_b(tmp_path / "ga4")
    assert sum(float(v.abs().sum()) for v in b4.values()) > 0  # the step really moved the adapter
    assert rel_diff(b4, ga4) < 1e-3


def _grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_mean_of_means_twin_is_caught(tiny_llama, tokenizer, tmp_path):
    """The token-normalized accumulation matches one big batch; dividing each micro-batch by its own token count
    (mean of means, the bug the original model card suspected) does not."""
    from qlorakit.model.load import load_base_model
    from qlorakit.model.lora import add_lora, target_modules

    convs = read_jsonl(forty_fold_rows(tmp_path))
    examples, _ = tokenize_all(convs, tokenizer, "airoboros", 512)
    base = load_base_model(str(tiny_llama), bits=16, bf16=False, device=torch.device("cpu"))
    model = add_lora(base, r=4, alpha=8, dropout=0.0, modules=target_modules(base, "all"), seed=0)
    for n, p in model.named_parameters():  # make B non-zero so that A gets gradients too
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    cpu = torch.device("cpu")

    big = [collate(examples, tokenizer.pad_token_id, packing=True)]
    accumulate(model, big, cpu, False, count_trained(big))
    want = _grads(model)
    model.zero_grad()

    micro = [collate([e], tokenizer.pad_token_id, packing=True) for e in examples]
    accumulate(model, micro, cpu, False, count_trained(micro))
    assert rel_diff(want, _grads(model)) < 1e-4
    model.zero_grad()

    for b in micro:  # the twin: mean per micro-batch, averaged over micro-batches
        loss, n = loss_sum(model, b, cpu)
        (loss / n / len(micro)).backward()
    assert rel_diff(want, _grads(model)) > 1e-2
