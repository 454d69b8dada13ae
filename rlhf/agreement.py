"""Pairwise agreement between rankings, gold scores and model scores; Spearman's rank correlation.

One definition for every stage that reports agreement (tests/test_rm.py): `rank` (labeler vs labeler,
labeler vs gold), `reward` (RM vs labels, RM vs gold), and the world's labeler calibration
(`rlhf.judge.measure_agreement`). Agreement is counted over pairs of responses: two responses with the
same text carry no preference and are skipped wherever the texts are given; pairs the reference ties
(gold scores equal within `eps`) are skipped too. Pure Python: no torch, so `rank` stays light.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import combinations

TIE_EPS = 1e-9  # gold scores are rounded to 6 decimals, so this only merges exact ties


def ranking_from_scores(scores: Sequence[float]) -> list[int]:
    """Indices best first by descending score; equal scores keep index order."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def compared_pairs(k: int, responses: Sequence[str] | None = None) -> list[tuple[int, int]]:
    """Index pairs (i < j) among K responses, without pairs of identical text when `responses` is given."""
    return [(i, j) for i, j in combinations(range(k), 2) if responses is None or responses[i] != responses[j]]


def _positions(ranking: Sequence[int]) -> dict[int, int]:
    return {r: place for place, r in enumerate(ranking)}


def pair_agreement(a: Sequence[int], b: Sequence[int], responses: Sequence[str] | None = None) -> tuple[int, int]:
    """(pairs both rankings order the same way, pairs compared) between two full rankings of K responses."""
    pos_a, pos_b = _positions(a), _positions(b)
    agree = total = 0
    for i, j in compared_pairs(len(a), responses):
        total += 1
        agree += (pos_a[i] < pos_a[j]) == (pos_b[i] < pos_b[j])
    return agree, total


def pairs_gold_agreement(pairs: Sequence[tuple[int, int]], gold: Sequence[float],
                         eps: float = TIE_EPS) -> tuple[int, int]:
    """(pairs whose winner gold also scores higher, pairs gold does not tie) over (winner, loser) pairs."""
    decided = [(w, l) for w, l in pairs if abs(gold[w] - gold[l]) > eps]
    return sum(gold[w] > gold[l] for w, l in decided), len(decided)


def gold_agreement(ranking: Sequence[int], gold: Sequence[float], responses: Sequence[str] | None = None,
                   eps: float = TIE_EPS) -> tuple[int, int]:
    """(pairs `ranking` orders as the gold scores do, pairs compared); gold ties are skipped."""
    pos = _positions(ranking)
    pairs = [(i, j) if pos[i] < pos[j] else (j, i) for i, j in compared_pairs(len(gold), responses)]
    return pairs_gold_agreement(pairs, gold, eps)


def score_agreement(scores: Sequence[float], ref: Sequence[float], eps: float = TIE_EPS) -> tuple[float, int]:
    """(agreeing pairs, pairs) between model scores and reference scores; reference ties are skipped,
    a model tie counts 1/2."""
    agree, total = 0.0, 0
    for i, j in compared_pairs(len(ref)):
        if abs(ref[i] - ref[j]) <= eps:
            continue
        total += 1
        d = scores[i] - scores[j]
        agree += 0.5 if d == 0 else float((d > 0) == (ref[i] > ref[j]))
    return agree, total


def rate(hits: float, total: int, digits: int = 4) -> float | None:
    """hits / total rounded, or None when nothing was compared."""
    return round(hits / total, digits) if total else None


def _ranks(x: Sequence[float]) -> list[float]:
    """1-based ranks, ties get their average rank (as scipy.stats.rankdata)."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    ranks = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for t in range(i, j + 1):
            ranks[order[t]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (Pearson on average ranks); None when either side is constant."""
    if len(x) != len(y) or len(x) < 2:
        return None
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    if vx == 0 or vy == 0:
        return None
    return cov / math.sqrt(vx * vy)
