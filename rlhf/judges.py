"""Pairwise judges for win rates: who decides, per test prompt, whether model A's answer beats model B's.

Every judge has one method, `compare(prompts, a, b, tag=...) -> Comparison`: per prompt 1.0 when A's
answer is preferred, 0.0 when B's, 0.5 for a tie (InstructGPT, Ouyang et al. 2022, fig. 1), plus the
number of prompts it could not judge. `build_judge(kind, ...)` is the one place the kinds are named
(`JUDGES`); the evaluate stage builds one judge and asks it about every pair.

- `heldout`: the world's held-out labelers (never produced a training ranking; InstructGPT sec. 3.6);
- `labels`: human labels on reports/responses.jsonl (docs/evaluation.md gives the formats);
- `reward`: a reward-model folder, scored through `rlhf.rm.score_texts` like every other stage (the
  demonstration bias included); a PROXY judge when it is the model PPO optimized (Gao et al. 2022).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf.errors import StageError
from rlhf.io import read_jsonl


# Each judge also carries `description` (the report's Settings line) and `who` (the verdict's subject and
# verb: "held-out labelers prefer" [it 0.58 ...]).


@dataclass(frozen=True)
class Comparison:
    outcomes: list[float]
    """Per judged prompt: 1.0 A preferred, 0.0 B preferred, 0.5 tie."""
    unjudged: int = 0
    """Prompts left out (e.g. no human label for that pair of answers)."""


# ----------------------------------------------------------------------------------------------
# The decisions, as pure functions (tested one by one)


def judge_heldout(pool: list, prompts: Sequence[str], a: Sequence[str], b: Sequence[str], *, seed: int,
                  tag: str) -> list[float]:
    """One held-out labeler per prompt, drawn at random; the two answers are shown in random order so a
    labeler's position habits cannot favour either model. Identical answers tie without asking."""
    rng = random.Random(f"evaluate:{seed}:{tag}")
    out = []
    for p, x, y in zip(prompts, a, b, strict=True):
        labeler = rng.choice(pool)
        if rng.random() < 0.5:
            out.append(labeler.prefer(p, x, y, rng))
        else:
            out.append(1.0 - labeler.prefer(p, y, x, rng))
    return out


def judge_scores(score_a: Sequence[float], score_b: Sequence[float]) -> list[float]:
    """Outcomes from per-answer scores (a reward model, the gold judge): higher wins, equal ties."""
    return [1.0 if x > y else 0.0 if y > x else 0.5 for x, y in zip(score_a, score_b, strict=True)]


def read_human_labels(path: str | Path) -> dict[tuple[str, str, str], float]:
    """Human labels on test responses -> {(prompt, answer_1, answer_2): outcome for answer_1}.

    Accepted records (JSONL, one per line; docs/evaluation.md):
    - rankings, as `rlhf label` writes them: {"prompt", "responses": [...], "ranking": [best first], ...};
      every pair of listed responses becomes one comparison;
    - pairwise: {"prompt", "chosen", "rejected"} with optional "tie": true.
    """
    out: dict[tuple[str, str, str], float] = {}
    for i, rec in enumerate(read_jsonl(path), start=1):
        where = f"{path}:{i}"
        prompt = rec.get("prompt")
        if not isinstance(prompt, str):
            raise StageError(f"{where}: missing 'prompt' string")
        if "ranking" in rec:
            responses, ranking = rec.get("responses"), rec["ranking"]
            if not isinstance(responses, list) or sorted(ranking) != list(range(len(responses))):
                raise StageError(f"{where}: 'ranking' must be a permutation of the indices of 'responses'")
            place = {r: pos for pos, r in enumerate(ranking)}
            tie = {r: n for n, group in enumerate(rec.get("ties") or []) for r in group}  # declared ties score 0.5
            for i_a, x in enumerate(responses):
                for i_b, y in enumerate(responses):
                    if x != y:
                        tied = i_a in tie and tie[i_a] == tie.get(i_b)
                        out[(prompt, x, y)] = 0.5 if tied else 1.0 if place[i_a] < place[i_b] else 0.0
        elif "chosen" in rec and "rejected" in rec:
            x, y = rec["chosen"], rec["rejected"]
            v = 0.5 if rec.get("tie") else 1.0
            out[(prompt, x, y)], out[(prompt, y, x)] = v, 1.0 - v
        else:
            raise StageError(f"{where}: expected a ranking record (responses, ranking) or a pairwise one (chosen, rejected)")
    return out


