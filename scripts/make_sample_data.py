"""Generate qlorakit's sample datasets from templates (stdlib only, fully deterministic).

Run from the repository root::

    python scripts/make_sample_data.py              # writes into the repository
    python scripts/make_sample_data.py --out-root D  # writes the same files under D/

Files written (paths relative to the output root):

* ``src/qlorakit/resources/sample_airoboros.jsonl``      132 training rows, airoboros 1.4 layout
  (``instruction``/``response``/``category``); ~75% closed-context questions, ~25% short general tasks. Sized so that
  two epochs of the default job fit in a few minutes on a 2-core CPU.
* ``src/qlorakit/resources/heldout_closed_context.jsonl`` 40 closed-context rows whose invented names, urls and
  answers never occur in the training file; extra keys ``answer`` (fact a correct response contains) and
  ``source`` (url it must cite).
* ``benchmarks/data/spread.jsonl``                       64 rows, lengths log-spread from ~20 to ~1,400 tokens.
* ``benchmarks/data/closed_context_64.jsonl``            64 closed-context rows of ~200 tokens each.

Every fact in a closed-context row is about a fictional entity (town, company, species, person, festival,
chemical) whose names are made up from syllables, with numbers drawn from wide ranges, so a pretrained model can
only answer by reading the context. Held-out names come from a disjoint syllable pool (different first letters) and
are additionally rejected if they occur in the training text; ``build_all`` asserts the disjointness.

Lengths are aimed with ``est_tokens`` (a fit to the SmolLM2 tokenizer) since this script uses only the stdlib.
The airoboros scaffolding alone (metadata, markers, question, citation block, chat template) costs ~170 SmolLM2
tokens, so paragraphs are kept to ~25-50 words to keep one-input rows within ~200-260 rendered tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

TRAIN_FILE = "src/qlorakit/resources/sample_airoboros.jsonl"
HELDOUT_FILE = "src/qlorakit/resources/heldout_closed_context.jsonl"
SPREAD_FILE = "benchmarks/data/spread.jsonl"
CC64_FILE = "benchmarks/data/closed_context_64.jsonl"
SEEDS = {"train": 1404, "heldout": 4041, "spread": 2020, "cc64": 6464}

# Invented names: onset + vowel + middle + ending. Training and held-out names never share a first letter.
TRAIN_ONSETS = ["B", "D", "F", "G", "H", "K", "L", "M", "N", "J"]
HELDOUT_ONSETS = ["P", "Qu", "R", "S", "T", "V", "W", "Z", "Y"]
VOWELS = ["a", "e", "i", "o", "u", "ae", "ey"]
MIDDLES = ["r", "l", "n", "v", "m", "th", "st", "rd", "nd", "lv", "rv", "sk", "dr", "ld", "nn", "rk", "z", "x"]
ENDINGS = ["a", "o", "en", "in", "an", "ar", "or", "is", "el", "eth", "ova", "ira", "ane", "ick", "amo", "ulo",
           "ent", "ise", "ax", "und", "oth", "ier"]
TRAIN_DOMAINS = ["example-news.org", "example-science.net", "example-daily.com", "example-times.org",
                 "example-journal.net", "example-post.com"]
HELDOUT_DOMAINS = ["example-herald.org", "example-chronicle.net", "example-review.com", "example-observer.org"]
TEMPLATE_TOKENS = 32    # SmolLM2 chat template overhead (default system prompt + turn markers)
# Paragraph lengths in words (before the last sentence is added). The airoboros scaffolding costs ~170 SmolLM2
# tokens on its own (every digit is a token), so these keep most one-input rows at ~200-260 rendered tokens.
WORDS_ONE, WORDS_TWO_FACTS, WORDS_TWO_INPUTS = (16, 30), (18, 28), (16, 24)


class Names:
    """Unique invented words from one syllable pool; optionally never occurring in a ``forbidden`` text."""

    def __init__(self, rng: random.Random, onsets: list[str], forbidden: str = ""):
        self.rng, self.onsets, self.forbidden = rng, onsets, forbidden.lower()
        self.used: set[str] = set()

    def word(self) -> str:
        r = self.rng
        while True:
            w = r.choice(self.onsets) + r.choice(VOWELS) + r.choice(MIDDLES)
            if r.random() < 0.15:
                w += r.choice(VOWELS) + r.choice(MIDDLES)
            w += r.choice(ENDINGS)
            if len(w) >= 5 and w not in self.used and w.lower() not in self.forbidden:
                self.used.add(w)
                return w

    def person(self) -> str:
        return f"{self.word()} {self.word()}"


@dataclass
class Fact:
    sentence: str         # the sentence in the context that states the fact
    question: str         # a question only that sentence answers
    answer_sentence: str  # the response's answer, containing ``answer`` verbatim
    answer: str


@dataclass
class Entity:
    kind: str
    name: str
    facts: list[Fact]     # facts[0] is the introductory sentence and always comes first
    fillers: list[str]
    title: str


def _f(sentence, question, answer_sentence, answer) -> Fact:
    assert answer in sentence and answer in answer_sentence, (answer, sentence, answer_sentence)
    return Fact(sentence, question, answer_sentence, str(answer))


def make_town(r: random.Random, nm: Names) -> Entity:
    n, region = nm.word(), f"the {nm.word()} {r.choice(['Valley', 'Highlands', 'Coast', 'Basin', 'Plateau'])}"
    river, mayor, year = f"{nm.word()} River", nm.person(), str(r.randint(1650, 1950))
    fest = f"{nm.word()} {r.choice(['Lantern', 'Harvest', 'Kite', 'Bread', 'Boat'])} Festival"
    pop, elev, month, product = f"{r.randint(1200, 98000):,}", f"{r.randint(40, 2900):,} meters", \
        r.choice(MONTHS), r.choice(PRODUCTS)
    return Entity("town", n, [
        _f(f"{n} is a {r.choice(['quiet', 'small', 'hillside', 'riverside'])} town in {region}.",
           f"In which region is {n} located?", f"{n} is located in {region}.", region),
        _f(f"It was founded in {year} by a group of {r.choice(GROUPS)}.", f"In what year was {n} founded?",
           f"{n} was founded in {year}.", year),
        _f(f"The last census counted {pop} residents.", f"How many residents did the last census count in {n}?",
           f"The last census counted {pop} residents in {n}.", pop),
        _f(f"The town lies {elev} above sea level.", f"How high above sea level does {n} lie?",
           f"{n} lies {elev} above sea level.", elev),
        _f(f"Its current mayor is {mayor}.", f"Who is the current mayor of {n}?",
           f"The current mayor of {n} is {mayor}.", mayor),
        _f(f"The {river} runs through the old market square.", f"Which river runs through {n}?",
           f"The {river} runs through {n}.", river),
        _f(f"Every {month}, {n} hosts the {fest}.", f"Which festival does {n} host every {month}?",
           f"{n} hosts the {fest} every {month}.", fest),
        _f(f"Its workshops are known for {product}.", f"What are the workshops of {n} known for?",
           f"The workshops of {n} are known for {product}.", product),
    ], FILLERS["town"], f"{n}: A Town Profile")


def make_company(r: random.Random, nm: Names) -> Entity:
    suffix, industry = r.choice([("Dynamics", "engineering"), ("Textiles", "textile"), ("Robotics", "robotics"),
                                 ("Foods", "food-processing"), ("Optics", "optics"), ("Logistics", "logistics")])
    n, city, founder, ceo = f"{nm.word()} {suffix}", nm.word(), nm.person(), nm.person()
    year, product = str(r.randint(1890, 2005)), f"{nm.word()} {r.randint(2, 990)}"
    emp, rev = f"{r.randint(40, 26000):,}", f"${r.randint(3, 950)}.{r.randint(1, 9)} million"
    founded = f"The company was founded in {year} by {founder}."
    return Entity("company", n, [
        _f(f"{n} is a {industry} company headquartered in {city}.", f"Where is {n} headquartered?",
           f"{n} is headquartered in {city}.", city),
        _f(founded, f"Who founded {n}?", f"{n} was founded by {founder}.", founder),
        _f(founded, f"In what year was {n} founded?", f"{n} was founded in {year}.", year),
        _f(f"Today it employs {emp} people.", f"How many people does {n} employ?", f"{n} employs {emp} people.",
           emp),
        _f(f"Its best-selling product is the {product}.", f"What is the best-selling product of {n}?",
           f"The best-selling product of {n} is the {product}.", product),
        _f(f"Last year it reported revenue of {rev}.", f"How much revenue did {n} report last year?",
           f"{n} reported revenue of {rev} last year.", rev),
        _f(f"Its chief executive is {ceo}.", f"Who is the chief executive of {n}?",
           f"The chief executive of {n} is {ceo}.", ceo),
    ], FILLERS["company"], f"Inside {n}")


def make_species(r: random.Random, nm: Names) -> Entity:
    animal, klass = r.choice([("tree frog", "amphibian"), ("beetle", "insect"), ("lizard", "reptile"),
                              ("moth", "insect"), ("salamander", "amphibian"), ("owl", "bird"), ("vole", "mammal")])
    n, sci = f"{nm.word()} {animal}", f"{nm.word()} {nm.word().lower()}i"
    region, person = f"the {nm.word()} {r.choice(['Highlands', 'Wetlands', 'Forest', 'Islands'])}", nm.person()
    year, survey = str(r.randint(1780, 1980)), str(r.randint(1985, 2007))
    length = f"{r.randint(2, 60)}.{r.randint(1, 9)} centimeters"
    count, life, food = f"{r.randint(150, 48000):,}", f"{r.randint(3, 40)} years", r.choice(FOODS)
    intro = f"The {n} ({sci}) is a small {klass} native to {region}."
    return Entity("species", n, [
        _f(intro, f"What is the scientific name of the {n}?", f"The scientific name of the {n} is {sci}.", sci),
        _f(intro, f"Which region is the {n} native to?", f"The {n} is native to {region}.", region),
        _f(f"It was first described in {year} by the naturalist {person}.", f"Who first described the {n}?",
           f"The {n} was first described by {person}.", person),
        _f(f"Adults grow to about {length} in length.", f"How long do adults of the {n} grow?",
           f"Adults of the {n} grow to about {length} in length.", length),
        _f(f"Its diet consists mainly of {food}.", f"What does the {n} mainly eat?",
           f"The diet of the {n} consists mainly of {food}.", food),
        _f(f"A {survey} survey estimated that {count} individuals remain in the wild.",
           f"According to the {survey} survey, how many individuals of the {n} remain in the wild?",
           f"The {survey} survey estimated that {count} individuals remain in the wild.", count),
        _f(f"Individuals can live for up to {life}.", f"How long can an individual {n} live?",
           f"An individual {n} can live for up to {life}.", life),
    ], FILLERS["species"], f"Field Notes on the {n}")


def make_person(r: random.Random, nm: Names) -> Entity:
    job, work, works = r.choice(PROFESSIONS)
    n, town, inst = nm.person(), nm.word(), f"{nm.word()} Institute"
    he, his = r.choice([("she", "her"), ("he", "his")])
    born = r.randint(1920, 1975)  # fact years stay before the article dates (2008-2023)
    born, prize_year, prize = str(born), str(r.randint(born + 25, 2007)), f"{nm.word()} Prize"
    title = f"The {r.choice(['Glass', 'Silent', 'Crooked', 'Amber', 'Hollow', 'Last'])} " \
            f"{r.choice(['Orchard', 'Harbor', 'Lantern', 'Staircase', 'Winter', 'Bridge'])} of {nm.word()}"
    k = f"{r.randint(3, 140)} {works}"
    intro = f"{n} is a {job} born in {town} in {born}."
    return Entity("person", n, [
        _f(intro, f"Where was {n} born?", f"{n} was born in {town}.", town),
        _f(intro, f"In what year was {n} born?", f"{n} was born in {born}.", born),
        _f(f"{he.capitalize()} is best known for the {work} \"{title}\".",
           f"What is the title of the {work} that {n} is best known for?",
           f"{n} is best known for the {work} \"{title}\".", title),
        _f(f"In {prize_year}, {he} received the {prize} for {his} work.", f"Which prize did {n} receive in "
           f"{prize_year}?", f"In {prize_year}, {n} received the {prize}.", prize),
        _f(f"Over {his} career, {he} has completed {k}.", f"How many {works} has {n} completed?",
           f"{n} has completed {k}.", k),
        _f(f"{he.capitalize()} currently teaches at the {inst}.", f"Where does {n} currently teach?",
           f"{n} currently teaches at the {inst}.", inst),
    ], FILLERS["person"], f"A Conversation with {n}")


def make_festival(r: random.Random, nm: Names) -> Entity:
    n = f"{nm.word()} {r.choice(['Lantern', 'Harvest', 'Kite', 'Honey', 'Drum', 'Lake'])} Festival"
    town, month, year, org = nm.word(), r.choice(MONTHS), str(r.randint(1820, 2005)), nm.person()
    visitors, days = f"{r.randint(900, 160000):,}", f"{r.randint(2, 12)} days"
    event = f"{nm.word()} {r.choice(['raft race', 'torch parade', 'bread contest', 'drum march', 'kite duel'])}"
    intro = f"The {n} is an annual festival held in the town of {town} every {month}."
    return Entity("festival", n, [
        _f(intro, f"In which town is the {n} held?", f"The {n} is held in {town}.", town),
        _f(intro, f"In which month is the {n} held?", f"The {n} is held every {month}.", month),
        _f(f"It was first held in {year} to celebrate {r.choice(REASONS)}.", f"When was the {n} first held?",
           f"The {n} was first held in {year}.", year),
        _f(f"Last year the festival drew {visitors} visitors.", f"How many visitors did the {n} draw last year?",
           f"Last year the {n} drew {visitors} visitors.", visitors),
        _f(f"Its main event is the {event}.", f"What is the main event of the {n}?",
           f"The main event of the {n} is the {event}.", event),
        _f(f"The celebrations last {days}.", f"How long do the celebrations of the {n} last?",
           f"The celebrations of the {n} last {days}.", days),
        _f(f"The festival is organized by {org}.", f"Who organizes the {n}?", f"The {n} is organized by {org}.",
           org),
    ], FILLERS["festival"], f"A Guide to the {n}")


def make_chemical(r: random.Random, nm: Names) -> Entity:
    n = nm.word().lower() + r.choice(["ine", "ol", "ate", "ene", "ide"])
    cap, lab, person = n.capitalize(), f"{nm.word()} Laboratory", nm.person()
    year, mp, color = str(r.randint(1850, 2005)), f"{r.randint(40, 900)}.{r.randint(0, 9)} degrees Celsius", \
        r.choice(COLORS)
    carbons, tonnes, use = f"{r.randint(4, 60)} carbon atoms", f"{r.randint(12, 9000):,} tonnes", r.choice(USES)
    intro = f"{cap} is a {color} crystalline compound first prepared at the {lab}."
    return Entity("chemical", n, [
        _f(intro, f"Where was {n} first prepared?", f"{cap} was first prepared at the {lab}.", lab),
        _f(intro, f"What color is {n}?", f"{cap} is {color}.", color),
        _f(f"It was first synthesized in {year} by the chemist {person}.", f"Who first synthesized {n}?",
           f"{cap} was first synthesized by {person}.", person),
        _f(f"Its melting point is {mp}.", f"What is the melting point of {n}?",
           f"The melting point of {n} is {mp}.", mp),
        _f(f"It is used mainly in {use}.", f"What is {n} mainly used in?", f"{cap} is used mainly in {use}.", use),
        _f(f"Each molecule contains {carbons}.", f"How many carbon atoms does a molecule of {n} contain?",
           f"Each molecule of {n} contains {carbons}.", carbons),
        _f(f"Global production reached {tonnes} last year.", f"How much {n} was produced globally last year?",
           f"Global production of {n} reached {tonnes} last year.", tonnes),
    ], FILLERS["chemical"], f"{cap}: Properties and Uses")


MAKERS = [make_town, make_company, make_species, make_person, make_festival, make_chemical]
SECTIONS = {"town": "places", "company": "business", "species": "nature", "person": "people",
            "festival": "culture", "chemical": "science"}


@dataclass
class Doc:
    """One BEGININPUT block: an entity, its metadata and the text written about it."""
    entity: Entity
    meta: list[tuple[str, str]]
    text: str

    @property
    def url(self) -> str:
        return dict(self.meta)["url"]

    @property
    def date(self) -> str:
        return dict(self.meta)["date"]

    def render(self) -> str:
        meta = "\n".join(f"{k}: {v}" for k, v in self.meta)
        return f"BEGININPUT\nBEGINCONTEXT\n{meta}\nENDCONTEXT\n{self.text}\nENDINPUT"


def make_doc(r: random.Random, nm: Names, domains: list[str], words: int, must: list[Fact] = (), ent=None,
             n_extra: int = 1) -> Doc:
    """A BEGININPUT block about ``ent`` (or a new entity): its intro sentence, the sentences of the ``must`` facts,
    then other facts and filler until ``words`` is reached; ``n_extra`` metadata keys besides url and date. Texts of
    more than 12 sentences are split into paragraphs of ~90 words."""
    e = ent or r.choice(MAKERS)(r, nm)
    slug = re.sub(r"[^a-z0-9]+", "-", e.name.lower()).strip("-")
    url = f"https://www.{r.choice(domains)}/{r.choice(['articles', SECTIONS[e.kind]])}/{slug}"
    meta = [("url", url), ("date", f"{r.randint(2008, 2023)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}")]
    extras = [("author", nm.person()), ("title", e.title), ("source", f"The {nm.word()} Gazette")]
    if e.kind in ("species", "chemical"):
        extras.append(("journal", f"{nm.word()} Journal of {'Zoology' if e.kind == 'species' else 'Chemistry'}"))
    meta += r.sample(extras, n_extra)
    r.shuffle(meta)
    intro = e.facts[0].sentence
    body = list(dict.fromkeys(f.sentence for f in must if f.sentence != intro))
    facts = [s for s in dict.fromkeys(f.sentence for f in e.facts) if s != intro and s not in body]
    fillers = [s.format(n=e.name) for s in e.fillers]
    r.shuffle(facts)
    r.shuffle(fillers)
    while (facts or fillers) and len(" ".join([intro] + body).split()) < words:
        # Prefer other facts (distractors the question must be told apart from) over neutral filler.
        body.append((facts if facts and (not fillers or r.random() < 0.65) else fillers).pop())
    r.shuffle(body)
    sentences, paragraphs, cur = [intro] + body, [], []
    for s in sentences:
        cur.append(s)
        if len(" ".join(cur).split()) > 90 and len(sentences) > 12:
            paragraphs.append(" ".join(cur))
            cur = []
    paragraphs += [" ".join(cur)] if cur else []
    return Doc(e, meta, "\n\n".join(paragraphs))


def closed_context_row(r: random.Random, nm: Names, domains: list[str], n_inputs: int = 1, n_questions: int = 1,
                       words: tuple[int, int] = WORDS_ONE, eligible=lambda fact: True,
                       max_extra: int = 1) -> dict | None:
    """A closed-context row: ``n_inputs`` blocks, ``n_questions`` questions about one of them; None if no fact
    of the asked entity passes ``eligible``."""
    ents = [r.choice(MAKERS)(r, nm) for _ in range(n_inputs)]
    target = r.randrange(n_inputs)
    # Each intro-sentence fact shares its sentence; questions are picked from distinct sentences.
    choices = {}
    for f in ents[target].facts:
        if eligible(f):
            choices.setdefault(f.sentence, f)
    if len(choices) < n_questions:
        return None
    asked = r.sample(list(choices.values()), n_questions)
    docs = [make_doc(r, nm, domains, r.randint(*words), asked if i == target else [], ent=e,
                     n_extra=r.randint(0, max_extra)) for i, e in enumerate(ents)]
    doc = docs[target]
    questions = [f.question for f in asked]
    if r.random() < 0.25:
        questions[0] = "According to the text, " + questions[0][0].lower() + questions[0][1:]
    instruction = "\n".join(d.render() for d in docs) + \
        f"\nBEGININSTRUCTION\n{' '.join(questions)} Cite your source.\nENDINSTRUCTION"
    response = " ".join(f.answer_sentence for f in asked) + f"\n\nReference(s):\nurl: {doc.url}\ndate: {doc.date}"
    return {"instruction": instruction, "response": response, "category": "contextual",
            "answer": asked[0].answer, "source": doc.url}


def general_row(r: random.Random) -> dict:
    """A short general task (arithmetic, word games, rewriting, definitions, lists, code) with a correct answer."""
    category, make = r.choice(GENERAL_TASKS)
    instruction, response = make(r)
    return {"instruction": instruction, "response": response, "category": category}


def est_tokens(row: dict) -> float:
    """Approximate SmolLM2 token count of instruction + response (no chat template), to aim lengths without a
    tokenizer: a linear fit on these templates (lowercase words ~1 token, invented capitalised names ~1 per 3
    letters, digits ~1.5 with separators, punctuation 1, newlines ~2.6 with the marker words they bring)."""
    text = row["instruction"] + "\n" + row["response"]
    return (0.92 * len(re.findall(r"\b[a-z]+\b", text)) + 0.33 * sum(map(len, re.findall(r"\b[A-Z][a-z]*\b", text)))
            + 1.5 * len(re.findall(r"\d", text)) + len(re.findall(r"[^\w\s]", text)) + 2.6 * text.count("\n"))


def airoboros(row: dict) -> dict:
    return {k: row[k] for k in ("instruction", "response", "category")}


def build_training() -> tuple[list[dict], Names]:
    """132 rows: 96 closed-context (single fact, two facts, two inputs) and 36 general, shuffled."""
    r = random.Random(SEEDS["train"])
    nm = Names(r, TRAIN_ONSETS)
    rows, seen = [], set()
    for i in range(96):
        kind = i % 10  # 0-6: one input, one question; 7-8: two questions; 9: two inputs
        if kind < 7:
            rows.append(closed_context_row(r, nm, TRAIN_DOMAINS, 1, 1, WORDS_ONE))
        elif kind < 9:
            rows.append(closed_context_row(r, nm, TRAIN_DOMAINS, 1, 2, WORDS_TWO_FACTS))
        else:
            rows.append(closed_context_row(r, nm, TRAIN_DOMAINS, 2, 1, WORDS_TWO_INPUTS))
    while len(rows) < 132:
        row = general_row(r)
        if row["instruction"] not in seen:
            seen.add(row["instruction"])
            rows.append(row)
    r.shuffle(rows)
    return [airoboros(x) for x in rows], nm


def build_heldout(train_text: str) -> tuple[list[dict], Names]:
    """40 closed-context rows from the held-out name pool; answers and urls absent from ``train_text``."""
    r = random.Random(SEEDS["heldout"])
    nm = Names(r, HELDOUT_ONSETS, forbidden=train_text)
    rows = []
    # Only distinctive answers (a number or an invented name) that the training text never contains.
    eligible = lambda f: re.search(r"[0-9A-Z]", f.answer) and f.answer not in train_text  # noqa: E731
    while len(rows) < 40:
        two = len(rows) % 5 == 4  # every fifth row has a second, distracting input
        row = closed_context_row(r, nm, HELDOUT_DOMAINS, 2 if two else 1, 1, WORDS_TWO_INPUTS if two else WORDS_ONE,
                                 eligible)
        if row:
            rows.append({**airoboros(row), "answer": row["answer"], "source": row["source"]})
    return rows, nm


def general_batch(r: random.Random, k: int) -> dict:
    """``k`` general tasks asked at once as a numbered list (medium-length rows for the spread benchmark)."""
    tasks = [general_row(r) for _ in range(k)]
    return {"instruction": "Answer each of the following.\n" +
                           "\n".join(f"{i}. {t['instruction']}" for i, t in enumerate(tasks, 1)),
            "response": "\n\n".join(f"{i}. {t['response']}" for i, t in enumerate(tasks, 1)),
            "category": "general"}


def build_spread() -> list[dict]:
    """64 rows whose token counts (instruction + response, no template) are spaced log-uniformly from ~20 to
    ~1,400: single general tasks, batches of them, then closed-context rows with more and longer inputs."""
    r = random.Random(SEEDS["spread"])
    nm = Names(r, TRAIN_ONSETS)
    rows = []
    for i in range(64):
        target = 20 * (1400 / 20) ** (i / 63)
        if target < 60:
            cands = [general_row(r) for _ in range(60)]
        elif target < 200:
            cands = [general_batch(r, k) for k in range(2, 10) for _ in range(3)]
        else:
            n_in = 1 + int(target // 300)
            words = min(170, (target - 120 * n_in) / (1.4 * n_in))
            cands = [closed_context_row(r, nm, TRAIN_DOMAINS, n_in, r.choice([1, 1, 2]), (int(w), int(w)),
                                        max_extra=2) for w in (words * f for f in (0.7, 0.8, 0.9, 1.0, 1.1, 1.2))]
        rows.append(min(cands, key=lambda x: abs(math.log(est_tokens(x) / target))))
    r.shuffle(rows)
    return [airoboros(x) for x in rows]


def build_cc64() -> list[dict]:
    """64 single-input, single-question closed-context rows of ~200 tokens each with the SmolLM2 chat template."""
    r = random.Random(SEEDS["cc64"])
    nm = Names(r, TRAIN_ONSETS)
    rows = []
    while len(rows) < 64:
        row = closed_context_row(r, nm, TRAIN_DOMAINS, 1, 1, (15, 35), max_extra=0)
        if abs(est_tokens(row) + TEMPLATE_TOKENS - 200) <= 8:
            rows.append(airoboros(row))
    return rows


CC_RE = re.compile(r"\A(BEGININPUT\nBEGINCONTEXT\n(?:[a-z]+: [^\n]+\n)+ENDCONTEXT\n.+?\nENDINPUT\n)+"
                   r"BEGININSTRUCTION\n[^\n]+ Cite your source\.\nENDINSTRUCTION\Z", re.S)


def build_all() -> dict:
    """Every dataset as ``{relative path: rows}``, plus ``heldout_names``; checks disjointness and structure."""
    train, _ = build_training()
    train_text = "\n".join(json.dumps(x, ensure_ascii=False) for x in train)
    heldout, held_names = build_heldout(train_text)
    low = train_text.lower()
    for name in held_names.used:
        assert name.lower() not in low, f"held-out name {name!r} occurs in the training file"
    assert not any(d in train_text for d in HELDOUT_DOMAINS)
    for row in heldout:
        assert CC_RE.match(row["instruction"]), row["instruction"]
        assert row["source"] not in train_text and row["answer"] not in train_text, row
        assert row["answer"] in row["response"] and row["source"] in row["response"], row
    out = {TRAIN_FILE: train, HELDOUT_FILE: heldout, SPREAD_FILE: build_spread(), CC64_FILE: build_cc64()}
    return {"files": out, "heldout_names": sorted(held_names.used)}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_main(build: Callable[[], dict], description: str, argv: list[str] | None = None) -> None:
    """A data script's command line (this one's, make_recipe_data.py's): ``--out-root``, then every file of
    ``build()["files"]`` (relative path -> rows) written under it as JSONL, a line each."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out-root", default=str(Path(__file__).resolve().parents[1]),
                    help="directory the relative output paths are written under (default: the repository root)")
    args = ap.parse_args(argv)
    for rel, rows in build()["files"].items():
        write_jsonl(Path(args.out_root) / rel, rows)
        print(f"{rel}: {len(rows)} rows")


