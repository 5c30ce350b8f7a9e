"""The scorer of benchmarks/recipes.py: one function, the same for every arm and for TRL's row, from a held-out row
of ``benchmarks/data/recipes_eval.jsonl`` and the greedy reply to it. No model, no tokenizer: text in, numbers out.

A held-out row is one of three kinds (its ``answerable`` key): an answerable closed-context question (true), one
its passages cannot answer (false; reference reply ``ABSTAIN``, nothing cited), or a plain instruction (null).

Per row:

  answer_match      answerable rows: the row's ``answer`` occurs in the reply before any "Reference(s):" block,
                    as whole words after ``normalize`` (so "1,901 meters" matches "1901 meters.")
  citation_match    answerable rows: the set of urls the reply names is exactly {the row's ``source``}
  exact_match       answerable rows: answer_match and citation_match, and the reply does not also abstain;
                    unanswerable rows: abstained_correctly
  abstained         the reply contains ``ABSTAIN`` (after ``normalize``)
  abstained_correctly  unanswerable rows: abstained, and no url named
  invented_answer   unanswerable rows: did not abstain (it answered something the passages do not say)
  false_abstention  answerable rows: abstained although the passages hold the answer
  distractor_answer closed-context rows with distractor passages: the reply (before "Reference(s):") states a
                    value one of the distractors gives for the asked attribute (``distractor_answers``)
  token_f1          every row: SQuAD's token F1 of the reply against the reference reply (``normalize``d tokens)
  rouge_l           every row: ROUGE-L F-measure (``rouge_score``, no stemming) of the reply against the reference

``normalize``, ``token_f1`` and ``rouge_l`` are qlorakit.metrics' own, so these numbers are the ones training's
``eval_token_f1``/``eval_rouge_l``, ``qlorakit eval`` and ``qlorakit compare`` report.

Per run (``score_rows``): exact_match is the mean over the closed-context rows (answerable and unanswerable); the
answerable-only, unanswerable-only and every-row metrics are means over those rows; each also with its row count.
"""

from __future__ import annotations

import re

from qlorakit.metrics import normalize_answer as normalize
from qlorakit.metrics import rouge_l, token_f1

ABSTAIN = "The text does not say."
URL_RE = re.compile(r"https?://[^\s<>()\[\]\"']+")
REFERENCE_RE = re.compile(r"reference\(s\)\s*:", re.I)

# What the table shows per run, in order: key -> (column label, rows it is over).
METRICS = {
    "exact_match": ("exact match", "closed"),
    "answer_match": ("answer", "answerable"),
    "citation_match": ("citation", "answerable"),
    "abstained_correctly": ("abstained correctly", "unanswerable"),
    "invented_answer": ("invented answer", "unanswerable"),
    "false_abstention": ("false abstention", "answerable"),
    "distractor_answer": ("took a distractor's value", "distracted"),
    "token_f1": ("token F1", "all"),
    "rouge_l": ("ROUGE-L", "all"),
}


def cited_urls(reply: str) -> set[str]:
    """The urls a reply names, trailing sentence punctuation dropped."""
    return {u.rstrip(".,;:!?") for u in URL_RE.findall(reply)}


def answer_part(reply: str) -> str:
    """The reply before its "Reference(s):" block (all of it where there is none)."""
    return REFERENCE_RE.split(reply, maxsplit=1)[0]


def contains_words(haystack: str, needle: str) -> bool:
    """Whether ``needle`` occurs in ``haystack`` as whole words, both normalized; an empty needle never does."""
    h, n = normalize(haystack), normalize(needle)
    return bool(n) and f" {n} " in f" {h} "


def abstains(reply: str) -> bool:
    return contains_words(reply, ABSTAIN)


def row_kind(row: dict) -> str:
    return {True: "answerable", False: "unanswerable", None: "plain"}[row.get("answerable")]


def score_row(row: dict, reply: str) -> dict:
    """The per-row metrics (module docstring) of ``reply`` to held-out ``row``; keys that do not apply are absent."""
    kind = row_kind(row)
    out = {"kind": kind, "token_f1": token_f1(reply, row["response"]), "rouge_l": rouge_l(reply, row["response"])}
    urls, abstained = cited_urls(reply), abstains(reply)
    if kind == "answerable":
        out["answer_match"] = float(contains_words(answer_part(reply), row["answer"]))
        out["citation_match"] = float(urls == {row["source"]})
        out["false_abstention"] = float(abstained)
        out["exact_match"] = float(bool(out["answer_match"] and out["citation_match"]) and not abstained)
    if kind != "plain" and row.get("distractor_answers"):
        out["distractor_answer"] = float(any(contains_words(answer_part(reply), v) for v in row["distractor_answers"]))
    if kind == "unanswerable":
        out["abstained_correctly"] = float(abstained and not urls)
        out["invented_answer"] = float(not abstained)
        out["exact_match"] = out["abstained_correctly"]
    return out


def score_rows(rows: list[dict], replies: list[str]) -> dict:
    """Per-run means of ``score_row`` over the rows each metric is defined on (``METRICS``), and the row counts."""
    if len(rows) != len(replies):
        raise ValueError(f"{len(rows)} held-out rows but {len(replies)} replies")
    scored = [score_row(row, reply) for row, reply in zip(rows, replies)]
    out = {"rows": {k: sum(s["kind"] == k for s in scored) for k in ("answerable", "unanswerable", "plain")}}
    for key in METRICS:
        values = [s[key] for s in scored if key in s]
        out[key] = sum(values) / len(values) if values else None
    return out
