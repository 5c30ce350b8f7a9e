"""The frozen reference's log-probabilities, computed once before the first step.

The reference is the model the run starts from (``reference init``: the ``init_from`` adapter, or a fresh adapter,
which equals the base) or the bare base (``reference base``: the adapter switched off). Either way it is the same
weights as the policy at step 0, so no second copy of the model is loaded: its log-probabilities are computed before
training moves the adapter, in eval mode (dropout off) and in the same autocast precision as the training forward,
and stay fixed. So DPO's loss at step 0 is exactly ln 2 and its rewards 0 when the reference is the starting point.
Under torchrun each rank computes a share and the shares are summed. ``precompute_reference`` keeps them in the
data cache under a key of the data and the reference (the starting adapter's bytes), for later runs and resumes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch

from ...model.lora import unwrap
from .. import processes
from .forward import sequence_logps

log = logging.getLogger("qlorakit")


@torch.no_grad()
def reference_logps(model, objective, examples, split: str, *, pad_id: int, packing: bool, device: torch.device,
                    use_bf16: bool, batch_size: int, base: bool, info: processes.DistInfo) -> np.ndarray:
    """(N, 2) float64 summed log-probabilities of each example's completions under the reference: chosen and
    rejected of a pair; a KTO row's completion and its KL pair's (its prompt with the next row's completion)."""
    from ..step import autocast

    n = len(examples)
    out = torch.zeros((n, 2), dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    off = unwrap(model).disable_adapter() if base else contextlib.nullcontext()
    try:
        with off:
            for start in range(info.rank * batch_size, n, batch_size * info.world_size):
                ids = list(range(start, min(start + batch_size, n)))
                batch = objective.collate(examples, ids, pad_id, packing, split="(reference)")
                with autocast(device, use_bf16):
                    sums = sequence_logps(model, batch, device)[0].double()
                    if "pref_kl" in batch:
                        kl = sequence_logps(model, batch["pref_kl"], device)[0].double()
                        sums = torch.stack([sums, kl], dim=1)
                out[ids] = sums.view(len(ids), 2)
    finally:
        model.train(was_training)
    if info.enabled:
        torch.distributed.all_reduce(out)
    return out.cpu().numpy()


def reference_key(data_fingerprint: str, split: str, identity: dict) -> str:
    blob = json.dumps({"data": data_fingerprint, "split": split, **identity}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def adapter_digest(model) -> str:
    """sha256 of the starting adapter's tensors (names, dtypes, bytes), the reference's identity."""
    h = hashlib.sha256()
    for name, p in sorted(unwrap(model).named_parameters()):
        if "lora_" in name:
            h.update(name.encode())
            h.update(str(p.dtype).encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def load_or_compute(compute, cache: Path | None, info: processes.DistInfo) -> np.ndarray:
    """``compute()``, or the array cached at ``cache`` (written there after computing; rank 0 writes)."""
    if cache is not None and cache.is_file():
        if info.is_main:
            log.info("reference log-probabilities: loaded from %s", cache)
        return np.load(cache, allow_pickle=False)
    values = compute()
    if cache is not None and info.is_main:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npy")
        np.save(tmp, values, allow_pickle=False)
        tmp.replace(cache)
        log.info("reference log-probabilities: computed, kept in %s", cache)
    return values
