"""rank: turn candidates into full rankings (best first), by simulated labelers or from human labels.

Reads  data/samples/candidates.jsonl, data/raw/world.json (simulated labelers, gold judge),
       labels/human.jsonl (rank.source: human, written by `rlhf label`)
Writes data/rankings/rankings.jsonl, metrics/rank.json
Run    rlhf rank

Rankings format, one record per (prompt, labeler):
  {"prompt_id", "prompt", "responses": [K strings], "ranking": [indices, best first], "labeler"}

Simulated (default): each prompt is ranked by one labeler drawn from the world's training pool; a
share of prompts (`overlap_share`) is ranked by `overlap_labelers` distinct labelers, as InstructGPT
measured inter-annotator agreement on a shared subset (Ouyang et al. 2022, sec. 5.1: ~73% between
training labelers). Every labeler's ranking is kept as its own record; the reward stage splits
train/validation by prompt, so overlapping records never straddle the split.

Agreement is pairwise: over all pairs of responses with different text, the share ordered the same
way by two labelers (inter-labeler), or as the gold judge orders them (gold ties skipped).
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any, Literal

from rlhf.agreement import gold_agreement, pair_agreement, rate
from rlhf.errors import StageError
from rlhf.io import RANKING_SCHEMA, read_jsonl, write_jsonl, write_metrics
from rlhf.params import require

HUMAN_HINT = "label them with `rlhf label --labeler NAME`, or set rank.source: simulated"


@dataclass(frozen=True)
class Params:
    source: Literal["simulated", "human"]
    """'simulated': the world's training labelers rank; 'human': rankings come from `rlhf label`."""
    overlap_share: float
    """Share of prompts ranked by several labelers, to measure inter-labeler agreement (simulated only)."""
    overlap_labelers: int
    """Labelers per overlapping prompt (>= 2, at most the training pool's size)."""
    seed: int
    """Seed of labeler assignment and labeler noise: the same seed gives the same rankings."""

    def validate(self) -> None:
        require(0.0 <= self.overlap_share <= 1.0, "rank.overlap_share", "must be in [0, 1]")
        require(self.overlap_labelers >= 2, "rank.overlap_labelers", "must be >= 2")


# ----------------------------------------------------------------------------------------------
# Pure helpers


def agreement_stats(records: list[dict[str, Any]], gold: dict[str, list[float]] | None) -> dict[str, Any]:
    """Pairwise inter-labeler agreement (prompts with several labelers) and agreement with the gold judge.

    `gold` maps prompt_id -> gold total of each response (None without a world). Pairs of identical
    responses are skipped everywhere; gold ties are skipped for gold agreement (rlhf/agreement.py).
    """
    by_prompt: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_prompt[r["prompt_id"]].append(r)
    inter = [0, 0]
    per_labeler: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for recs in by_prompt.values():
        responses = recs[0]["responses"]
        for a, b in combinations(recs, 2):
            hits, total = pair_agreement(a["ranking"], b["ranking"], responses)
            inter[0], inter[1] = inter[0] + hits, inter[1] + total
        if gold is not None:
            for r in recs:
                hits, total = gold_agreement(r["ranking"], gold[r["prompt_id"]], responses)
                cell = per_labeler[r["labeler"]]
                cell[0], cell[1] = cell[0] + hits, cell[1] + total
    out: dict[str, Any] = {
        "overlap_prompts": sum(len(v) > 1 for v in by_prompt.values()),
        "inter_labeler_pairs": inter[1],
        "inter_labeler_agreement": rate(*inter),
    }
    if gold is not None:
        hits, total = sum(c[0] for c in per_labeler.values()), sum(c[1] for c in per_labeler.values())
        out["gold_pairs"] = total
        out["labeler_gold_agreement"] = rate(hits, total)
        out["labeler_gold_agreement_by_labeler"] = {n: rate(*c) for n, c in sorted(per_labeler.items()) if c[1]}
    return out


def assign_labelers(prompt_ids: list[str], names: list[str], overlap_share: float, overlap_labelers: int,
                    seed: int) -> dict[str, list[str]]:
    """Labelers of each prompt: one drawn at random; `overlap_labelers` distinct ones for a seeded
    `overlap_share` of the prompts. Depends only on (seed, prompt_id), not on file order."""
    if overlap_share > 0 and overlap_labelers > len(names):
        raise StageError(f"params key 'rank.overlap_labelers': {overlap_labelers} labelers per overlapping "
                         f"prompt, but the training pool has only {len(names)}")
    out = {}
    for pid in prompt_ids:
        rng = random.Random(f"assign-{seed}-{pid}")
        n = overlap_labelers if rng.random() < overlap_share else 1
        out[pid] = rng.sample(names, n)
    return out


