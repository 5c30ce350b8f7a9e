"""CUDA-only choices, tested on any machine by faking the device: the fused AdamW, peak memory, the FSDP refusal."""

from __future__ import annotations

import pytest
import torch

from qlorakit.errors import UserError
from qlorakit.model.cuda import adamw_options, check_fsdp_weights, peak_memory, reset_peak_memory

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def test_fused_adamw_only_where_every_parameter_is_on_cuda():
    assert adamw_options([torch.zeros(2, requires_grad=True)]) == {}
    assert adamw_options([]) == {}

    class OnCuda:
        is_cuda = True

        def is_floating_point(self):
            return True

    assert adamw_options([OnCuda(), OnCuda()]) == {"fused": True}
    assert adamw_options([OnCuda(), torch.zeros(2)]) == {}


def test_peak_memory_is_empty_off_cuda():
    reset_peak_memory(CPU)
    assert peak_memory(CPU) == {}


def test_fsdp_over_packed_4bit_weights_is_refused_on_cuda_in_one_line():
    with pytest.raises(UserError) as e:
        check_fsdp_weights(CUDA, fsdp=True, bits=4, dense_base=False)
    msg = str(e.value)
    assert "\n" not in msg and "1945" in msg and "DDP" in msg and "--cache_dequantized true" in msg


@pytest.mark.parametrize("device,fsdp,bits,dense", [
    (CPU, True, 4, False),  # the CPU keeps the bits: the multi-process tests run this
    (CUDA, False, 4, False),  # DDP replicates the 4-bit model
    (CUDA, True, 4, True),  # dequantized once to 16-bit layers
    (CUDA, True, 16, False),
])
def test_other_combinations_pass(device, fsdp, bits, dense):
    check_fsdp_weights(device, fsdp=fsdp, bits=bits, dense_base=dense)


@pytest.mark.cuda
def test_cuda_peak_memory_and_fused_adamw():
    reset_peak_memory(CUDA)
    x = torch.empty(256 * 2 ** 20, dtype=torch.uint8, device=CUDA)  # 0.25 GiB
    peak = peak_memory(CUDA)
    assert peak["peak_allocated_gib"] >= 0.25 and peak["peak_reserved_gib"] >= peak["peak_allocated_gib"]
    del x
    p = torch.zeros(4, device=CUDA, requires_grad=True)
    opt = torch.optim.AdamW([p], lr=0.1, **adamw_options([p]))
    assert opt.defaults["fused"] is True
    p.sum().backward()
    opt.step()
    assert (p != 0).all()
