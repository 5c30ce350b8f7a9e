"""offload_activations: each micro-batch's forward and backward run under hooks that copy saved activations to host
memory (parameters and small tensors stay), which changes no number; the hooks really see the saved tensors (with
checkpointing, fewer of them: the layers' inputs); the key
reads as the other yes/no keys do, and a run logs it and records it in its config."""

from __future__ import annotations

import logging

import pytest
import torch
import yaml

from helpers import SGD_ONE_STEP, airoboros_rows, lora_model, random_examples, read_metrics, train_with, write_jsonl
from qlorakit.config import ConfigError, build_config
from qlorakit.data.batching import collate
from qlorakit.model.load import enable_gradient_checkpointing, load_base_model
from qlorakit.train import step
from qlorakit.train.step import accumulate, count_trained

pytestmark = pytest.mark.numerics  # rerun on AVX2 kernels where the CPU has AVX512

HIDDEN = 64  # tests/helpers.make_tiny_llama: 2 layers of width 64


def counting(packed: list):
    """A step.activation_offload that records every tensor its pack hook gets (shape, and the device of the copy
    it keeps), then packs and unpacks as the real one does."""
    real = step.activation_offload

    def offload(device):
        hooks = real(device)

        def pack(t):
            kept = hooks.pack_hook(t)
            packed.append((tuple(t.shape), kept[1].device))
            return kept

        return torch.autograd.graph.saved_tensors_hooks(pack, hooks.unpack_hook)

    return offload


def _model(path, device, checkpointing: bool):
    base = load_base_model(str(path), bits=4, bf16=False, device=device)
    if checkpointing:
        enable_gradient_checkpointing(base)
    return lora_model(base, dropout=0.1, fused=True)


def _step(model, batches, device, offload: bool):
    """One step's accumulate, from the same dropout seed: the summed loss and the gradients."""
    torch.manual_seed(3)
    loss = accumulate(model, batches, device, False, count_trained(batches), offload=offload)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss, grads


def _batches(lengths):
    return [collate([e], 0, packing=True) for e in random_examples(lengths)]


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_offload_gives_the_same_loss_and_gradients(tiny_llama, monkeypatch, checkpointing):
    packed: list = []
    monkeypatch.setattr(step, "activation_offload", counting(packed))
    cpu = torch.device("cpu")
    model, batches = _model(tiny_llama, cpu, checkpointing), _batches([23, 9])
    loss_off, grads_off = _step(model, batches, cpu, offload=False)
    assert packed == []  # off: no hooks
    loss_on, grads_on = _step(model, batches, cpu, offload=True)
    assert packed and all(where.type == "cpu" for _, where in packed)
    assert loss_on == loss_off
    assert grads_on.keys() == grads_off.keys() and any("lora_A" in n for n in grads_on)
    for n in grads_on:
        assert torch.equal(grads_on[n], grads_off[n]), n


def test_with_checkpointing_the_layer_inputs_are_what_is_offloaded(tiny_llama, monkeypatch):
    """Without checkpointing every op's saved tensors go through the hooks (120 here); with it, each decoder layer
    saves only its input (1 x T x hidden), and the final norm and the head theirs (13 here)."""
    cpu, batches = torch.device("cpu"), _batches([23])
    seen = {}
    for checkpointing in (False, True):
        packed: list = []
        monkeypatch.setattr(step, "activation_offload", counting(packed))
        _step(_model(tiny_llama, cpu, checkpointing), batches, cpu, offload=True)
        seen[checkpointing] = [shape for shape, _ in packed]
    assert seen[True].count((1, 23, HIDDEN)) >= 2  # the two layers' inputs (the final norm's input too)
    assert 0 < len(seen[True]) < len(seen[False]) / 4, (len(seen[True]), len(seen[False]))


