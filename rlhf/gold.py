"""Scoring model responses with the world's gold judge (the default world only).

The gold judge is the hidden truth of the default world: stages use it to report how good responses
really are (never to train on). With user data there is no gold judge and these numbers are skipped.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.judge import AXES, GoldJudge


def load_judge(world: Path | None):
    """The gold judge of `world` (data/raw/world.json), or None when the data has no world file."""
    if world is None or not Path(world).is_file():
        return None
    return GoldJudge.from_file(world)


def summarize(judge, prompts: list[str], responses: list[str]) -> dict[str, Any]:
    """Mean gold score per axis, and the mean total per task family."""
    sums: dict[str, float] = defaultdict(float)
    fam_sum: dict[str, float] = defaultdict(float)
    fam_n: dict[str, int] = defaultdict(int)
    for p, r in zip(prompts, responses, strict=True):
        s = judge.score(p, r)
        for axis in AXES:
            sums[axis] += s[axis]
        fam = judge.family(p)
        fam_sum[fam] += s["total"]
        fam_n[fam] += 1
    n = max(1, len(prompts))
    out: dict[str, Any] = {axis: round(sums[axis] / n, 4) for axis in AXES}
    out["by_family"] = {f: round(fam_sum[f] / fam_n[f], 4) for f in sorted(fam_n)}
    return out


@dataclass(frozen=True)
class TestAnswers:
    """A model's answers to held-out test prompts and what the gold judge makes of them."""

    responses: list[str]
    ended: list[bool]
    gold: dict[str, Any] | None
    """`summarize` of the responses; None without a gold judge (user data)."""

    @property
    def ended_share(self) -> float:
        """Share of responses that stopped with EOS, rounded as the metrics files report it."""
        return round(sum(self.ended) / len(self.ended), 4)


def answer_test_prompts(model, tokenizer, prompts: list[str], judge, *, max_new_tokens: int, device,
                        temperature: float = 0.0, batch_size: int = 64, seed: int = 0) -> TestAnswers:
    """Responses of `model` to `prompts` (greedy by default: one reproducible answer per prompt), scored by
    the gold judge when there is one. The one path by which a stage reports "how good are the answers"."""
    from rlhf.sampling import generate_responses

    gen = generate_responses(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                             batch_size=batch_size, seed=seed, device=device)
    responses = [g["response"] for g in gen]
    return TestAnswers(responses=responses, ended=[bool(g["ended"]) for g in gen],
                       gold=summarize(judge, prompts, responses) if judge is not None else None)


def gold_compare(models: dict[str, Any], tokenizer, prompts: list[str], judge, *, max_new_tokens: int, device) -> dict[str, Any]:
    """Greedy responses of each model on `prompts`, scored by the gold judge: the `test` section of a training
    stage's metrics, laid out as ppo.json's (`test.<model>.gold.total`), with the token limit beside the EOS
    share (a share of answers that end with EOS means little without the limit they had)."""
    out: dict[str, Any] = {"prompts": len(prompts), "max_new_tokens": max_new_tokens}
    for name, model in models.items():
        answers = answer_test_prompts(model, tokenizer, prompts, judge, max_new_tokens=max_new_tokens, device=device)
        out[name] = {"gold": answers.gold, "ended_with_eos": answers.ended_share}
    return out
