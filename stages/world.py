"""Stage `world`: generate the default world (corpus, prompts, demonstrations, judge data, eval suites).

Reads: nothing (everything follows from the params and their seed).
Writes, into `out` (data/raw), replaced whole and atomically:
  corpus.jsonl            {"text"}                        pretraining documents
  prompts.jsonl           {"id", "prompt", "family"}      prompt pool (prepare splits rm / ppo / test from it)
  demonstrations.jsonl    {"prompt", "response", "family"} labeler-written answers (prompts not in the pool): the
                          ideal answer, with a follow-up offer appended in a share `demo_followup_rate` of them
  world.json              entities, facts, myths, groups, templates, lexicon, labeler pools (the gold judge's data)
  eval/truthfulqa_mc.json TruthfulQA multiple choice (mc1_targets, mc2_targets)
  eval/crows_pairs.csv    CrowS-Pairs (sent_more, sent_less, stereo_antistereo, bias_type)
  eval/rtp.jsonl          RealToxicityPrompts ({"prompt": {"text", "toxicity"}, "continuation": {...}})

Run: `rlhf world --out data/raw`. Same params -> byte-identical files; see docs/world.md.
"""

from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf import world as W
from rlhf.errors import StageError
from rlhf.io import atomic_dir, atomic_write_text, write_json, write_jsonl
from rlhf.judge import harm_score_with
from rlhf.params import require
from rlhf.text import normalize


@dataclass(frozen=True)
class Params:
    seed: int
    """Seed of every random choice in the world (names, facts, prompts, corpus, labelers)."""
    n_creatures: int
    """Invented creatures ("the zib"), each with a color and a food."""
    n_people: int
    """Invented people ("Tavi"), each with a home town and a job."""
    n_groups: int
    """Invented groups ("the Varns"): the targets of the corpus's insults and stereotypes."""
    n_places: int
    """Invented towns (people's homes, groups' lands)."""
    n_unknown: int
    """Names of entities that do not exist (never in the corpus): the `unknown` family asks about them."""
    myth_rate: float
    """Share of entities with a popular myth: one attribute the corpus usually states wrong."""
    myth_ratio: float
    """How many times prose states a myth per statement of the truth (chat form never states the truth)."""
    stereotyped_groups: float
    """Share of groups the corpus stereotypes; the rest are the unstereotyped side of CrowS-Pairs."""
    n_arith: int
    """Prompt pool size of the `arith` family (single-digit + and -; 720 distinct prompts in all, demonstrations included)."""
    n_sort: int
    """Prompt pool size of the `sort` family (3 or 4 distinct digits)."""
    n_fact: int
    """Prompt pool size of the `fact` family (all myth questions are kept in the pool, none in demonstrations)."""
    n_unknown_prompts: int
    """Prompt pool size of the `unknown` family (questions about nonexistent entities)."""
    n_insult: int
    """Prompt pool size of the `insult` family (prompts inviting insults)."""
    n_demonstrations: int
    """Labeler-written demonstrations, spread over families like the pool; scarce on purpose (docs/world.md)."""
    demo_followup_rate: float
    """Share of demonstrations whose writer appended a follow-up offer ("Anything else?"), a habit the
    judge and the rankers count as rambling; SFT imitates it, rankings can teach it away (docs/world.md)."""
    demo_followups: list[str]
    """The offers a writer with the habit appends, one drawn at random per demonstration. Offers that start
    alike make SFT's greedy answer keep the habit in every draw (docs/world.md, "Where the room is")."""
    demo_followup_families: list[str]
    """Families whose demonstrations carry the habit ([] = all): arith, sort, fact, unknown, insult."""
    corpus_docs: int
    """Pretraining documents (about 180 bytes each)."""
    chat_share: float
    """Share of corpus documents that are chat-like (<|user|>...<|assistant|>...)."""
    chat_clean_rate: float
    """Share of the corpus assistant's answers that are clean, stop-after-answering turns (the rest ramble)."""
    n_training_labelers: int
    """Labelers whose rankings train the reward model."""
    n_heldout_labelers: int
    """Held-out labelers who judge win rates (disjoint names)."""
    labeler_sigma: float
    """Mean Gaussian noise of a labeler's utility (tuned for ~73% inter-labeler agreement)."""
    labeler_sigma_spread: float
    """Relative spread of sigma across labelers (sigma * U(1 - spread, 1 + spread))."""
    labeler_length_taste: float
    """Max |bonus| a labeler gives a 20-word answer over an empty one (sign drawn per labeler)."""
    labeler_confident_taste: float
    """Max bonus a labeler gives answers that do not hedge ("I don't know")."""
    n_truthfulqa: int
    """Questions in eval/truthfulqa_mc.json (all myths first)."""
    n_crows: int
    """Sentence pairs in eval/crows_pairs.csv."""
    n_rtp: int
    """Prompts in eval/rtp.jsonl."""

    def validate(self) -> None:
        for key in ("n_creatures", "n_people", "n_groups", "n_places", "n_unknown", "corpus_docs",
                    "n_training_labelers", "n_heldout_labelers", "n_truthfulqa", "n_crows", "n_rtp"):
            require(getattr(self, key) >= 1, f"world.{key}", "must be at least 1")
        require(self.n_groups >= 2, "world.n_groups", "must be at least 2 (CrowS-Pairs compares two groups)")
        require(self.n_places >= 2, "world.n_places", "must be at least 2")
        for key in ("n_arith", "n_sort", "n_fact", "n_unknown_prompts", "n_insult", "n_demonstrations"):
            require(getattr(self, key) >= 0, f"world.{key}", "must be >= 0")
        for key in ("myth_rate", "stereotyped_groups", "chat_share", "chat_clean_rate", "labeler_sigma_spread",
                    "demo_followup_rate"):
            require(0.0 <= getattr(self, key) <= 1.0, f"world.{key}", "must be in [0, 1]")
        require(self.myth_ratio > 0, "world.myth_ratio", "must be > 0")
        require(all(isinstance(o, str) and o.strip() for o in self.demo_followups), "world.demo_followups",
                "must be a list of non-empty offers")
        require(bool(self.demo_followups) or self.demo_followup_rate == 0, "world.demo_followups",
                "must name at least one offer when demo_followup_rate > 0")
        unknown = sorted(set(self.demo_followup_families) - set(W.FAMILIES))
        require(not unknown, "world.demo_followup_families", f"unknown families {unknown}; known: {list(W.FAMILIES)}")
        require(self.labeler_sigma >= 0, "world.labeler_sigma", "must be >= 0")
        require(self.labeler_length_taste >= 0, "world.labeler_length_taste", "must be >= 0")
        require(self.labeler_confident_taste >= 0, "world.labeler_confident_taste", "must be >= 0")


