"""Wrapping the model for torchrun: DDP by default, FSDP2 with ``--fsdp true``."""

from __future__ import annotations

import torch

from .. import dist
from ..config import TrainConfig
from ..errors import UserError


def wrap_model(model, cfg: TrainConfig, info: dist.DistInfo, device: torch.device):
    """``model`` unchanged in one process; DDP (or FSDP2) over the torchrun process group otherwise."""
    if not info.enabled:
        if cfg.fsdp:
            raise UserError("fsdp: needs several processes; launch with torchrun --nproc_per_node N "
                             "(or qlorakit train --nproc N)")
        return model
    if cfg.fsdp:
        return _fsdp2(model, device)
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids, find_unused_parameters=False)


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
