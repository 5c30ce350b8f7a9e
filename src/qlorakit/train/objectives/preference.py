"""Preference objectives: how preference examples become a batch, and a batch a summed loss and summed metrics.

A pair is one padding-free packed row of two sequences, prompt + chosen and prompt + rejected, positions restarting
at the second (so neither attends to the other), with logits only at completion positions; on a model without
position ids (MPT) the sequences are rows of a padded batch instead. Each sequence's log-probability is the sum over
its completion tokens (``forward.sequence_logps``). The reference's log-probabilities are computed once before the
first step (``reference.py``) and travel with the batch as ``pref_ref``. The loop sums the per-example losses over a
micro-batch and divides by the examples of the whole optimizer step, so accumulation equals one big batch.
"""

from __future__ import annotations

import numpy as np
import torch

from ...data.batching import collate
from .. import processes
from ...data.tokenize import IGNORE, KTO_GOOD, PAIR, Example, preference_parts
from .forward import sequence_logps
from .losses import dpo_losses, kto_losses, orpo_losses, pair_metrics, rpo_nll, simpo_losses


def sequences_batch(seqs: list[Example], pad_id: int, packing: bool) -> dict:
    """``seqs`` collated (one packed row, or padded rows), with ``pref_seq``: the sequence of each trained position
    in the mask's row-major order, and ``pref_n_seqs``."""
    batch = collate(seqs, pad_id, packing)
    keep = batch["targets"] != IGNORE
    n = len(seqs)
    if packing:
        owner = torch.repeat_interleave(torch.arange(n), torch.tensor([len(s) for s in seqs]))[None]  # (1, T)
    else:
        owner = torch.arange(n)[:, None].expand_as(keep)  # (B, T)
    return batch | {"pref_seq": owner[keep], "pref_n_seqs": n}


def sequence(prompt: list[int], completion: list[int], source: str) -> Example:
    return Example(prompt + completion, [IGNORE] * len(prompt) + completion, source)


class Preference:
    """What pair and KTO objectives share: the reference's log-probabilities of each split, (N, 2) arrays."""

    preference = True
    needs_reference = True

    def __init__(self, name: str):
        self.name = name
        self.reference: dict[str, np.ndarray] = {}

    def _with_reference(self, batch: dict, ids: list[int], split: str) -> dict:
        if split in self.reference:
            batch["pref_ref"] = torch.from_numpy(self.reference[split][list(ids)])
        return batch

    def count(self, batches: list[dict]) -> int:
        return sum(int(b["pref_examples"]) for b in batches)

    def begin_step(self, model, batches: list[dict], device, use_bf16: bool, weights: list[float] | None = None,
                   info: processes.DistInfo | None = None) -> None:
        """Called before a step's micro-batches, with their weights (0: a filler) and the ranks' ``info`` (KTO
        estimates its KL reference point here)."""