def test_parameters_and_small_tensors_stay_in_place():
    """A frozen weight is saved by every matmul that uses it: copying it would move the whole base model out and
    back on each micro-batch (what torch's save_on_cpu does). Small tensors are not worth a copy either."""
    hooks = step.activation_offload(torch.device("cpu"))
    weight = torch.nn.Parameter(torch.randn(64, 64), requires_grad=False)
    small = torch.randn(4)
    activation = torch.randn(8, 64)
    for kept in (weight, small):
        where, t = hooks.pack_hook(kept)
        assert where is None and t is kept and hooks.unpack_hook((where, t)) is kept
    where, copy = hooks.pack_hook(activation)
    assert where == activation.device and copy is not activation
    assert copy.untyped_storage().data_ptr() != activation.untyped_storage().data_ptr()
    assert torch.equal(hooks.unpack_hook((where, copy)), activation)


def test_the_host_copy_keeps_the_saved_tensors_layout():
    """Backward reads the copy in place of the saved tensor, so it must have its strides: a contiguous copy of a
    transposed view changed the gradients in their last bits on an AMX Xeon (the test above caught it there); this
    catches the contiguous twin on any CPU. An expanded tensor (stride 0) gets a dense copy of the same values."""
    hooks = step.activation_offload(torch.device("cpu"))
    for saved in (torch.randn(64, 96).t(), torch.randn(8, 64, 32).permute(2, 0, 1), torch.randn(64, 96)):
        where, copy = hooks.pack_hook(saved)
        assert copy is not saved and copy.stride() == saved.stride() and torch.equal(copy, saved)
    expanded = torch.randn(64, 1).expand(64, 96)
    where, copy = hooks.pack_hook(expanded)
    assert torch.equal(hooks.unpack_hook((where, copy)), expanded)


def test_the_key_reads_as_a_yes_no_key():
    assert build_config([]).offload_activations is False
    assert build_config(["--offload_activations"]).offload_activations is True  # the bare flag
    assert build_config(["--offload_activations", "true"]).offload_activations is True
    assert build_config(["--offload_activations", "false"]).offload_activations is False
    with pytest.raises(ConfigError, match="offload_activations: 'sometimes' .* is not true or false"):
        build_config(["--offload_activations", "sometimes"])


def test_a_run_with_offload_logs_it_records_it_and_trains_the_same(tiny_llama, tmp_path, monkeypatch, caplog):
    data = write_jsonl(tmp_path / "d.jsonl", airoboros_rows(4))
    common = ["--model_name_or_path", str(tiny_llama), "--dataset", str(data), *SGD_ONE_STEP, "--max_steps", "2",
              "--gradient_checkpointing", "true", "--per_device_train_batch_size", "1",
              "--gradient_accumulation_steps", "2"]
    packed: list = []
    monkeypatch.setattr(step, "activation_offload", counting(packed))
    with caplog.at_level(logging.INFO, logger="qlorakit"):
        train_with([*common, "--output_dir", str(tmp_path / "off")], progress=False)
        assert packed == [] and "activation offload: off" in caplog.text
        caplog.clear()
        train_with([*common, "--output_dir", str(tmp_path / "on"), "--offload_activations"], progress=False)
    assert caplog.text.count("activation offload: on") == 1
    assert packed  # the hooks ran in the run's steps
    saved = yaml.safe_load((tmp_path / "on" / "qlorakit_config.yaml").read_text())
    assert saved["offload_activations"] is True
    assert yaml.safe_load((tmp_path / "off" / "qlorakit_config.yaml").read_text())["offload_activations"] is False
    assert [r["loss"] for r in read_metrics(tmp_path / "on", "loss")] == \
        [r["loss"] for r in read_metrics(tmp_path / "off", "loss")]


@pytest.mark.cuda
def test_on_cuda_the_saved_tensors_wait_in_pinned_host_memory(tiny_llama):
    cuda = torch.device("cuda")
    model, batches = _model(tiny_llama, cuda, checkpointing=True), _batches([23, 9])
    hooks = step.activation_offload(cuda)
    kept = hooks.pack_hook(torch.ones(4, device=cuda))
    assert kept[1].device.type == "cpu" and kept[1].is_pinned()
    assert torch.equal(hooks.unpack_hook(kept), torch.ones(4, device=cuda))
    (loss_off, grads_off), (loss_on, grads_on) = (_step(model, batches, cuda, offload) for offload in (False, True))
    assert loss_on == pytest.approx(loss_off, rel=1e-6)
    for n in grads_on:
        torch.testing.assert_close(grads_on[n], grads_off[n], rtol=1e-5, atol=1e-7)