def judge_labels(labels: dict[tuple[str, str, str], float], prompts: Sequence[str], a: Sequence[str],
                 b: Sequence[str]) -> tuple[list[float], int]:
    """Outcomes of the prompts whose two answers were labeled (identical answers tie); and how many were not."""
    out, missing = [], 0
    for p, x, y in zip(prompts, a, b, strict=True):
        if x == y:
            out.append(0.5)
        elif (p, x, y) in labels:
            out.append(labels[(p, x, y)])
        else:
            missing += 1
    return out, missing


# ----------------------------------------------------------------------------------------------
# The judges


@dataclass
class HeldoutJudge:
    pool: list
    seed: int
    description: str = ""
    who: str = "held-out labelers prefer"

    def compare(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str], *, tag: str = "") -> Comparison:
        return Comparison(judge_heldout(self.pool, prompts, a, b, seed=self.seed, tag=tag))


@dataclass
class LabelsJudge:
    labels: dict[tuple[str, str, str], float]
    description: str = ""
    who: str = "human labelers prefer"

    def compare(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str], *, tag: str = "") -> Comparison:
        outcomes, missing = judge_labels(self.labels, prompts, a, b)
        return Comparison(outcomes, missing)


@dataclass
class RewardJudge:
    """Scores each (prompt, answer) once with `score(prompts, answers)`; the higher reward wins."""

    score: Callable[[Sequence[str], Sequence[str]], list[float]]
    description: str = ""
    who: str = "the reward model (a proxy judge) prefers"
    _cache: dict[tuple[str, str], float] = field(default_factory=dict, repr=False)

    def rewards(self, prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
        todo = list(dict.fromkeys((p, r) for p, r in zip(prompts, answers, strict=True) if (p, r) not in self._cache))
        if todo:
            self._cache.update(zip(todo, self.score([p for p, _ in todo], [r for _, r in todo]), strict=True))
        return [self._cache[(p, r)] for p, r in zip(prompts, answers)]

    def compare(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str], *, tag: str = "") -> Comparison:
        return Comparison(judge_scores(self.rewards(prompts, a), self.rewards(prompts, b)))


def reward_model_scorer(path: str | Path, *, batch_size: int, device) -> Callable[[Sequence[str], Sequence[str]], list[float]]:
    """`score(prompts, answers)` with the reward-model folder `path`, through the RM scoring path every stage
    uses (`rlhf.rm.score_texts`: scalar at the EOS, plus the demonstration bias of docs/ppo.md item 3)."""
    from rlhf.models import check_model_dir, load_reward_model, load_tokenizer
    from rlhf.rm import score_texts

    check_model_dir(path, "reward model (evaluate.reward_model)")
    tokenizer = load_tokenizer(path)
    model = load_reward_model(path).to(device).eval()
    max_len = getattr(model.config, "max_position_embeddings", None) or 10**9
    return lambda prompts, answers: score_texts(model, tokenizer, prompts, answers, max_len=max_len,
                                                batch_size=batch_size, device=device)


def _heldout(*, gold, world, seed: int, **_: Any) -> HeldoutJudge:
    if gold is None:
        raise StageError(f"{world}: no world file, so there are no held-out labelers; set evaluate.judge "
                         "to 'labels' (human labels) or 'reward' (a reward-model folder)")
    from rlhf.judge import heldout_pool

    pool = heldout_pool(gold)
    return HeldoutJudge(pool, seed, f"held-out labelers of the world ({len(pool)}; one drawn per prompt)")


def _labels(*, labels: str, **_: Any) -> LabelsJudge:
    return LabelsJudge(read_human_labels(labels), f"human labels ({labels})")


def _reward(*, reward_model: str, batch_size: int, device, **_: Any) -> RewardJudge:
    return RewardJudge(reward_model_scorer(reward_model, batch_size=batch_size, device=device),
                       f"reward model {reward_model} (a PROXY judge: the model PPO optimized, if it is the same)")


# kind -> factory; adding a judge is one entry here (and its name is then valid in evaluate.judge).
JUDGES: dict[str, Callable[..., Any]] = {"heldout": _heldout, "labels": _labels, "reward": _reward}


def build_judge(kind: str, **context: Any):
    """The judge named `kind`; `context` holds what factories may need: gold, world, seed, labels,
    reward_model, batch_size, device."""
    if kind not in JUDGES:
        raise StageError(f"evaluate.judge: '{kind}' is not a judge; use one of {', '.join(JUDGES)}")
    return JUDGES[kind](**context)
