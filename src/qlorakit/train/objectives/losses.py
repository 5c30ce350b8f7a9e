"""Preference losses as small pure functions: per-sequence log-probabilities in, per-example losses and rewards out.

Each takes the summed log-probability of each completion under the policy (and, where the method has one, under the
frozen reference), and returns one loss per example; the caller sums them and divides by the examples of the whole
optimizer step. Nothing here sees a model, a batch or a config.

Notation: ``h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))``, the margin of the implicit rewards.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def dpo_losses(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
               *, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (Rafailov et al. 2023, beta 0.1): ``-log sigmoid(beta h)``; with ``label_smoothing`` eps the
    conservative cDPO (Mitchell 2023): ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``, which uses
    eps (unlike TRL 1.x's default sigmoid loss, which ignores it).

    ``robust`` (Chowdhury et al. 2024, rDPO): ``(-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)) /
    (1 - 2 eps)``, unbiased when a share eps of the labels is flipped.
    ``ipo`` (Azar et al. 2023, eq. 17): ``(h - 1 / (2 beta))^2``; pass token-averaged log-probabilities, as TRL does.

    Returns (losses, chosen rewards, rejected rewards), rewards ``beta * (log pi - log ref)``, detached."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown dpo loss_type {loss_type!r}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def rpo_nll(chosen_sum: torch.Tensor, chosen_count: torch.Tensor) -> torch.Tensor:
    """RPO's added term (Pang et al. 2024, *Iterative Reasoning Preference Optimization*, eq. 2): each pair's
    chosen completion's negative log-likelihood over its length, ``-log pi(y_w|x) / |y_w|``, from its summed
    log-probability and token count. DPO adds ``rpo_alpha`` times it to each pair's loss (TRL's ``rpo_alpha``
    averages the NLL over all chosen tokens of the batch instead: the same where completions are equally long)."""
    return -chosen_sum / chosen_count


def log1m_exp(logp: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(logp))`` for ``logp < 0`` without cancellation: ``log(-expm1(logp))`` near 0, where
    ``1 - exp`` would round to 0, and ``log1p(-exp(logp))`` far from it (Maechler 2012). ``logp`` is clamped just
    below 0, so a probability of 1 gives a large finite number, never inf."""
    logp = logp.clamp(max=-1e-20)
    return torch.where(logp > -math.log(2), torch.log(-torch.expm1(logp)), torch.log1p(-torch.exp(logp)))


def orpo_losses(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, *, lam: float = 0.1
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO (Hong et al. 2024, lambda 0.1): the chosen completion's NLL plus ``lambda * -log sigmoid(log odds
    ratio)``, on token-averaged log-probabilities (``*_mean``), odds ``p / (1 - p)`` with ``log(1 - p)`` from
    ``log1m_exp``. No reference model. Rewards, as in TRL: ``lambda * mean log p``."""
    log_odds = (chosen_mean - log1m_exp(chosen_mean)) - (rejected_mean - log1m_exp(rejected_mean))
    losses = -chosen_mean - lam * F.logsigmoid(log_odds)
    return losses, lam * chosen_mean.detach(), lam * rejected_mean.detach()


def simpo_losses(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, *, beta: float = 2.0, gamma: float = 1.0
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO (Meng et al. 2024): ``-log sigmoid(beta * mean log pi(y_w) - beta * mean log pi(y_l) - gamma)``, the
    length-normalized reward with a target margin ``gamma``, no reference. Defaults: the paper's Llama-3 setting
    (beta 2.0, gamma 1.0, gamma/beta 0.5). Rewards: ``beta * mean log pi``."""
    rw, rl = beta * chosen_mean, beta * rejected_mean
    return -F.logsigmoid(rw - rl - gamma), rw.detach(), rl.detach()


def kto_losses(logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, *,
               beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO (Ethayarajh et al. 2024, beta 0.1, weights 1.0): with ``r = log pi(y) - log ref(y)`` and the reference
    point ``kl`` (the estimated KL of policy to reference, >= 0, no gradient), a desirable completion costs
    ``w_d (1 - sigmoid(beta (r - kl)))`` and an undesirable one ``w_u (1 - sigmoid(beta (kl - r)))``.

    Returns (losses, rewards ``beta * r``, detached)."""
    r = logps - ref_logps
    kl = kl.detach().clamp(min=0)
    good = desirable_weight * (1 - torch.sigmoid(beta * (r - kl)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (kl - r)))
    return torch.where(desirable, good, bad), beta * r.detach()


def pair_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen: torch.Tensor,
                 rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-pair metrics SUMMED over the pairs (the step divides by its pair count): TRL's names."""
    return {"rewards/chosen": chosen_rewards.sum(), "rewards/rejected": rejected_rewards.sum(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
            "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
            "logps/chosen": chosen.detach().sum(), "logps/rejected": rejected.detach().sum()}
