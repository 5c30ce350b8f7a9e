"""Wrapping the model for torchrun: DDP by default, FSDP2 with ``--fsdp true``; the model under its wrapper; the
adapter and optimizer state gathered from (and scattered back to) the ranks for checkpoints. (Each rank's share of a
step is planned in schedule.py.)

Under FSDP2 every LoRA parameter is a ``DTensor`` holding this rank's rows. Gathering full tensors is a collective,
so ``adapter_state`` and ``optimizer_state`` must be called by every rank, in the same order; they return the full
CPU tensors on rank 0 (and what the other ranks get is not used). Without FSDP they are the plain state dicts.
"""

from __future__ import annotations

import torch

from . import processes
from ..config import TrainConfig
from ..errors import UserError
from ..model.lora import unwrap


def wrap_model(model, cfg: TrainConfig, info: processes.DistInfo, device: torch.device):
    """``model`` unchanged in one process; DDP (or FSDP2) over the torchrun process group otherwise."""
    if not info.enabled:
        if cfg.fsdp:
            raise UserError("fsdp: needs several processes; launch with torchrun --nproc_per_node N "
                             "(or qlorakit train --nproc N)")
        return model
    if cfg.fsdp:
        if cfg.bits == 8:
            raise UserError("fsdp: 8-bit base weights cannot be sharded; use --bits 4 (QLoRA) or 16, or drop --fsdp "
                            "to replicate the model with DDP")
        return _fsdp2(model, device)
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    # The buffers (rotary tables) are the same on every rank and never change: no broadcast before each forward.
    return DDP(model, device_ids=ids, find_unused_parameters=False, broadcast_buffers=False)


def _fsdp2(model, device: torch.device):
    """Shard every decoder layer and then the root with FSDP2 (``fully_shard``). 4-bit weights are stored in the
    compute dtype (``bnb_4bit_quant_storage``) so FSDP can flatten and shard them like any other parameter."""
    from torch.distributed.fsdp import fully_shard

    base = model.get_base_model()
    layers = _decoder_layers(base)
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _decoder_layers(model) -> list[torch.nn.Module]:
    for attr in ("model.layers", "transformer.blocks", "transformer.h", "model.decoder.layers"):
        obj = model
        try:
            for part in attr.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return list(obj)
    raise UserError(f"fsdp: cannot find the decoder layers of {type(model).__name__}")


def is_fsdp(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def adapter_state(model) -> dict:
    """The adapter weights as full CPU tensors in peft's file layout. A collective under FSDP: call on every rank."""
    from peft.utils import get_peft_model_state_dict

    peft_model = unwrap(model)
    if not is_fsdp(model):
        return get_peft_model_state_dict(peft_model)
    from torch.distributed.tensor import DTensor

    full = {}
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            t = p.detach()
            full[name] = (t.full_tensor() if isinstance(t, DTensor) else t).cpu()
    return get_peft_model_state_dict(peft_model, state_dict=full)


def load_adapter(model, weights: dict) -> None:
    """Put the adapter weights of a checkpoint (full tensors, read by every rank) into ``model``; under FSDP each
    rank keeps its own rows."""
    from peft.utils import set_peft_model_state_dict

    peft_model = unwrap(model)
    if not is_fsdp(model):
        set_peft_model_state_dict(peft_model, weights)
        return
    from torch.distributed.tensor import DTensor, distribute_tensor

    # get_peft_model_state_dict names a parameter without its adapter name: lora_A.default.weight -> lora_A.weight
    params = {name.replace(".default", ""): p for name, p in peft_model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(weights))
    if missing:
        raise UserError(f"the checkpoint's adapter lacks {len(missing)} weights of this model, e.g. {missing[0]}")
    with torch.no_grad():
        for key, p in params.items():
            full = weights[key].to(device=p.device, dtype=p.dtype)
            if isinstance(p, DTensor):  # every rank holds the full tensor: cut out this rank's rows locally
                full = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
                p.to_local().copy_(full)
            else:
                p.copy_(full)


def optimizer_state(model, optimizer) -> dict:
    """The optimizer's state for a checkpoint. Under FSDP: full tensors keyed by parameter name, on rank 0
    (a collective: call on every rank)."""
    if not is_fsdp(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer(model, optimizer, state: dict) -> None:
    """Restore a checkpoint's optimizer state, whichever way it was written: keyed by position (one process, DDP)
    or by parameter name (FSDP), so a run can switch between DDP and FSDP when it resumes."""
    name_of = {id(p): n for n, p in unwrap(model).named_parameters()}
    names = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]  # the optimizer's order
    if not is_fsdp(model):
        optimizer.load_state_dict(_rekey(state, {n: i for i, n in enumerate(names)}))
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, _rekey(state, dict(enumerate(names))),
                             options=StateDictOptions(full_state_dict=True))


def _rekey(state: dict, key: dict) -> dict:
    """``state`` with its parameter keys mapped through ``key`` where they are not already of the wanted kind."""
    def k(x):
        return key.get(x, x)

    return {"state": {k(p): v for p, v in state["state"].items()},
            "param_groups": [{**g, "params": [k(p) for p in g["params"]]} for g in state["param_groups"]]}
