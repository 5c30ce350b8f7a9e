"""Closed-context preference pairs about invented entities (stdlib only, deterministic).

    python scripts/make_pref_data.py --rows 64 --out pairs.jsonl [--seed 0] [--unanswerable 0.3]

Each row is ``{system, prompt, chosen, rejected}`` (qlorakit's ``pairs`` layout, TRL's too). The prompt holds two
airoboros-style passages (BEGININPUT, BEGINCONTEXT url, ENDCONTEXT) about made-up towns and a question about one of
them. Chosen: the right value with its source url, or, where the passages do not hold the answer, "The text does not
say." Rejected: the other passage's value or url (a distractor), or an invented value. Names are built from
syllables and numbers drawn from wide ranges, so only reading the passage gives the answer.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SYLLABLES = "ka lo mir tes van dor eli pra sun quo bel tri zan fen oru gal".split()
FACTS = {"population": (2_000, 90_000), "founding year": (1100, 1950), "river length in km": (12, 900)}
SYSTEM = "Answer only from the passages; cite the source url. If they do not hold the answer, say so."
NOT_SAID = "The text does not say."


def name(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def passage(town: str, url: str, facts: dict) -> str:
    body = " ".join(f"The {k} of {town} is {v}." for k, v in facts.items())
    return f"BEGININPUT\nBEGINCONTEXT\nurl: {url}\nENDCONTEXT\n{body}\nENDINPUT"


def row(rng: random.Random, unanswerable: float) -> dict:
    towns = [name(rng), name(rng)]
    urls = [f"https://{t.lower()}.example/{rng.randint(10, 999)}" for t in towns]
    keys = list(FACTS)
    facts = [{k: rng.randint(*FACTS[k]) for k in rng.sample(keys, 2)} for _ in towns]
    context = "\n".join(passage(t, u, f) for t, u, f in zip(towns, urls, facts))
    target = 0
    if rng.random() < unanswerable:
        missing = next(k for k in keys if k not in facts[target])
        question = f"What is the {missing} of {towns[target]}?"
        chosen = NOT_SAID
        rejected = f"The {missing} of {towns[target]} is {rng.randint(*FACTS[missing])}. Source: {urls[target]}"
    else:
        key = rng.choice(list(facts[target]))
        question = f"What is the {key} of {towns[target]}?"
        chosen = f"The {key} of {towns[target]} is {facts[target][key]}. Source: {urls[target]}"
        wrong_value = facts[1].get(key, rng.randint(*FACTS[key]))
        rejected = rng.choice([f"The {key} of {towns[target]} is {wrong_value}. Source: {urls[target]}",
                               f"The {key} of {towns[target]} is {facts[target][key]}. Source: {urls[1]}"])
    return {"system": SYSTEM, "prompt": f"{context}\nBEGININSTRUCTION\n{question}\nENDINSTRUCTION",
            "chosen": chosen, "rejected": rejected}


def pairs(n: int, seed: int = 0, unanswerable: float = 0.3) -> list[dict]:
    rng = random.Random(seed)
    return [row(rng, unanswerable) for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--unanswerable", type=float, default=0.3)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    rows = pairs(args.rows, args.seed, args.unanswerable)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"{len(rows)} pairs -> {args.out}")


if __name__ == "__main__":
    main()
