"""qlora's MMLU evaluation beside the loop (``do_mmlu_eval``): multiple-choice accuracy at each evaluation, from a
local MMLU file.

A row is ``{"subject", "input", "output"}`` (qlora's data/mmlu files): ``input`` the question and its choices
ending in "Answer:", ``output`` the letter. As qlora's MMLUEvalCallback does, the prompt is BOS + ``input`` as raw
text (not the run's prompt format), the logits at its last position are read at the tokens of A, B, C and D, and
the largest is the model's choice. ``mmlu_loss`` is the mean cross entropy of the answer's token there;
``mmlu_{split}_accuracy`` is the mean of the per-subject accuracies, which are logged too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.tokenize import bos_ids
from ..errors import UserError
from .step import autocast

LETTERS = "ABCD"
QLORA_FILES = {"mmlu-zs": "zero_shot_mmlu_{split}.json", "mmlu-fs": "five_shot_mmlu_{split}.json"}


@dataclass
class MMLU:
    split: str  # eval or test: the metric names say it
    subjects: list[str]
    prompts: list[list[int]]  # token ids, the last mmlu_source_max_len of each
    answers: list[int]  # index into LETTERS
    letter_ids: list[int]  # the token of each of A, B, C, D


def mmlu_file(dataset: str, split: str) -> Path:
    """The file of ``mmlu_dataset``: a path, or qlora's names mmlu-fs / mmlu-zs under data/mmlu/ (as in its
    checkout); a missing one is a one-line error."""
    if dataset in QLORA_FILES:
        path = Path("data/mmlu") / QLORA_FILES[dataset].format(split="val" if split == "eval" else "test")
        if not path.is_file():
            raise UserError(f"mmlu_dataset: {dataset} is read from {path}, as in a qlora checkout, and it is not "
                            "there; run from a folder that has qlora's data/mmlu/, or give an MMLU file's path")
        return path
    path = Path(dataset)
    if not path.is_file():
        raise UserError(f"mmlu_dataset: {dataset} is not a file; give a JSON or JSONL file of {{subject, input, "
                        "output}} rows, or mmlu-fs / mmlu-zs")
    return path


def read_rows(path: Path) -> list[dict]:
    """The rows of a JSON list or a JSONL file, each checked: subject, input, and output one of A-D."""
    text = path.read_text(encoding="utf-8")
    try:
        rows = json.loads(text) if text.lstrip().startswith("[") else \
            [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not JSON or JSONL ({e.msg} at line {e.lineno})") from None
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or not {"subject", "input", "output"} <= set(row) or \
                str(row["output"]).strip() not in LETTERS:
            raise UserError(f"{path}: row {i} is not an MMLU row ({{subject, input, output}} with output one of "
                            "A, B, C, D)")
    if not rows:
        raise UserError(f"{path}: no MMLU rows")
    return rows


def load_mmlu(cfg, tokenizer) -> MMLU | None:
    """The MMLU questions of the run, tokenized (None without do_mmlu_eval)."""
    if not cfg.do_mmlu_eval:
        return None
    rows = read_rows(mmlu_file(cfg.mmlu_dataset, cfg.mmlu_split))
    if cfg.max_mmlu_samples:
        rows = rows[:cfg.max_mmlu_samples]
    bos = bos_ids(tokenizer)
    texts = tokenizer([r["input"] for r in rows], add_special_tokens=False)["input_ids"]
    prompts = [(bos + ids)[-cfg.mmlu_source_max_len:] for ids in texts]
    letter_ids = [tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in LETTERS]
    return MMLU(cfg.mmlu_split, [r["subject"] for r in rows], prompts,
                [LETTERS.index(str(r["output"]).strip()) for r in rows], letter_ids)


@torch.no_grad()
def mmlu_scores(model, mmlu: MMLU, *, batch_size: int, pad_id: int, device: torch.device,
                use_bf16: bool) -> dict[str, float]:
    """Accuracy (per subject and their mean) and loss of ``model`` on ``mmlu``; batches padded on the right."""
    was_training = model.training
    model.eval()
    choices, losses = [], []
    try:
        for s in range(0, len(mmlu.prompts), batch_size):
            chunk = mmlu.prompts[s:s + batch_size]
            width = max(map(len, chunk))
            ids = torch.tensor([p + [pad_id] * (width - len(p)) for p in chunk], device=device)
            mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in chunk], device=device)
            with autocast(device, use_bf16):
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            last = logits[torch.arange(len(chunk)), torch.tensor([len(p) - 1 for p in chunk])].float()  # (B, V)
            answers = torch.tensor([mmlu.letter_ids[a] for a in mmlu.answers[s:s + batch_size]], device=device)
            losses += F.cross_entropy(last, answers, reduction="none").tolist()
            choices += last[:, mmlu.letter_ids].argmax(-1).tolist()
    finally:
        model.train(was_training)
    by_subject: dict[str, list[bool]] = {}
    for subject, choice, answer in zip(mmlu.subjects, choices, mmlu.answers):
        by_subject.setdefault(subject, []).append(choice == answer)
    accuracy = {f"mmlu_{mmlu.split}_accuracy_{k}": sum(v) / len(v) for k, v in sorted(by_subject.items())}
    return {"mmlu_loss": sum(losses) / len(losses),
            f"mmlu_{mmlu.split}_accuracy": sum(accuracy.values()) / len(accuracy), **accuracy}
