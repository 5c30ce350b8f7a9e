"""Answer metrics: a generated answer scored against its reference. One module for training's evaluation
(train/validate.py), ``qlorakit eval`` and ``qlorakit compare``.

* exact match and token F1 as SQuAD scores them (its official evaluate-v2.0.py): both texts normalized (lower case,
  punctuation and the articles a/an/the removed, whitespace collapsed), exact match 1 when the normalized texts are
  equal, F1 the harmonic mean of precision and recall over the shared tokens (a multiset);
* ROUGE-L by Google's ``rouge_score`` (the package lm-eval scores with): the F-measure of the longest common
  subsequence of tokens, no stemming, so a url with one character wrong is a different token.

Each returns a number in [0, 1]; a reference scored against itself is 1 by all three."""

from __future__ import annotations

import collections
import functools
import re
import string

METRICS = ("exact_match", "token_f1", "rouge_l")  # the names, as config and metrics rows (eval_<name>) use them
LABELS = {"exact_match": "exact match", "token_f1": "token F1", "rouge_l": "ROUGE-L",
          "rewards/accuracies": "reward accuracy"}  # the last: a preference eval's, which metric_for_best_model names
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalization: lower case, punctuation removed, articles removed, whitespace collapsed."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1 over normalized tokens; two answers with no tokens (both empty) agree: 1."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    shared = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(pred), shared / len(ref)
    return 2 * precision * recall / (precision + recall)


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (rouge_score's tokenizer: lower case, alphanumeric tokens); two answers with no tokens
    agree: 1 (rouge_score itself gives 0 there)."""
    if not normalize_answer(prediction) and not normalize_answer(reference):
        return 1.0
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)


def contains(prediction: str, reference: str) -> float:
    """1 when the normalized reference appears in the normalized prediction: what a sentence-long reply is judged
    by (``qlorakit eval --dataset``, the qlorakit_closed_context lm-eval task); not one of METRICS."""
    return float(normalize_answer(reference) in normalize_answer(prediction))


def answer_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """The mean of each metric over the pairs: {"exact_match": ..., "token_f1": ..., "rouge_l": ...}."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    n = max(len(references), 1)
    fns = {"exact_match": exact_match, "token_f1": token_f1, "rouge_l": rouge_l}
    return {name: sum(fn(p, r) for p, r in zip(predictions, references)) / n for name, fn in fns.items()}