def main(argv: list[str] | None = None) -> None:
    write_main(build_all, __doc__.splitlines()[0], argv)



# ---------------------------------------------------------------------------------------------------------------
# Word pools for the fictional entities. Filler sentences carry no answerable fact; {n} is the entity's name.

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
GROUPS = ["salt traders", "river fishermen", "wool merchants", "stonemasons", "retired sailors", "beekeepers"]
PRODUCTS = ["hand-painted copper lanterns", "blue-glazed pottery", "smoked river trout", "walnut-dyed blankets",
            "carved pine chairs", "bitter herbal liqueur", "woven reed baskets", "tin whistles"]
FOODS = ["fallen seeds", "small snails", "moss and lichen", "beetle larvae", "ripe berries", "freshwater shrimp"]
COLORS = ["pale yellow", "deep violet", "bright orange", "colorless", "emerald green", "rust red"]
USES = ["water purification", "paper bleaching", "battery electrolytes", "textile dyes", "crop protection",
        "glass polishing"]
REASONS = ["the end of a long drought", "the opening of the first bridge", "a record harvest",
           "the return of the fishing fleet", "the founding of the town library"]
PROFESSIONS = [("novelist", "novel", "novels"), ("composer", "symphony", "symphonies"),
               ("painter", "painting", "paintings"), ("playwright", "play", "plays"),
               ("film director", "film", "films"), ("poet", "poem", "poetry collections")]
