"""Preference data: comparison groups from rankings, pairwise or HH-RLHF files, the held-out split by prompt,
and how well a scorer (a reward model, DPO's implicit reward) agrees with the labels and the gold judge.

Used by the reward and dpo stages, so that both read the same comparisons and hold out the same prompts.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from rlhf.errors import StageError
from rlhf.io import PAIRWISE_SCHEMA, RANKING_SCHEMA, read_jsonl


def load_groups(path: Path, data_format: str, *, max_malformed_share: float | None = None) -> list[dict[str, Any]]:
    """Comparison groups {prompt, responses, pairs, ranking?, labeler?} from a file of any accepted format.

    Malformed HH records (e.g. an empty final assistant turn) are skipped with one warning line, up to a
    share `max_malformed_share` of the file (default rlhf.sources.MAX_MALFORMED_SHARE); above it, a StageError."""
    return read_groups(path, data_format, max_malformed_share=max_malformed_share)[0]


def read_groups(path: Path, data_format: str, *, max_malformed_share: float | None = None,
                key: str = "rlhf.sources.MAX_MALFORMED_SHARE") -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(groups as `load_groups` returns them, {records, skipped, skipped_by_reason}) for the stage's metrics;
    `key` names the limit in the error (the stage's params key, e.g. reward.max_malformed_share)."""
    from rlhf.rm import ranking_pairs, validate_ranking_record
    from rlhf.sources import MAX_MALFORMED_SHARE, Tally, to_examples

    path = Path(path)
    groups = []
    tally = Tally(str(path), MAX_MALFORMED_SHARE if max_malformed_share is None else max_malformed_share)
    if data_format == "rankings":
        for lineno, r in enumerate(read_jsonl(path, RANKING_SCHEMA), start=1):
            validate_ranking_record(r, f"{path}:{lineno}")
            tally.records += 1
            # among distinct texts (a duplicate counts once, at its best rank); declared ties give no pair
            pairs = ranking_pairs(r["ranking"], r.get("ties"), responses=r["responses"])
            if pairs:
                groups.append({"prompt": r["prompt"], "responses": list(r["responses"]), "pairs": pairs,
                               "ranking": list(r["ranking"]), "labeler": r["labeler"]})
    elif data_format == "pairwise":
        for r in read_jsonl(path, PAIRWISE_SCHEMA):
            tally.records += 1
            if r["chosen"] != r["rejected"]:
                groups.append({"prompt": r["prompt"], "responses": [r["chosen"], r["rejected"]], "pairs": [(0, 1)]})
    elif data_format == "hh":
        # Broken JSON stops the stage (a damaged file); a record that parses but is no transcript pair is skipped.
        for ex in to_examples(read_jsonl(path), "hh", tally):
            if ex.prefers:
                groups.append({"prompt": ex.prompt, "responses": list(ex.responses), "pairs": [(0, 1)]})
    else:
        raise StageError(f"params key 'reward.data_format': unknown format {data_format!r}")
    tally.check(key)
    if not groups:
        raise StageError(f"{path}: no comparisons with two different responses; nothing to train on")
    return groups, tally.metrics()


def prompt_unit(prompt: str, salt: str) -> float:
    """A uniform number in [0, 1) fixed by the normalized prompt and `salt`: one prompt, one side of a split."""
    from rlhf.text import normalize

    h = hashlib.sha256(f"{salt}:{normalize(prompt)}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def is_heldout(prompt: str, fraction: float, seed: int) -> bool:
    """Split by a hash of the normalized prompt: all rankings of one prompt land on the same side."""
    return prompt_unit(prompt, f"reward-split-{seed}") < fraction


def split_heldout(groups: list[dict[str, Any]], fraction: float, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training, held-out) comparison groups, each in the order given, split by prompt (`is_heldout`).

    The one held-out split of the preference stages: reward and dpo hold out the same prompts with the
    same `val_fraction` and seed, so their held-out accuracies are measured on the same comparisons."""
    heldout = [is_heldout(g["prompt"], fraction, seed) for g in groups]
    return [g for g, h in zip(groups, heldout) if not h], [g for g, h in zip(groups, heldout) if h]


def heldout_summary(m: dict[str, Any], gold_note: str = "") -> str:
    """The start of reward's and dpo's CLI line from their metrics: steps, held-out accuracy against the
    labels and, with a world, against gold (followed by `gold_note`)."""
    h = m["heldout"]
    text = f"{m['train']['steps']} steps; held-out accuracy {h['accuracy_labels']:.1%} vs labels"
    if h.get("accuracy_gold") is not None:
        text += f", {h['accuracy_gold']:.1%} vs gold{gold_note}"
    return text


def heldout_metrics(groups: list[dict[str, Any]], scores: list[list[float]], gold: list[list[float]] | None) -> dict[str, Any]:
    """Pairwise accuracy against the labels (and the gold judge), Spearman with gold, labelers vs gold."""
    from rlhf.agreement import pairs_gold_agreement, rate, score_agreement, spearman

    hits = n = 0.0
    for g, s in zip(groups, scores):
        for w, l in g["pairs"]:
            n += 1
            hits += 0.5 if s[w] == s[l] else float(s[w] > s[l])
    out: dict[str, Any] = {"pairs": int(n), "accuracy_labels": rate(hits, n)}
    if gold is None:
        return out
    # Gold statistics per distinct prompt (overlapping labelers share one prompt's responses).
    seen: set[str] = set()
    g_hits = g_n = 0.0
    lab_hits = lab_n = 0
    rhos, pooled_s, pooled_g = [], [], []
    for g, s, gs in zip(groups, scores, gold):
        if "ranking" in g:
            a, t = pairs_gold_agreement(g["pairs"], gs)  # the labels' own pairs, as `rank` measures them
            lab_hits, lab_n = lab_hits + a, lab_n + t
        key = g["prompt"] + "\x00" + "\x00".join(g["responses"])
        if key in seen:
            continue
        seen.add(key)
        a, t = score_agreement(s, gs)
        g_hits, g_n = g_hits + a, g_n + t
        rho = spearman(s, gs)
        if rho is not None:
            rhos.append(rho)
        pooled_s.extend(s)
        pooled_g.extend(gs)
    out["gold_pairs"] = int(g_n)
    out["accuracy_gold"] = rate(g_hits, g_n)
    out["spearman_gold_within_prompt"] = round(sum(rhos) / len(rhos), 4) if rhos else None
    pooled = spearman(pooled_s, pooled_g)
    out["spearman_gold_pooled"] = round(pooled, 4) if pooled is not None else None
    if lab_n:
        # The bar the RM is measured against: how often the labels themselves agree with gold here.
        out["labels_gold_agreement"] = rate(lab_hits, lab_n)
    return out