class Pairs(Preference):
    """dpo (sigmoid, ipo, robust), orpo, simpo on chosen/rejected pairs."""

    def __init__(self, name: str, *, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 rpo_alpha: float = 0.0, orpo_lambda: float = 0.1, simpo_gamma: float = 1.0):
        super().__init__(name)
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.rpo_alpha = rpo_alpha
        self.orpo_lambda, self.simpo_gamma = orpo_lambda, simpo_gamma
        self.needs_reference = name == "dpo"
        # Token-averaged log-probabilities: ORPO's odds and SimPO's length-normalized reward; IPO as TRL computes it.
        self.average = name in ("orpo", "simpo") or loss_type == "ipo"

    def collate(self, examples, ids: list[int], pad_id: int, packing: bool, budget: int = 0,
                split: str = "train") -> dict:
        seqs = []
        for i in ids:
            ex = examples[i]
            prompt, (chosen, rejected) = preference_parts(ex)
            seqs += [sequence(prompt, chosen, ex.source), sequence(prompt, rejected, ex.source)]
        return self._with_reference(sequences_batch(seqs, pad_id, packing) | {"pref_examples": len(ids)}, ids, split)

    def loss(self, model, batch: dict, device: torch.device, chunked: bool = False
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        sums, counts = sequence_logps(model, batch, device)  # (2n,): chosen, rejected of each pair in turn
        logps = sums / counts if self.average else sums
        chosen, rejected = logps[0::2], logps[1::2]
        if self.name == "dpo":
            ref = batch["pref_ref"].to(device=device, dtype=sums.dtype)  # (n, 2) summed log-probabilities
            ref = ref / counts.view(-1, 2) if self.average else ref
            losses, rw, rl = dpo_losses(chosen, rejected, ref[:, 0], ref[:, 1], beta=self.beta,
                                        loss_type=self.loss_type, label_smoothing=self.label_smoothing)
            if self.rpo_alpha:  # RPO: the chosen completion's per-token NLL, per pair
                losses = losses + self.rpo_alpha * rpo_nll(sums[0::2], counts[0::2])
        elif self.name == "orpo":
            losses, rw, rl = orpo_losses(chosen, rejected, lam=self.orpo_lambda)
        else:
            losses, rw, rl = simpo_losses(chosen, rejected, beta=self.beta, gamma=self.simpo_gamma)
        return losses.sum(), pair_metrics(rw, rl, chosen, rejected)


def next_index(i: int, n: int) -> int:
    """The row whose completion is paired with row ``i``'s prompt for KTO's KL estimate: the next one of the split.
    It is another row whatever the batch size (TRL pairs within a batch, so a batch of one pairs a row with itself)."""
    return (i + 1) % n if n > 1 else i


class KTO(Preference):
    """kto on prompt/completion/label rows. The KL reference point is estimated once per optimizer step over all its
    examples, each prompt with another row's completion, under the policy (no gradient) and the reference."""

    def __init__(self, *, beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
        super().__init__("kto")
        self.beta, self.desirable_weight, self.undesirable_weight = beta, desirable_weight, undesirable_weight
        self.kl = torch.zeros(())

    def collate(self, examples, ids: list[int], pad_id: int, packing: bool, budget: int = 0,
                split: str = "train") -> dict:
        matched, mismatched, good = [], [], []
        for i in ids:
            ex = examples[i]
            prompt, (completion,) = preference_parts(ex)
            other = preference_parts(examples[next_index(i, len(examples))])[1][0]
            matched.append(sequence(prompt, completion, ex.source))
            mismatched.append(sequence(prompt, other, ex.source))
            good.append(ex.pref[0] == KTO_GOOD)
        batch = sequences_batch(matched, pad_id, packing) | {
            "pref_examples": len(ids), "pref_kl": sequences_batch(mismatched, pad_id, packing),
            "pref_desirable": torch.tensor(good)}
        return self._with_reference(batch, ids, split)

    @torch.no_grad()
    def begin_step(self, model, batches: list[dict], device, use_bf16: bool, weights: list[float] | None = None,
                   info: processes.DistInfo | None = None) -> None:
        """The KL point: the mean over the step's examples on ALL ranks (their sums and counts summed; TRL gathers
        the ranks' means) of policy minus reference log-probability of the mismatched pairs, clamped at 0. Every
        micro-batch runs, a filler (weight 0) too, so sharded ranks stay in step; a filler adds nothing."""
        from ..step import autocast

        total, count = 0.0, 0
        for b, w in zip(batches, weights or [1.0] * len(batches)):
            with autocast(device, use_bf16):
                policy = sequence_logps(model, b["pref_kl"], device)[0]
            if w:
                total += float((policy.double() - b["pref_ref"][:, 1].to(device=device, dtype=torch.float64)).sum())
                count += len(policy)
        if info is not None:
            total, count = processes.all_sum(total, info, device), processes.all_sum(count, info, device)
        self.kl = torch.tensor(max(total / count, 0.0) if count else 0.0, device=device)

    def loss(self, model, batch: dict, device: torch.device, chunked: bool = False
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logps, _ = sequence_logps(model, batch, device)
        ref = batch["pref_ref"][:, 0].to(device=device, dtype=logps.dtype)
        good = batch["pref_desirable"].to(device)
        losses, rewards = kto_losses(logps, ref, good, self.kl.to(device), beta=self.beta,
                                     desirable_weight=self.desirable_weight,
                                     undesirable_weight=self.undesirable_weight)
        n = len(logps)
        return losses.sum(), {"kl": self.kl.detach() * n, "logps": logps.detach().sum(),
                              "rewards/desirable": rewards[good].sum(), "rewards/undesirable": rewards[~good].sum()}


def is_pair(ex: Example) -> bool:
    return bool(ex.pref) and ex.pref[0] == PAIR
