"""Generate the task set of benchmarks/recipes.py (stdlib only, fully deterministic from its seeds).

Run from the repository root::

    python scripts/make_recipe_data.py              # writes into the repository
    python scripts/make_recipe_data.py --out-root D  # writes the same files under D/

Files written (paths relative to the output root):

* ``benchmarks/data/recipes_train.jsonl``  100 rows: 80 closed-context questions and 20 plain instructions.
* ``benchmarks/data/recipes_eval.jsonl``   40 held-out rows: 35 closed-context questions and 5 plain instructions,
  about entities (names, urls, answers) that never occur in the training file.
* ``benchmarks/data/recipes_pairs.jsonl``  80 preference pairs (``prompt``/``chosen``/``rejected``), one per
  closed-context training row: chosen is that row's reference reply; rejected is the mistake a supervised model
  makes on it (``rejected_reply``): on an unanswerable question an invented answer citing the asked entity's
  passage (a distractor's value where there is a distractor, else a made-up one); on an answerable one a
  distractor's value, the distractor's url, the source url with one character wrong, or a made-up value; and on
  every fourth answerable one the abstention ``ABSTAIN``, so that 16 pairs prefer the abstention over an invented
  answer and 16 prefer the answer over a wrong abstention (with abstention only ever chosen, DPO after supervised
  tuning learned to abstain on answerable questions too: README, "Recipes").

A closed-context row is airoboros 1.4's layout (``instruction``/``response``/``category``): one to three
BEGININPUT passages, each with its own ``url`` (and ``date``) in BEGINCONTEXT, then one question and "Cite your
source." The passages that are not about the asked entity are distractors: they are about another entity of the
same kind and state the asked attribute with a different value ("The town lies 1,204 meters above sea level" beside
the asked town's 1,911), so a reply has to read which passage the question names.

One closed-context question in five (exactly: every fifth) cannot be answered from its passages: it asks an
attribute of a named entity whose passage does not state it (the distractor passages, where there are any, state
it for their own entity). Its reference reply is the fixed phrase ``ABSTAIN`` ("The text does not say.") and
cites nothing. Every answerable reply is the answer sentence, then ``Reference(s):`` with the url and date of the
passage that holds it, as in the shipped sample.

Besides the airoboros keys each row carries what the scorer needs: ``answer`` (the value a correct reply contains;
null where unanswerable or plain), ``source`` (the url it must cite; null likewise), ``answerable`` (true, false,
or null for a plain instruction), ``passages`` and ``distractors`` (counts), and ``distractor_answers`` (the
values the distractor passages state for the asked attribute, each different from the answer, so a scorer can tell
a reply that took a distractor's value). qlorakit's airoboros reader ignores these keys.

Entities are invented (made_sample_data.py's makers and syllable pools), so no pretrained model knows an answer:
held-out names come from the other syllable pool and other url domains, and are rejected if they occur in the
training text; ``build_all`` asserts it.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_sample_data as S  # noqa: E402  (the sibling script: entity makers, name pools, plain tasks)

TRAIN_FILE = "benchmarks/data/recipes_train.jsonl"
EVAL_FILE = "benchmarks/data/recipes_eval.jsonl"
PAIRS_FILE = "benchmarks/data/recipes_pairs.jsonl"
SEEDS = {"train": 1818, "eval": 8181}
ABSTAIN = "The text does not say."
REJECTED = "_rejected"  # the rejected reply a closed row carries until build_all splits it off into the pairs file
COUNTS = {"train": (80, 20), "eval": (35, 5)}  # (closed-context rows, plain instruction rows)
UNANSWERABLE_EVERY = 5  # every fifth closed-context row cannot be answered from its passages
# every fourth answerable pair rejects the abstention instead of a mistake: as many pairs prefer an answer over
# "The text does not say." as prefer the abstention over an invented answer (16 each), so preferences do not
# teach abstaining everywhere
ABSTAIN_REJECTED_EVERY = 4
WORDS = (10, 18)  # words per passage before its last sentence: three-passage rows stay near 300 tokens


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def passage(r: random.Random, nm: S.Names, domains: list[str], ent: S.Entity, must: list[S.Fact],
            banned: set[str], used_urls: set[str]) -> S.Doc:
    """A BEGININPUT block about ``ent``: its intro sentence, the ``must`` sentences, then other facts and filler,
    never a sentence in ``banned`` (the attribute an unanswerable question asks about)."""
    while True:
        url = f"https://www.{r.choice(domains)}/{r.choice(['articles', S.SECTIONS[ent.kind]])}/{_slug(ent.name)}"
        if url not in used_urls:
            used_urls.add(url)
            break
    meta = [("url", url), ("date", f"{r.randint(2008, 2023)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}")]
    if r.random() < 0.4:
        meta.append(r.choice([("title", ent.title), ("author", nm.person())]))
    r.shuffle(meta)
    intro = ent.facts[0].sentence
    body = list(dict.fromkeys(f.sentence for f in must if f.sentence != intro))
    others = [s for s in dict.fromkeys(f.sentence for f in ent.facts)
              if s != intro and s not in body and s not in banned]
    fillers = [s.format(n=ent.name) for s in ent.fillers]
    r.shuffle(others)
    r.shuffle(fillers)
    words = r.randint(*WORDS)
    while (others or fillers) and len(" ".join([intro] + body).split()) < words:
        body.append((others if others and (not fillers or r.random() < 0.6) else fillers).pop())
    r.shuffle(body)
    return S.Doc(ent, meta, " ".join([intro] + body))


def same_kind(r: random.Random, nm: S.Names, kind: str) -> S.Entity:
    maker = next(m for m in S.MAKERS if m.__name__ == f"make_{kind}")
    return maker(r, nm)


def closed_row(r: random.Random, nm: S.Names, domains: list[str], n_passages: int, answerable: bool,
               eligible) -> dict | None:
    """One question about the first entity, its passage shuffled among ``n_passages - 1`` distractors about other
    entities of the same kind that state the same attribute with their own values. None if the entity has no fact
    the question may ask (``eligible``; unanswerable questions never ask an intro-sentence fact)."""
    target = r.choice(S.MAKERS)(r, nm)
    intro = target.facts[0].sentence
    ok = [i for i, f in enumerate(target.facts) if eligible(f) and (answerable or f.sentence != intro)]
    if not ok:
        return None
    k = r.choice(ok)
    asked = target.facts[k]
    used: set[str] = set()
    docs = [passage(r, nm, domains, target, [asked] if answerable else [],
                    set() if answerable else {asked.sentence}, used)]
    distractor_answers = []
    while len(docs) < n_passages:
        other = same_kind(r, nm, target.kind)
        value = other.facts[k].answer
        if value == asked.answer or value in distractor_answers:  # a distractor's value always differs
            continue
        distractor_answers.append(value)
        docs.append(passage(r, nm, domains, other, [other.facts[k]], set(), used))
    wrong = rejected_reply(asked, docs[0], list(zip(docs[1:], distractor_answers)), answerable)
    order = list(range(n_passages))
    r.shuffle(order)
    docs = [docs[i] for i in order]
    question = asked.question
    if r.random() < 0.25:
        question = "According to the text, " + question[0].lower() + question[1:]
    instruction = "\n".join(d.render() for d in docs) + \
        f"\nBEGININSTRUCTION\n{question} Cite your source.\nENDINSTRUCTION"
    if answerable:
        src = next(d for d in docs if d.entity is target)
        response = f"{asked.answer_sentence}\n\nReference(s):\nurl: {src.url}\ndate: {src.date}"
        answer, source = asked.answer, src.url
    else:
        response, answer, source = ABSTAIN, None, None
    return {"instruction": instruction, "response": response, "category": "contextual", "answer": answer,
            "source": source, "answerable": answerable, "passages": n_passages, "distractors": n_passages - 1,
            "distractor_answers": distractor_answers, REJECTED: wrong}


def reply(sentence: str, doc: S.Doc, url: str = "") -> str:
    return f"{sentence}\n\nReference(s):\nurl: {url or doc.url}\ndate: {doc.date}"


def one_char_off(rr: random.Random, url: str) -> str:
    """``url`` with one letter of its last path part changed: the near-miss copy seen in supervised replies."""
    i = rr.choice([j for j in range(url.rindex("/") + 1, len(url)) if url[j].isalpha()])
    return url[:i] + rr.choice([c for c in "aeiourstln" if c != url[i]]) + url[i + 1:]


def made_up(rr: random.Random, answer: str) -> str | None:
    """``answer`` with one digit changed (a value no passage states), or None where it has no digit."""
    digits = [j for j, c in enumerate(answer) if c.isdigit()]
    if not digits:
        return None
    i = rr.choice(digits)
    return answer[:i] + rr.choice([d for d in "123456789" if d != answer[i]]) + answer[i + 1:]


def rejected_reply(asked: S.Fact, target: S.Doc, distractors: list[tuple[S.Doc, str]], answerable: bool) -> str:
    """The wrong reply of a pair: the mistakes the recipes' scorer counts. Its own rng, seeded by the question and
    the target passage, so the supervised files do not change with it."""
    rr = random.Random(asked.question + target.url)
    if not answerable:  # invent the value the passage does not give: a distractor's, else a made-up one
        value = distractors[0][1] if distractors else (made_up(rr, asked.answer) or asked.answer)
        return reply(asked.answer_sentence.replace(asked.answer, value), target)
    choices = ["url"] + (["value"] if made_up(rr, asked.answer) else [])
    if distractors:
        choices += ["distractor_value", "distractor_url"]
    kind = rr.choice(choices)
    if kind == "distractor_value":
        return reply(asked.answer_sentence.replace(asked.answer, distractors[0][1]), target)
    if kind == "distractor_url":
        return reply(asked.answer_sentence, target, distractors[0][0].url)
    if kind == "value":
        return reply(asked.answer_sentence.replace(asked.answer, made_up(rr, asked.answer)), target)
    return reply(asked.answer_sentence, target, one_char_off(rr, target.url))


def plain_row(r: random.Random, seen: set[str]) -> dict:
    while True:
        row = S.general_row(r)
        if row["instruction"] not in seen:
            seen.add(row["instruction"])
            return {**row, "answer": None, "source": None, "answerable": None, "passages": 0, "distractors": 0,
                    "distractor_answers": []}


def build(split: str, forbidden: str = "", seen: set[str] | None = None) -> tuple[list[dict], S.Names]:
    """The rows of ``split``: passages counts cycling 1, 2, 3; every ``UNANSWERABLE_EVERY``-th closed row
    unanswerable; plain rows whose instructions are not in ``seen``; shuffled, then ``spread_kinds``."""
    r = random.Random(SEEDS[split])
    held = split == "eval"
    nm = S.Names(r, S.HELDOUT_ONSETS if held else S.TRAIN_ONSETS, forbidden=forbidden)
    domains = S.HELDOUT_DOMAINS if held else S.TRAIN_DOMAINS
    # Held-out answers must be distinctive (a number or an invented name) and absent from the training text.
    if held:
        eligible = lambda f: re.search(r"[0-9A-Z]", f.answer) and f.answer not in forbidden  # noqa: E731
    else:
        eligible = lambda f: True  # noqa: E731
    n_closed, n_plain = COUNTS[split]
    rows = []
    while len(rows) < n_closed:
        i = len(rows)
        row = closed_row(r, nm, domains, 1 + i % 3, (i + 1) % UNANSWERABLE_EVERY != 0, eligible)
        if row:
            rows.append(row)
    seen = set(seen or ())
    rows += [plain_row(r, seen) for _ in range(n_plain)]
    r.shuffle(rows)
    return spread_kinds(rows), nm


def spread_kinds(rows: list[dict]) -> list[dict]:
    """``rows`` reordered so that every prefix holds each kind (answerable, unanswerable, plain) in about its share
    of the whole: the i-th of n rows of a kind goes to position (i + 0.5) / n. A benchmark that takes the first N
    rows (``recipes.py --train-rows/--eval-rows``, ``--quick``) then gets all three kinds."""
    kinds: dict = {}
    for row in rows:
        kinds.setdefault(row["answerable"], []).append(row)
    keyed = [((i + 0.5) / len(group), k, row) for k, group in enumerate(kinds.values()) for i, row in enumerate(group)]
    return [row for _, _, row in sorted(keyed, key=lambda t: t[:2])]


def without_rejected(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in x.items() if k != REJECTED} for x in rows]


def build_all() -> dict:
    """``{relative path: rows}`` for the three files, plus the held-out names; asserts the held-out set is
    disjoint."""
    with_rejected, _ = build("train")
    train = without_rejected(with_rejected)
    train_text = "\n".join(json.dumps(x, ensure_ascii=False) for x in train)
    held, names = build("eval", forbidden=train_text, seen={x["instruction"] for x in train})
    held = without_rejected(held)
    low = train_text.lower()
    assert not [n for n in names.used if n.lower() in low], "a held-out name occurs in the training file"
    assert not any(d in train_text for d in S.HELDOUT_DOMAINS)
    for row in held:
        if row["answerable"]:
            assert row["answer"] not in train_text and row["source"] not in train_text, row
    closed = [x for x in with_rejected if x["answerable"] is not None]
    answerable = [i for i, x in enumerate(closed) if x["answerable"]]
    rejects_abstention = set(answerable[ABSTAIN_REJECTED_EVERY - 1::ABSTAIN_REJECTED_EVERY])
    pairs = [{"prompt": x["instruction"], "chosen": x["response"],
              "rejected": ABSTAIN if i in rejects_abstention else x[REJECTED]} for i, x in enumerate(closed)]
    return {"files": {TRAIN_FILE: train, EVAL_FILE: held, PAIRS_FILE: pairs}, "heldout_names": sorted(names.used)}


def main(argv: list[str] | None = None) -> None:
    S.write_main(build_all, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