FILLERS = {
    "town": ["Narrow cobbled streets wind between houses painted in faded pastel colors.",
             "Visitors often remark on the smell of fresh bread in the early morning.",
             "The old stone bridge is a favorite spot for photographers at sunset.",
             "Most residents work in small family businesses or on nearby farms.",
             "A weekly market fills the central square with stalls of vegetables and cheese.",
             "In winter the surrounding hills are often covered in fog.",
             "The town library occupies a former grain warehouse near the station.",
             "Residents of {n} take pride in keeping their gardens neat and colorful.",
             "A single bus line connects {n} with the neighboring villages.",
             "Several walking trails start at the edge of the town."],
    "company": ["The firm prides itself on a quiet, engineering-driven culture.",
                "Its offices occupy a converted brick warehouse near the harbor.",
                "Staff at {n} are encouraged to spend one afternoon a week on side projects.",
                "The company has avoided outside investors for most of its history.",
                "Industry analysts describe its products as reliable but expensive.",
                "A small museum in the lobby displays its earliest prototypes.",
                "Customers often praise its responsive support team.",
                "The firm publishes a short newsletter for its suppliers every quarter.",
                "Critics argue that {n} has been slow to adopt new technology.",
                "Its logo, a simple blue circle, has barely changed over the years."],
    "species": ["It is most active at dusk, when it leaves its shelter to forage.",
                "Its mottled coloring makes it hard to spot among fallen leaves.",
                "Researchers have noted that it avoids areas with heavy foot traffic.",
                "Little is known about its breeding behavior.",
                "Conservation groups have called for better protection of its habitat.",
                "The {n} is rarely seen by casual visitors to the region.",
                "Local folklore associates the animal with good luck.",
                "Its call is a short, high-pitched chirp repeated several times.",
                "Habitat loss remains the main threat to its survival.",
                "Field teams usually survey it during the wet season."],
    "person": ["Critics praise the quiet precision of the work.",
               "Early in life, the artist worked a series of odd jobs to pay the rent.",
               "Friends describe {n} as shy in public but generous with students.",
               "Much of the work explores memory, family and small-town life.",
               "The artist rarely gives interviews and avoids social media.",
               "Several pieces have been translated or performed abroad.",
               "A documentary about the artist's working methods is in production.",
               "Young artists often cite {n} as an important influence.",
               "The artist spends summers in a small cabin without electricity.",
               "Public readings and performances by {n} regularly sell out."],
    "festival": ["Streets are decorated with paper garlands in the weeks before the opening.",
                 "Food stalls sell grilled fish, sweet pastries and spiced cider.",
                 "Local schools prepare songs and costumes for the children's parade.",
                 "Many families plan their holidays around the celebrations.",
                 "Musicians play in the squares until late at night.",
                 "Volunteers clean the streets early every morning during the festival.",
                 "The {n} is known for its friendly, relaxed atmosphere.",
                 "Hotels in the area are usually fully booked months in advance.",
                 "The closing night ends with a procession down to the water.",
                 "Craftspeople demonstrate traditional skills in open workshops."],
    "chemical": ["The compound is stable at room temperature but slowly absorbs moisture.",
                 "It dissolves readily in warm water and in most alcohols.",
                 "Handling it requires gloves and eye protection.",
                 "Researchers continue to study its long-term environmental effects.",
                 "It has a faint, slightly sweet odor.",
                 "Small samples are sold to universities for teaching purposes.",
                 "Stored in sealed glass containers, {n} keeps for several years.",
                 "Its crystals are needle-shaped and break easily.",
                 "Production generates little waste compared with older methods.",
                 "Safety data sheets classify it as a mild irritant."],
}


