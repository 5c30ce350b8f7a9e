"""Validation beside the loop: loss and perplexity over held-out examples, token-weighted like training; answers
generated for some of them and scored against their references (exact match, token F1, ROUGE-L: metrics.py); which
evaluation is the best (``metric_for_best_model``)."""

from __future__ import annotations

import math

import torch

from ..data.batching import collate
from ..data.templates import stop_text, stop_token_ids
from ..data.tokenize import IGNORE, Example
from ..metrics import LABELS, METRICS, answer_metrics
from ..model.generate import cut_at_stop, generate_batched
from ..model.lora import unwrap
from . import processes
from .step import autocast, loss_sum


@torch.no_grad()
def eval_loss(model, examples: list[Example], *, batch_size: int, pad_id: int, packing: bool,
              device: torch.device, use_bf16: bool, objective=None) -> dict[str, float]:
    """Mean loss per trained token over ``examples`` (not a mean of batch means) and its perplexity; for a
    preference ``objective``, its mean loss per example and metrics (``eval_rewards/accuracies``...)."""
    if objective is not None and objective.preference:
        return eval_preference(model, examples, objective, batch_size=batch_size, pad_id=pad_id, packing=packing,
                               device=device, use_bf16=use_bf16)
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    try:
        # Sorted by length so padded batches waste little; the result does not depend on the order.
        ordered = sorted(examples, key=len)
        for s in range(0, len(ordered), batch_size):
            batch = collate(ordered[s:s + batch_size], pad_id, packing)
            with autocast(device, use_bf16):
                loss, n = loss_sum(model, batch, device)
            total += float(loss)
            tokens += n
    finally:
        model.train(was_training)
    mean = total / max(tokens, 1)
    return {"eval_loss": mean, "eval_perplexity": math.exp(min(mean, 50.0)), "eval_tokens": tokens}


def metric_key(metric: str) -> str:
    """The metrics-row key of a ``metric_for_best_model`` value: eval_loss, eval_exact_match, ..."""
    return metric if metric.startswith("eval_") else f"eval_{metric}"


def metric_text(metric: str, value: float | None) -> str:
    """"eval loss 1.2345", "exact match 0.5000": a metric_for_best_model value as the log and the card say it."""
    label = "eval loss" if metric_key(metric) == "eval_loss" else LABELS[metric_key(metric)[len("eval_"):]]
    return f"{label} {value:.4f}" if value is not None else f"{label} unknown"


def improved(metric: str, value: float, best: float | None) -> bool:
    """Whether ``value`` of ``metric`` beats ``best``: eval loss lower, the answer metrics higher. A tie is no
    improvement (the earlier checkpoint stays the best), as in the Trainer."""
    if best is None:
        return True
    return value < best if metric_key(metric) == "eval_loss" else value > best


def prompt_and_reference(ex: Example, tokenizer, stop: str) -> tuple[list[int], str] | None:
    """The prompt ids of an eval example (everything before its last reply) and that reply's text (the reference:
    the trained tokens decoded, the end token and the format's end text dropped); None for an example with no
    prompt before its last reply."""
    end = max((i for i, t in enumerate(ex.labels) if t != IGNORE), default=-1) + 1
    start = end
    while start > 0 and ex.labels[start - 1] != IGNORE:
        start -= 1
    if start == 0 or end == 0:
        return None
    reference = cut_at_stop(tokenizer.decode(ex.input_ids[start:end], skip_special_tokens=True), stop).strip()
    return list(ex.input_ids[:start]), reference


def eval_answers(model, tokenizer, examples, *, n: int, prompt_format: str, max_new_tokens: int, batch_size: int,
                 info: processes.DistInfo, fsdp: bool = False) -> dict[str, float]:
    """Greedy answers to the first ``n`` eval examples in the run's prompt format, scored against their references:
    eval_exact_match, eval_token_f1, eval_rouge_l (means over the rows) and eval_answered (how many). Under torchrun
    each rank answers its share and every rank gets all the scores; under FSDP every rank runs the same number of
    batches, generate's synced_gpus keeping the shards' all-gathers in step."""
    stop = stop_text(prompt_format, tokenizer)
    rows = [r for r in (prompt_and_reference(examples[i], tokenizer, stop) for i in range(min(n, len(examples))))
            if r is not None]
    if not rows:
        return {}
    mine = list(range(info.rank, len(rows), info.world_size))
    share = -(-len(rows) // info.world_size)  # every rank the same count under FSDP: the shortest shards repeat row 0
    prompts = [rows[i][0] for i in mine] + ([rows[0][0]] * (share - len(mine)) if fsdp else [])
    extra = {"synced_gpus": True} if fsdp and info.enabled else {}
    replies = generate_batched(unwrap(model), tokenizer, prompts, stop_ids=stop_token_ids(tokenizer, prompt_format),
                               stop=stop, batch_size=batch_size, max_new_tokens=max_new_tokens, do_sample=False,
                               **extra)
    answered = {}
    for part in processes.gather_objects(dict(zip(mine, replies)), info):
        answered.update(part)
    scores = answer_metrics([answered[i] for i in range(len(rows))], [ref for _, ref in rows])
    return {f"eval_{name}": scores[name] for name in METRICS} | {"eval_answered": len(rows)}


@torch.no_grad()
def eval_preference(model, examples, objective, *, batch_size: int, pad_id: int, packing: bool, device: torch.device,
                    use_bf16: bool) -> dict[str, float]:
    """A preference objective's loss and metrics over ``examples``, each a mean per example."""
    was_training = model.training
    model.eval()
    total, sums = 0.0, {}
    try:
        for s in range(0, len(examples), batch_size):
            ids = list(range(s, min(s + batch_size, len(examples))))
            batch = objective.collate(examples, ids, pad_id, packing, split="eval")
            with autocast(device, use_bf16):
                objective.begin_step(model, [batch], device, use_bf16)
                loss, metrics = objective.loss(model, batch, device)
            total += float(loss)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
    finally:
        model.train(was_training)
    n = max(len(examples), 1)
    return {"eval_loss": total / n, **{f"eval_{k}": v / n for k, v in sorted(sums.items())}, "eval_examples": n}