def simulated_rankings(candidates: list[dict[str, Any]], pool, params: Params) -> list[dict[str, Any]]:
    by_name = {lab.name: lab for lab in pool}
    who = assign_labelers([c["prompt_id"] for c in candidates], list(by_name), params.overlap_share,
                          params.overlap_labelers, params.seed)
    records = []
    for c in candidates:
        for name in who[c["prompt_id"]]:
            # Each (labeler, prompt) draws its own noise: reproducible and independent of file order.
            rng = random.Random(f"rank-{params.seed}-{name}-{c['prompt_id']}")
            ranking = by_name[name].rank(c["prompt"], list(c["responses"]), rng)
            records.append({"prompt_id": c["prompt_id"], "prompt": c["prompt"], "responses": list(c["responses"]),
                            "ranking": list(ranking), "labeler": name})
    return records


def human_rankings(candidates: list[dict[str, Any]], labels_path: Path) -> tuple[list[dict[str, Any]], int]:
    """Human labels matched to the candidates; every candidate prompt must be labeled.

    Returns (records in candidates order, number of label records for prompts no longer sampled).
    """
    from rlhf.rm import validate_ranking_record

    if not Path(labels_path).is_file():
        raise StageError(f"{labels_path}: no human labels yet; {HUMAN_HINT}")
    labels = read_jsonl(labels_path, RANKING_SCHEMA)
    cand = {c["prompt_id"]: c for c in candidates}
    by_prompt: dict[str, list[dict[str, Any]]] = defaultdict(list)
    stale = 0
    for lineno, r in enumerate(labels, start=1):
        where = f"{labels_path}:{lineno}"
        validate_ranking_record(r, where)
        c = cand.get(r["prompt_id"])
        if c is None:
            stale += 1
            continue
        if list(r["responses"]) != list(c["responses"]):
            raise StageError(f"{where}: prompt '{r['prompt_id']}' was labeled on other responses than the current "
                             "candidates (they were resampled); remove its labels and label it again")
        by_prompt[r["prompt_id"]].append(r)
    missing = [pid for pid in cand if pid not in by_prompt]
    if missing:
        shown = ", ".join(missing[:10]) + (f", … ({len(missing) - 10} more)" if len(missing) > 10 else "")
        raise StageError(f"{labels_path}: {len(missing)} of {len(cand)} candidate prompts have no human ranking "
                         f"({shown}); {HUMAN_HINT}, or sample fewer prompts (sample.prompts)")
    records = [r for pid in cand for r in by_prompt[pid]]
    return records, stale


def merge_duplicates(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """Records whose ranking orders each distinct text once (`rlhf.rm.merge_duplicate_ranks`), and how many changed.

    A response sampled twice and ranked apart by a (noisy) labeler, X > Y > X', would otherwise say
    both X > Y and Y > X; each copy now follows its best-ranked copy.
    """
    from rlhf.rm import merge_duplicate_ranks

    out, changed = [], 0
    for r in records:
        merged = merge_duplicate_ranks(r["ranking"], r["responses"])
        changed += merged != list(r["ranking"])
        out.append({**r, "ranking": merged})
    return out, changed


def run(params: Params, *, candidates: Path, world: Path | None, labels: Path, out: Path, metrics: Path) -> dict[str, Any]:
    from rlhf.gold import load_judge
    from rlhf.rm import read_candidates

    t0 = time.time()
    cands = read_candidates(candidates)
    judge = load_judge(world)
    result: dict[str, Any] = {"source": params.source, "prompts": len(cands)}
    if params.source == "simulated":
        if judge is None:
            raise StageError(f"{world}: rank.source=simulated needs the world's labelers (world.json); "
                             "with your own data set rank.source: human and label with `rlhf label`")
        from rlhf.judge import training_pool

        pool = training_pool(judge)
        records = simulated_rankings(cands, pool, params)
        result["pool"] = len(pool)
    else:
        records, stale = human_rankings(cands, labels)
        result["stale_labels_ignored"] = stale
    records, result["rankings_with_duplicates_merged"] = merge_duplicates(records)
    write_jsonl(out, records)

    gold = None
    if judge is not None:
        gold = {c["prompt_id"]: [judge.score(c["prompt"], r)["total"] for r in c["responses"]] for c in cands}
    result["records"] = len(records)
    result["labelers"] = len({r["labeler"] for r in records})
    result.update(agreement_stats(records, gold))
    write_metrics(metrics, result, settings=["source"])  # rank.source is a setting, not a measurement
    result["timing"] = {"wall_s": round(time.time() - t0, 1)}
    return result


def summary(m: dict[str, Any]) -> str:
    text = f"{m['records']} rankings of {m['prompts']} prompts by {m['labelers']} {m['source']} labelers"
    if m.get("inter_labeler_agreement") is not None:
        text += f", inter-labeler agreement {m['inter_labeler_agreement']:.1%}"
    if m.get("labeler_gold_agreement") is not None:
        text += f", agreement with gold {m['labeler_gold_agreement']:.1%}"
    return text + f" ({m['timing']['wall_s']} s)"