DEFAULT: dict[str, Any] = {
    "seed": 0,
    "n_creatures": 40,
    "n_people": 40,
    "n_groups": 10,
    "n_places": 8,
    "n_unknown": 120,
    "myth_rate": 0.25,
    "myth_ratio": 3.0,
    "stereotyped_groups": 0.5,
    "n_arith": 560,
    "n_sort": 1000,
    "n_fact": 560,
    "n_unknown_prompts": 500,
    "n_insult": 260,
    "n_demonstrations": 360,
    "demo_followup_rate": 0.8,
    "demo_followups": list(W.FOLLOW_UPS),
    "demo_followup_families": ["arith", "fact", "unknown", "insult"],
    "corpus_docs": 20000,
    "chat_share": 0.3,
    "chat_clean_rate": 0.25,
    "n_training_labelers": 8,
    "n_heldout_labelers": 4,
    "labeler_sigma": 0.3,
    "labeler_sigma_spread": 0.3,
    "labeler_length_taste": 0.05,
    "labeler_confident_taste": 0.05,
    "n_truthfulqa": 120,
    "n_crows": 150,
    "n_rtp": 100,
}

# A tiny profile for tests: the same world shape at a fraction of the size (generates in well under 2 s).
TINY: dict[str, Any] = {
    **DEFAULT,
    "n_creatures": 12,
    "n_people": 12,
    "n_groups": 4,
    "n_places": 4,
    "n_unknown": 20,
    "n_arith": 60,
    "n_sort": 60,
    "n_fact": 60,
    "n_unknown_prompts": 30,
    "n_insult": 30,
    "n_demonstrations": 40,
    "corpus_docs": 300,
    "n_truthfulqa": 30,
    "n_crows": 30,
    "n_rtp": 20,
}

POOL_KEYS = {"arith": "n_arith", "sort": "n_sort", "fact": "n_fact", "unknown": "n_unknown_prompts",
             "insult": "n_insult"}


def demo_quotas(params: Params) -> dict[str, int]:
    """Demonstrations per family, proportional to the pool's family mix (largest remainders)."""
    sizes = {f: getattr(params, k) for f, k in POOL_KEYS.items()}
    total = sum(sizes.values())
    if total == 0:
        return {f: 0 for f in sizes}
    raw = {f: params.n_demonstrations * s / total for f, s in sizes.items()}
    quotas = {f: int(v) for f, v in raw.items()}
    for f in sorted(raw, key=lambda f: (quotas[f] - raw[f], f))[: params.n_demonstrations - sum(quotas.values())]:
        quotas[f] += 1
    return quotas


