"""Write invented dialogues in the HH-RLHF format ({"chosen", "rejected"} transcripts), for the example
pipeline and the tests. Nothing here comes from the public data set: the questions and answers are
written for this repository, and combined so that a larger file has many different prompts.

    python examples/hh/generate.py --n 60 --out examples/hh/data/hh_sample.jsonl   (the shipped sample)
    python examples/hh/generate.py --n 2000 --out /tmp/hh_large.jsonl

A share of the records is malformed the way real HH records are (an empty final assistant turn), so
that the skip-and-count path runs; `--malformed 0` leaves them out.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

# (question, a helpful answer, an unhelpful or rude one): {thing} is filled from THINGS.
TEMPLATES = [
    ("How do I keep {thing} fresh for longer?", "Store {thing} somewhere cool and dry, and keep it sealed.",
     "Just leave {thing} out, it will be fine."),
    ("Can you explain what {thing} is good for?", "{Thing} has many everyday uses at home; I can list some if you like.",
     "Look it up yourself."),
    ("What is a cheap way to clean {thing}?", "Warm water with a little soap works for {thing}; dry it afterwards.",
     "Throw {thing} away and buy a new one."),
    ("Is it safe to leave {thing} in a hot car?", "Better not: heat can damage {thing}, so take it with you.",
     "Sure, nothing bad ever happens in cars."),
    ("How should I store {thing} over the winter?", "Clean {thing}, let it dry, and keep it indoors away from frost.",
     "Winter is not a problem, ignore it."),
    ("My friend broke my {thing}. What should I say?", "Tell them calmly how you feel and agree together on a fix.",
     "Break something of theirs so you are even."),
    ("What should I check before buying {thing} second-hand?", "Look for damage, ask how old it is, and try it first.",
     "Nothing, just buy the first one you see."),
    ("Write one sentence about {thing}.", "{Thing}: a small thing that makes ordinary days easier.",
     "No."),
]
THINGS = ["bread", "a bicycle", "a winter coat", "coffee beans", "a laptop", "a garden hose", "a tent", "honey",
          "a wooden table", "running shoes", "a camera", "a guitar", "house plants", "a kettle", "a backpack",
          "rice", "a paint brush", "a phone charger", "wool socks", "a frying pan", "apples", "a lawn mower",
          "a fish tank", "a desk lamp", "olive oil"]
# Follow-up turns that make a conversation multi-turn: (question, helpful answer, unhelpful answer).
FOLLOW_UPS = [
    ("Thanks. Anything else I should know?", "Only that it is worth checking again in a few weeks.", "No. Stop asking."),
    ("Could you say that more briefly?", "In short: keep it clean, dry and cool.", "I already answered."),
    ("Why does that matter?", "Because it lasts much longer that way, which saves money.", "It just does."),
]
# A few conversations written out in full, one of them with three user turns.
HANDWRITTEN = [
    [("Human", "I want to start running but I get tired after two minutes."),
     ("Assistant", "That is normal at the start. Try one minute of running and one of walking, repeated ten times."),
     ("Human", "How often should I do that?"),
     ("Assistant", "Three times a week, with a rest day in between, is a good start."),
     ("Human", "And when do I run longer?"),
     ("Assistant", ("When a session feels easy, add thirty seconds to each running minute.",
                    "Whenever. Running is boring anyway."))],
    [("Human", "What is a good name for a grey cat?"),
     ("Assistant", ("Smoky, Pebble or Ash all suit a grey cat.", "Cats do not need names."))],
    [("Human", "Please help me write a short thank-you note to my neighbour."),
     ("Assistant", ("Dear neighbour, thank you for watering my plants while I was away. It meant a lot to me.",
                    "Write it yourself, it is your neighbour."))],
]


def conversation(turns: list[tuple[str, str]]) -> str:
    return "".join(f"\n\n{who}: {text}" for who, text in turns)


def record(turns: list[tuple[str, object]]) -> dict[str, str]:
    """The last turn holds (chosen, rejected); everything before it is shared."""
    *head, (who, (good, bad)) = turns
    return {"chosen": conversation([*head, (who, good)]), "rejected": conversation([*head, (who, bad)])}


def templated(rng: random.Random) -> dict[str, str]:
    q, good, bad = rng.choice(TEMPLATES)
    thing = rng.choice(THINGS)
    fill = lambda s: s.format(thing=thing, Thing=thing[0].upper() + thing[1:])  # noqa: E731
    if rng.random() < 0.25:  # a follow-up: the first answer is shared, the second differs
        fq, fgood, fbad = rng.choice(FOLLOW_UPS)
        return record([("Human", fill(q)), ("Assistant", fill(good)), ("Human", fq), ("Assistant", (fgood, fbad))])
    return record([("Human", fill(q)), ("Assistant", (fill(good), fill(bad)))])


def malformed(rng: random.Random) -> dict[str, str]:
    """An empty final assistant turn in the chosen transcript, as a few public HH records have."""
    q, _, bad = rng.choice(TEMPLATES)
    thing = rng.choice(THINGS)
    prompt = conversation([("Human", q.format(thing=thing))])
    return {"chosen": prompt + "\n\nAssistant:", "rejected": prompt + "\n\nAssistant: " + bad.format(thing=thing)}


def records(n: int, *, seed: int = 0, malformed_share: float = 0.03) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out = [record(turns) for turns in HANDWRITTEN][:n]
    n_bad = round(n * malformed_share)
    while len(out) < n - n_bad:
        out.append(templated(rng))
    out += [malformed(rng) for _ in range(n - len(out))]
    rng.shuffle(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--malformed", type=float, default=0.03, help="share of records with an empty final assistant turn")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = records(args.n, seed=args.seed, malformed_share=args.malformed)
    args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"{args.out}: {len(rows)} records")


if __name__ == "__main__":
    main()