# ---------------------------------------------------------------------------------------------------------------
# General tasks: each takes a Random and returns (instruction, response), computed so the answer is correct.

def task_arithmetic(r):
    a, b = r.randint(12, 999), r.randint(12, 999)
    op = r.choice(["+", "-", "*"])
    if op == "*":
        a, b = r.randint(3, 99), r.randint(3, 49)
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    q = r.choice([f"What is {a} {op} {b}?", f"Calculate {a} {op} {b}.", f"Compute {a} {op} {b}."])
    return q, f"{a} {op} {b} = {value}"


def task_word_problem(r):
    a, h = r.randint(3, 60), r.randint(2, 12)
    if r.random() < 0.5:
        item, place = r.choice([("loaves of bread", "bakery"), ("bicycles", "workshop"), ("jars of jam", "kitchen"),
                                ("chairs", "factory")])
        made = a * h
        sold = r.randint(1, made - 1)
        return (f"A {place} makes {a} {item} per hour for {h} hours and then sells {sold} of them. "
                f"How many {item} are left?",
                f"First, it makes {a} * {h} = {made} {item}.\nThen it sells {sold}, so {made} - {sold} = "
                f"{made - sold} {item} are left.")
    price = r.randint(2, 25)
    total = a * price
    paid = (total // 100 + 1) * 100
    return (f"Tickets cost ${price} each. A group of {a} people buys one ticket each and pays with ${paid}. "
            f"How much change do they get?",
            f"The tickets cost {a} * ${price} = ${total} in total.\nThe change is ${paid} - ${total} = "
            f"${paid - total}.")


def task_percent(r):
    p, n = r.choice([5, 10, 20, 25, 50, 75]), r.randint(2, 60) * 20
    return f"What is {p}% of {n}?", f"{p}% of {n} is {n * p // 100}, because {n} * {p} / 100 = {n * p // 100}."


def task_average(r):
    k = r.randint(3, 6)
    nums = [r.randint(1, 50) for _ in range(k)]
    nums[-1] += -sum(nums) % k  # make the mean a whole number
    total = sum(nums)
    return (f"What is the average of {', '.join(map(str, nums))}?",
            f"The sum is {total} and there are {k} numbers, so the average is {total} / {k} = {total // k}.")


def task_minutes(r):
    h, m = r.randint(2, 9), r.choice([0, 15, 30, 45])
    if m == 0:
        return f"How many minutes are in {h} hours?", f"{h} hours is {h} * 60 = {h * 60} minutes."
    t = f"{h} hours and {m} minutes"
    return f"How many minutes are in {t}?", f"{t} is {h} * 60 + {m} = {h * 60 + m} minutes."


WORDS = ["apple", "river", "candle", "mountain", "pencil", "garden", "window", "orange", "tiger", "violin",
         "basket", "cloud", "doctor", "engine", "forest", "harbor", "island", "jacket", "ladder", "marble"]


def task_sort_words(r):
    w = r.sample(WORDS, r.randint(4, 7))
    return f"Sort these words alphabetically: {', '.join(w)}.", ", ".join(sorted(w))


def task_reverse_words(r):
    w = r.sample(WORDS, r.randint(4, 6))
    return (f"Reverse the order of the words in this list: {' '.join(w)}",
            " ".join(reversed(w)))


def task_letters(r):
    w = r.choice(WORDS)
    vowels = sum(c in "aeiou" for c in w)
    return (f"How many letters and how many vowels are in the word \"{w}\"?",
            f"The word \"{w}\" has {len(w)} letters, of which {vowels} are vowels.")


VERBS = [("paints", "painted", "the fence"), ("writes", "wrote", "a letter"), ("carries", "carried", "the boxes"),
         ("buys", "bought", "fresh bread"), ("cleans", "cleaned", "the kitchen"), ("reads", "read", "the paper"),
         ("teaches", "taught", "the class"), ("builds", "built", "a shed"), ("catches", "caught", "the bus"),
         ("drives", "drove", "the truck"), ("feeds", "fed", "the cat"), ("sings", "sang", "a song")]
PEOPLE = ["Anna", "Ben", "Carla", "David", "Elena", "Omar", "Priya", "Lucas", "Mei", "Jonas"]


def task_past_tense(r):
    who, (now, past, obj) = r.choice(PEOPLE), r.choice(VERBS)
    day = r.choice(["on Mondays", "every morning", "after lunch", "at the weekend"])
    return (f"Rewrite this sentence in the past tense: {who} {now} {obj} {day}.",
            f"{who} {past} {obj} {day}.")


DEFINITIONS = [
    ("photosynthesis", "the process by which plants, algae and some bacteria use sunlight, water and carbon "
                       "dioxide to make glucose, releasing oxygen as a by-product. It takes place mainly in the "
                       "chloroplasts of leaf cells."),
    ("an algorithm", "a finite sequence of well-defined steps for solving a problem or performing a task. A recipe "
                     "for baking bread and the method for long division are both algorithms."),
    ("inflation", "a general rise in prices over time, which reduces the purchasing power of money. If inflation is "
                  "5% a year, something that costs $100 today costs about $105 a year later."),
    ("a metaphor", "a figure of speech that describes something by saying it is something else. For example, "
                   "\"time is a thief\" suggests that time takes things away from us."),
    ("an ecosystem", "a community of living organisms together with the physical environment they interact with. "
                     "A pond, with its fish, plants, insects, water and mud, is a small ecosystem."),
    ("evaporation", "the process by which a liquid turns into a gas at its surface as it gains heat. Puddles "
                    "drying up after rain is a common example."),
    ("a compiler", "a program that translates source code written in a programming language into machine code or "
                   "another lower-level form. C programs, for example, are usually compiled before they run."),
    ("a catalyst", "a substance that speeds up a chemical reaction without being used up by it. Enzymes are the "
                   "catalysts of living cells."),
    ("a peninsula", "a piece of land surrounded by water on most sides but still connected to the mainland. Italy "
                    "and Florida are well-known examples."),
    ("recursion", "a technique in which a function solves a problem by calling itself on smaller instances of the "
                  "same problem, until it reaches a simple base case."),
    ("a synonym", "a word that means the same or nearly the same as another word. \"Big\" and \"large\" are "
                  "synonyms."),
    ("erosion", "the gradual wearing away of rock or soil by wind, water or ice. River valleys and sea cliffs are "
                "shaped by erosion over thousands of years."),
    ("latitude", "the angular distance of a place north or south of the equator, measured in degrees. The equator "
                 "is at 0 degrees and the poles are at 90 degrees."),
    ("a prime number", "a whole number greater than 1 whose only divisors are 1 and itself. 2, 3, 5, 7 and 11 are "
                       "the first five primes."),
]


def task_define(r):
    term, text = r.choice(DEFINITIONS)
    bare = term.split(" ", 1)[-1] if term.startswith(("a ", "an ")) else term
    q = r.choice([f"Define {bare} in one sentence.", f"What is {term}?", f"Briefly explain what {term} is."])
    return q, f"{term[0].upper() + term[1:]} is {text}"


FACTS = [
    ("List the first five prime numbers.", "The first five prime numbers are 2, 3, 5, 7 and 11."),
    ("Name the four seasons of the year.", "The four seasons are spring, summer, autumn (fall) and winter."),
    ("What are the three common states of matter?", "The three common states of matter are solid, liquid and gas."),
    ("How many days are in a leap year?", "A leap year has 366 days."),
    ("Name the planets of the solar system in order from the Sun.",
     "Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus and Neptune."),
    ("How many sides does a hexagon have?", "A hexagon has six sides."),
    ("What is the boiling point of water at sea level in degrees Celsius?",
     "Water boils at 100 degrees Celsius at sea level."),
    ("Which gas do plants take in from the air for photosynthesis?", "Plants take in carbon dioxide."),
    ("List the days of the week that begin with the letter T.", "Tuesday and Thursday."),
    ("Give three tips for getting better sleep.",
     "1. Go to bed and wake up at the same time every day.\n2. Avoid screens for an hour before bed.\n"
     "3. Keep your bedroom dark, quiet and cool."),
    ("Suggest three names for a pet goldfish.", "1. Bubbles\n2. Goldie\n3. Captain Fin"),
]


def task_fact(r):
    return r.choice(FACTS)


CODE = [  # (task, function, example call, printed result, explanation); tests run every example
    ("returns the sum of the even numbers in a list",
     "def sum_even(numbers):\n    return sum(n for n in numbers if n % 2 == 0)", "sum_even([1, 2, 3, 4, 5, 6])", "12",
     "It keeps only the numbers divisible by 2 and adds them up."),
    ("reverses a string", "def reverse(text):\n    return text[::-1]", "reverse(\"hello\")", "olleh",
     "The slice `[::-1]` walks the string from the end to the start."),
    ("computes the factorial of a non-negative integer",
     "def factorial(n):\n    result = 1\n    for i in range(2, n + 1):\n        result *= i\n    return result",
     "factorial(5)", "120", "It multiplies the numbers from 2 to n, so factorial(0) and factorial(1) are 1."),
    ("checks whether a string is a palindrome, ignoring case and spaces",
     "def is_palindrome(text):\n    cleaned = text.lower().replace(\" \", \"\")\n    return cleaned == cleaned[::-1]",
     "is_palindrome(\"Never odd or even\")", "True", "It compares the cleaned string with its reverse."),
    ("removes duplicates from a list while keeping the original order",
     "def unique(items):\n    return list(dict.fromkeys(items))", "unique([3, 1, 3, 2, 1])", "[3, 1, 2]",
     "Dictionary keys are unique and keep their insertion order."),
    ("counts the vowels in a string",
     "def count_vowels(text):\n    return sum(c in \"aeiou\" for c in text.lower())",
     "count_vowels(\"Programming is fun\")", "5", "Each vowel adds 1 to the sum."),
    ("converts a temperature from Celsius to Fahrenheit",
     "def to_fahrenheit(celsius):\n    return celsius * 9 / 5 + 32", "to_fahrenheit(100)", "212.0",
     "It applies the formula F = C * 9/5 + 32."),
    ("returns the first n Fibonacci numbers",
     "def fibonacci(n):\n    numbers, a, b = [], 0, 1\n    for _ in range(n):\n        numbers.append(a)\n"
     "        a, b = b, a + b\n    return numbers", "fibonacci(8)", "[0, 1, 1, 2, 3, 5, 8, 13]",
     "Each number is the sum of the two before it."),
    ("finds the largest number in a list without using max()",
     "def largest(numbers):\n    best = numbers[0]\n    for n in numbers[1:]:\n        if n > best:\n"
     "            best = n\n    return best", "largest([4, 9, 2, 7])", "9",
     "It remembers the biggest value seen so far while scanning the list."),
]


def task_code(r):
    if r.random() < 0.4:
        table, col = r.choice([("orders", "total"), ("employees", "salary"), ("products", "price")])
        n = r.randint(2, 90) * 10
        return (f"Write an SQL query that selects all rows from the {table} table where {col} is greater than {n}.",
                f"```sql\nSELECT *\nFROM {table}\nWHERE {col} > {n};\n```")
    task, code, call, result, note = r.choice(CODE)
    return (f"Write a Python function that {task}.",
            f"```python\n{code}\n\n\nprint({call})  # {result}\n```\n\n{note}")


GENERAL_TASKS = [("general", task_arithmetic), ("general", task_word_problem), ("general", task_percent),
                 ("general", task_average), ("general", task_minutes), ("wordgame", task_sort_words),
                 ("wordgame", task_reverse_words), ("wordgame", task_letters), ("writing", task_past_tense),
                 ("general", task_define), ("trivia", task_fact), ("coding", task_code)]


if __name__ == "__main__":
    main()
