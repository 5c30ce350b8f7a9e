"""Objectives: how examples become a micro-batch and a micro-batch a summed loss and its summed metrics. The loop
(setup, fit, step, checkpoints, DDP, trackers) is the same for every method; only the objective differs.

An objective has ``name``, ``preference``, ``collate(examples, ids, pad_id, packing, budget, split)``,
``count(batches)`` (the step's unit: trained tokens for sft, examples for preference methods) and
``loss(model, batch, device, chunked) -> (summed loss, summed metrics)``.
"""

from __future__ import annotations

from ...config import TrainConfig
from ...config_methods import method_beta
from .preference import KTO, Pairs
from .sft import SFT


def objective_for(cfg: TrainConfig):
    """The objective of ``cfg.method``, with its keys (a beta of 0 is the method's paper value)."""
    if cfg.method == "sft":
        return SFT(cfg.prompt_loss_weight)
    if cfg.method == "kto":
        return KTO(beta=method_beta(cfg), desirable_weight=cfg.kto_desirable_weight,
                   undesirable_weight=cfg.kto_undesirable_weight)
    return Pairs(cfg.method, beta=method_beta(cfg), loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing,
                 rpo_alpha=cfg.rpo_alpha, orpo_lambda=cfg.orpo_lambda, simpo_gamma=cfg.simpo_gamma)
