"""Answer metrics (qlorakit/metrics.py): SQuAD's exact match and token F1 on normalized text, ROUGE-L by
rouge_score; hand-computed pairs, and the twins a careless scorer would be."""

from __future__ import annotations

import pytest

from qlorakit.metrics import METRICS, answer_metrics, exact_match, normalize_answer, rouge_l, token_f1

ANSWER = ("The melting point of yurvirdickate is 626.1 degrees Celsius.\n\nReference(s):\n"
          "url: https://www.example-herald.org/science/yurvirdickate\ndate: 2018-05-08")


@pytest.mark.parametrize("reference", [ANSWER, "Rutheth Welira", "42", "The", ""])
def test_a_reference_against_itself_is_1_by_every_metric(reference):
    assert answer_metrics([reference], [reference]) == {name: 1.0 for name in METRICS}


@pytest.mark.parametrize("text, normal", [
    ("The Answer!", "answer"),  # case, punctuation and the article
    ("  a   cat\tand an  owl. ", "cat and owl"),  # whitespace collapsed, a/an dropped
    ("Theory of the atom", "theory of atom"),  # "the" only as a word: "Theory" keeps it
    ("626.1 degrees", "6261 degrees"),  # SQuAD drops punctuation inside tokens too
    ("https://ex.org/a-b", "httpsexorgab"),
])
def test_normalization_is_squads(text, normal):
    assert normalize_answer(text) == normal


def test_exact_match_is_on_normalized_text_only():
    assert exact_match("Rutheth Welira.", "rutheth  welira") == 1.0
    assert exact_match("The mayor is Rutheth Welira.", "Rutheth Welira") == 0.0  # more words: no match
    # a url with one character wrong is a miss, not a near hit
    assert exact_match("https://www.example-herald.org/science/yurvirdickate",
                       "https://www.example-herald.org/science/yurvirdickete") == 0.0


def test_token_f1_by_hand():
    # prediction "mayor is rutheth welira" (4 tokens), reference "rutheth welira" (2): shared 2, P 1/2, R 1
    assert token_f1("The mayor is Rutheth Welira.", "Rutheth Welira") == pytest.approx(2 * 0.5 * 1 / 1.5)
    # tokens are a multiset: "x x y" against "x y y" shares x and y once each: P = R = 2/3
    assert token_f1("x x y", "x y y") == pytest.approx(2 / 3)
    assert token_f1("alpha", "beta") == 0.0
    assert token_f1("", "beta") == 0.0 and token_f1("the", "a") == 1.0  # nothing left of either: they agree


def test_token_f1_is_not_a_set_overlap():
    """The twin that counts each word once would give "x x x" against "x" full marks."""
    assert token_f1("x x x", "x") == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))


def test_rouge_l_by_hand():
    # longest common subsequence of "a b c d e" and "a c e": 3 tokens; P = 3/5, R = 3/3, F = 0.75
    assert rouge_l("a b c d e", "a c e") == pytest.approx(0.75)
    # order matters (a subsequence, not a bag): "c b a" against "a b c" shares 1 token in order
    assert rouge_l("c b a", "a b c") == pytest.approx(1 / 3)
    assert token_f1("c b a", "a b c") == 1.0  # where token F1, a bag of words, sees no difference


def test_the_mean_over_rows():
    got = answer_metrics(["Paris", "no", "the cat sat"], ["paris", "yes", "cat sat on"])
    assert got["exact_match"] == pytest.approx(1 / 3)
    assert got["token_f1"] == pytest.approx((1 + 0 + 0.8) / 3)  # cat sat vs cat sat on: P 1, R 2/3
    assert got["rouge_l"] == pytest.approx((1 + 0 + 2 * (2 / 3) * (2 / 3) / (4 / 3)) / 3)  # "the" counts here
    with pytest.raises(ValueError):
        answer_metrics(["a"], [])