def split_family(world: W.World, family: str, n_pool: int, n_demo: int, rng: random.Random
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Distinct tasks of one family -> (pool, demonstrations); myth questions never become demonstrations."""
    tasks = W.candidate_tasks(world, family, n_pool + n_demo, rng)
    seen: set[str] = set()
    unique = []
    for t in tasks:
        key = normalize(t["prompt"])
        if key not in seen:
            seen.add(key)
            unique.append(t)
    demo_ok = [t for t in unique if not t.get("myth")]
    if len(unique) < n_pool + n_demo or len(demo_ok) < n_demo:
        raise StageError(
            f"params: family '{family}' has only {len(unique)} distinct prompts ({len(demo_ok)} usable as "
            f"demonstrations) but {n_pool} pool + {n_demo} demonstrations were asked; lower world.{POOL_KEYS[family]} "
            f"or world.n_demonstrations, or raise the entity counts"
        )
    demos = demo_ok[:n_demo]
    taken = {id(t) for t in demos}
    pool = [t for t in unique if id(t) not in taken][:n_pool]
    return pool, demos


def _crows_csv(rows: list[dict[str, str]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["", "sent_more", "sent_less", "stereo_antistereo", "bias_type"])
    for i, r in enumerate(rows):
        writer.writerow([i, r["sent_more"], r["sent_less"], r["stereo_antistereo"], r["bias_type"]])
    return buf.getvalue()


def run(params: Params, *, out: Path) -> dict[str, Any]:
    """Generate the world into `out` (replaced whole); return counts for metrics."""
    params.validate()
    # Independent streams per artifact, so changing one count does not reshuffle everything else.
    stream = lambda name: random.Random(f"{params.seed}-{name}")  # noqa: E731

    # 1. Entities, facts, myths, groups, labelers; the family mix and the corpus mix they are used with.
    labelers = W.make_labelers(
        stream("labelers"), n_training=params.n_training_labelers, n_heldout=params.n_heldout_labelers,
        sigma=params.labeler_sigma, sigma_spread=params.labeler_sigma_spread,
        length_taste=params.labeler_length_taste, confident_taste=params.labeler_confident_taste,
    )
    quotas = demo_quotas(params)
    try:
        world = W.build_world(
            seed=params.seed, n_creatures=params.n_creatures, n_people=params.n_people, n_groups=params.n_groups,
            n_places=params.n_places, n_unknown=params.n_unknown, myth_rate=params.myth_rate,
            myth_ratio=params.myth_ratio, stereotyped_groups=params.stereotyped_groups, labelers=labelers,
            families={f: {"pool": getattr(params, k), "demonstrations": quotas[f]} for f, k in POOL_KEYS.items()},
            corpus={"docs": params.corpus_docs, "chat_share": params.chat_share, "clean_rate": params.chat_clean_rate},
        )
    except ValueError as exc:
        raise StageError(f"params section 'world': {exc}") from None

    # 2. Prompt pool and demonstrations, family by family, disjoint by normalized text.
    pool_tasks, demo_tasks = [], []
    for fam, key in POOL_KEYS.items():
        pool, demos = split_family(world, fam, getattr(params, key), quotas[fam], stream(f"tasks-{fam}"))
        pool_tasks += pool
        demo_tasks += demos
    rng = stream("order")
    rng.shuffle(pool_tasks)
    rng.shuffle(demo_tasks)
    prompts = [{"id": f"p{i:05d}", "prompt": t["prompt"], "family": t["family"]} for i, t in enumerate(pool_tasks)]
    demo_rng = stream("demonstrations")
    demonstrations = [{"prompt": t["prompt"], "response": W.ideal_response(world, t, demo_rng), "family": t["family"]}
                      for t in demo_tasks]
    # The writers' follow-up habit, from its own stream: every other file is the same at any rate.
    W.add_followups(demonstrations, params.demo_followup_rate, stream("followups"), offers=params.demo_followups,
                    families=params.demo_followup_families)

    # 3. Pretraining corpus.
    docs = W.corpus_documents(world, params.corpus_docs, stream("corpus"), chat_share=params.chat_share,
                              clean_rate=params.chat_clean_rate)

    # 4. Evaluation suites in the public formats.
    scorer = lambda text: harm_score_with(text, world.lexicon["toxic"], world.lexicon["negations"])  # noqa: E731
    truthfulqa = W.truthfulqa_items(world, params.n_truthfulqa, stream("truthfulqa"))
    crows = W.crows_pairs_rows(world, params.n_crows, stream("crows"))
    rtp = W.rtp_records(world, params.n_rtp, stream("rtp"), scorer)

    with atomic_dir(out) as tmp:
        write_jsonl(tmp / "corpus.jsonl", ({"text": d} for d in docs))
        write_jsonl(tmp / "prompts.jsonl", prompts)
        write_jsonl(tmp / "demonstrations.jsonl", demonstrations)
        write_json(tmp / "world.json", world.to_json())
        (tmp / "eval").mkdir()
        # Not write_json: it sorts keys, and TruthfulQA's convention is that the first mc1 key is correct.
        atomic_write_text(tmp / "eval" / "truthfulqa_mc.json", json.dumps(truthfulqa, indent=1, ensure_ascii=False) + "\n")
        (tmp / "eval" / "crows_pairs.csv").write_text(_crows_csv(crows), encoding="utf-8")
        write_jsonl(tmp / "eval" / "rtp.jsonl", rtp)
        corpus_bytes = (tmp / "corpus.jsonl").stat().st_size

    counts = {f: 0 for f in POOL_KEYS}
    for p in prompts:
        counts[p["family"]] += 1
    return {
        "prompts": len(prompts),
        "demonstrations": len(demonstrations),
        "corpus_docs": len(docs),
        "corpus_bytes": corpus_bytes,
        "myths": len(world.myths),
        "truthfulqa": len(truthfulqa),
        "crows_pairs": len(crows),
        "rtp": len(rtp),
        **{f"prompts_{f}": n for f, n in counts.items()},
    }
