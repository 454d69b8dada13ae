"""Reward-model helpers: candidates and ranking validation, the K-way ranking loss, HH-RLHF parsing, scoring.

Pure functions, unit-tested against naive references (tests/test_rm.py); agreement statistics live in
rlhf/agreement.py. Used by the `rank`, `reward` and `label` commands, and by anything that scores
(prompt, response) with the RM (PPO, evaluation): go through `score_texts` / `rewards_from_ids`, which
read the scalar at the last real token and apply the demonstration bias stored in the model's config.

The demonstration bias (docs/ppo.md item 3). InstructGPT shifts the trained RM so the labelers'
demonstrations score 0 on average. A Llama-style `*ForSequenceClassification` head is a bias-free
linear map applied after the final RMSNorm, so a constant cannot be folded into the weights exactly.
The shift is therefore stored as a plain config attribute, `reward_bias` (config.json). Any
`AutoModelForSequenceClassification.from_pretrained` loads the folder unchanged (its logits are the
raw, uncentered reward; rankings and pairwise accuracies are unaffected by a constant), and
`reward = logits + config.reward_bias` is the centered reward, as computed by `apply_reward_bias`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf.errors import StageError
from rlhf.io import read_jsonl

REWARD_BIAS_KEY = "reward_bias"

if TYPE_CHECKING:  # torch is imported inside functions so `rlhf label` starts instantly
    import torch


# ----------------------------------------------------------------------------------------------
# Rankings


CANDIDATES_SCHEMA = {"prompt_id": (str, True), "prompt": (str, True), "responses": (list, True), "ended": (list, True)}


def read_candidates(path: Path, k: int | None = None) -> list[dict[str, Any]]:
    """Candidates records (written by `rlhf sample`), validated: K responses each (equal to `k` when
    given), K ended flags, prompt ids unique."""
    records = read_jsonl(path, CANDIDATES_SCHEMA)
    seen: set[str] = set()
    for lineno, r in enumerate(records, start=1):
        where = f"{path}:{lineno}"
        n = len(r["responses"])
        if n < 2 or not all(isinstance(x, str) for x in r["responses"]):
            raise StageError(f"{where}: 'responses' must be a list of at least 2 strings")
        if k is not None and n != k:
            raise StageError(f"{where}: {n} responses, expected {k}; rerun `rlhf sample`")
        if len(r["ended"]) != n or not all(isinstance(x, bool) for x in r["ended"]):
            raise StageError(f"{where}: 'ended' must hold one true/false per response")
        if r["prompt_id"] in seen:
            raise StageError(f"{where}: prompt_id '{r['prompt_id']}' appears twice")
        seen.add(r["prompt_id"])
    return records


def validate_ranking(ranking: Any, k: int, where: str = "ranking") -> list[int]:
    """`ranking` as a list of response indices, best first; must be a permutation of 0..k-1.

    Ties are declared beside it, in a record's optional `ties` field (`validate_ties`).
    """
    if not isinstance(ranking, (list, tuple)):
        raise StageError(f"{where}: ranking must be a list of response indices, got {type(ranking).__name__}")
    if any(isinstance(i, bool) or not isinstance(i, int) for i in ranking):
        raise StageError(f"{where}: ranking must hold integer indices, got {list(ranking)!r}")
    if len(ranking) != k:
        raise StageError(f"{where}: ranking has {len(ranking)} entries but there are {k} responses; rank all of them")
    seen = set()
    for i in ranking:
        if i in seen:
            raise StageError(f"{where}: response {i} appears twice in ranking {list(ranking)}; each must appear once")
        seen.add(i)
    if seen != set(range(k)):
        bad = sorted(seen - set(range(k)))
        raise StageError(f"{where}: ranking {list(ranking)} is not a permutation of 0..{k - 1} (bad index {bad[0]})")
    return list(ranking)


def validate_ties(ties: Any, ranking: Sequence[int], where: str = "ties") -> list[list[int]]:
    """Declared ties: groups of response indices a labeler judged equally good (docs/formats.md).

    Each group has at least 2 indices, no index is in two groups, and a group's members stand next
    to each other in `ranking`. Pairs inside a group are no preference (`ranking_pairs`).
    """
    if not isinstance(ties, list) or not all(
            isinstance(g, list) and len(g) >= 2 and all(isinstance(i, int) and not isinstance(i, bool) for i in g)
            for g in ties):
        raise StageError(f"{where}: 'ties' must be a list of groups of at least 2 response indices, e.g. [[0, 4]]")
    place = {r: p for p, r in enumerate(ranking)}
    seen: set[int] = set()
    for g in ties:
        unknown = [i for i in g if i not in place]
        if unknown:
            raise StageError(f"{where}: tie group {g} names response {unknown[0]}, which is not in ranking {list(ranking)}")
        twice = [i for i in g if i in seen or g.count(i) > 1]
        if twice:
            raise StageError(f"{where}: response {twice[0]} is in two tie groups; merge them into one")
        seen.update(g)
        spots = sorted(place[i] for i in g)
        if spots[-1] - spots[0] != len(g) - 1:
            raise StageError(f"{where}: tied responses {g} are not next to each other in ranking {list(ranking)}; "
                             "list tied responses together")
    return ties


def validate_ranking_record(record: dict[str, Any], where: str) -> dict[str, Any]:
    """A rankings-format record whose `ranking` is a permutation of its `responses` (K >= 2), ties declared in `ties`."""
    responses = record["responses"]
    if len(responses) < 2 or not all(isinstance(r, str) for r in responses):
        raise StageError(f"{where}: 'responses' must be a list of at least 2 strings")
    validate_ranking(record["ranking"], len(responses), where)
    if "ties" in record:
        validate_ties(record["ties"], record["ranking"], where)
    return record


def parse_ranking_text(text: str, k: int) -> tuple[list[int], list[list[int]]]:
    """A typed ranking such as '2>1>4>3', or with declared ties '1=4>3>2' (1-based, best first).

    Returns (the ranking as 0-based indices, best first; the tie groups as 0-based indices, in ranking
    order). Spaces or commas also separate ranks ('2 1 4 3'). Raises StageError with a message a
    labeler can act on.
    """
    example = ">".join(str(i) for i in range(1, k + 1))
    tiers = [t.split("=") for t in re.split(r"[>\s,]+", re.sub(r"\s*=\s*", "=", text.strip())) if t]
    if not tiers:
        raise StageError(f"empty ranking; type e.g. {example}")
    tokens = [t for tier in tiers for t in tier]
    if not all(t.isdigit() for t in tokens):
        raise StageError(f"'{text.strip()}' is not a ranking; use numbers 1..{k} separated by '>' ('=' for a tie)")
    nums = [int(t) for t in tokens]
    out_of_range = [n for n in nums if not 1 <= n <= k]
    if out_of_range:
        raise StageError(f"response {out_of_range[0]} does not exist; use numbers 1..{k}")
    dup = [n for n in nums if nums.count(n) > 1]
    if dup:
        raise StageError(f"response {dup[0]} appears twice; each response must appear once")
    if len(nums) != k:
        missing = sorted(set(range(1, k + 1)) - set(nums))
        raise StageError(f"rank all {k} responses; missing {', '.join(map(str, missing))}")
    return [n - 1 for n in nums], [[int(t) - 1 for t in tier] for tier in tiers if len(tier) > 1]


def distinct_ranking(responses: Sequence[str], ranking: Sequence[int]) -> list[int]:
    """The ranking with repeated response texts dropped, each text kept at its best place.

    Two identical responses score alike under any model, so a labeler's order between them is no
    preference; `ranking_pairs` and DPO's Plackett-Luce ranking take distinct texts only.
    """
    seen: set[str] = set()
    out = []
    for i in ranking:
        if responses[i] not in seen:
            seen.add(responses[i])
            out.append(i)
    return out


def ranking_pairs(ranking: Sequence[int], ties: Sequence[Sequence[int]] | None = None,
                  responses: Sequence[str] | None = None) -> list[tuple[int, int]]:
    """All (winner, loser) pairs implied by a full ranking, best first: C(K,2) of them, less the declared ties.

    With `responses`, identical texts are one response, at the best rank any copy of it got (its first
    copy in the ranking stands for it): pairs are taken among distinct texts only. Otherwise a text
    sampled twice and ranked apart, X > Y > X', would teach both X > Y and Y > X, and a pair of two
    copies would ask the RM to prefer a text to itself.
    """
    group = {i: n for n, g in enumerate(ties or ()) for i in g}
    if responses is not None:
        ranking = distinct_ranking(responses, ranking)
    return [(ranking[a], ranking[b]) for a, b in combinations(range(len(ranking)), 2)
            if ranking[a] not in group or group[ranking[a]] != group.get(ranking[b])]


def merge_duplicate_ranks(ranking: Sequence[int], responses: Sequence[str]) -> list[int]:
    """The ranking with every copy of a text moved right behind its best-ranked copy (a full ranking still).

    The ranking then orders each text once: no response sits both above and below a copy of another.
    `ranking_pairs(merged, responses=responses)` equals `ranking_pairs(ranking, responses=responses)`.
    """
    first: dict[str, list[int]] = {}
    for i in ranking:
        first.setdefault(responses[i], []).append(i)
    return [i for copies in first.values() for i in copies]


# ----------------------------------------------------------------------------------------------
# The InstructGPT ranking loss (docs/ppo.md item 2)


def flat_pairs(groups: Sequence[tuple[int, Sequence[tuple[int, int]]]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Index tensors for `kway_ranking_loss` from groups of (number of responses, pairs).

    Responses of all groups are laid out one after another (group 0's K_0 responses first, ...).
    Returns (winner index, loser index, pair weight) over the flat layout; each pair's weight is
    1 / (number of pairs of its group), so every group (prompt) counts once whatever its K.
    """
    import torch

    win, lose, weight = [], [], []
    offset = 0
    for n, pairs in groups:
        if not pairs:
            raise ValueError("a group needs at least one pair")
        for w, l in pairs:
            win.append(offset + w)
            lose.append(offset + l)
            weight.append(1.0 / len(pairs))
        offset += n
    return torch.tensor(win), torch.tensor(lose), torch.tensor(weight, dtype=torch.float64)


def kway_ranking_loss(rewards: torch.Tensor, win: torch.Tensor, lose: torch.Tensor, weight: torch.Tensor,
                      n_groups: int) -> torch.Tensor:
    """InstructGPT's RM loss: mean over prompts of -1/C(K,2) Σ_pairs log σ(r_w - r_l).

    rewards (N,) holds one scalar per response, from ONE forward pass per response; all C(K,2)
    pairs of a prompt share those scalars inside the same batch element. Shuffling pairs across
    batches instead makes each response contribute to K-1 separate updates and overfits
    (Ouyang et al. 2022, sec. 3.5; docs/ppo.md item 2).
    """
    import torch.nn.functional as F

    margin = rewards[win] - rewards[lose]  # (P,)
    return -(weight.to(margin.dtype) * F.logsigmoid(margin)).sum() / n_groups


# ----------------------------------------------------------------------------------------------
# Reading the scalar at the last real token (docs/ppo.md item 1)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of each row's rightmost real token; correct for left and right padding alike.

    The one definition of "the last real token" (the EOS the reward is read at); a row with no real
    token gives 0."""
    import torch

    t = torch.arange(mask.shape[-1], device=mask.device)
    return (t * mask.long()).argmax(-1)


def gather_last(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """values (B, T) per-token scalars -> (B,) the value at the last real token (the EOS)."""
    import torch

    idx = last_token_index(mask)
    return values[torch.arange(values.shape[0], device=values.device), idx]


def apply_reward_bias(model, raw: torch.Tensor) -> torch.Tensor:
    """Centered reward: the raw head output plus the demonstration bias from config (item 3)."""
    return raw + float(getattr(model.config, REWARD_BIAS_KEY, 0.0) or 0.0)


def rewards_from_ids(model, ids: torch.Tensor, mask: torch.Tensor, *, centered: bool = True) -> torch.Tensor:
    """(B,) reward of token sequences `ids` (any padding side) read at the last real token.

    Passes `position_ids = cumsum(mask) - mask` (docs/ppo.md item 6), so a left-padded sequence
    scores exactly as it would unpadded.
    """
    from rlhf.batching import position_ids

    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False).last_hidden_state
    per_token = model.score(hidden).squeeze(-1).float()  # (B, T)
    raw = gather_last(per_token, mask)
    return apply_reward_bias(model, raw) if centered else raw


def encode_pair(tokenizer, prompt: str, response: str, max_len: int, *, drop: bool = False) -> list[int] | None:
    """The RM's input: chat prompt + response + EOS, as the policy produces it, in at most `max_len` tokens.

    Too long: the prompt is cut on the left (`rlhf.lengths.fit_example`: its first token and its end
    are kept). When the response alone leaves no room, training (`drop=True`) gets None and drops the
    record; scoring cuts the response instead, keeping its EOS, where the scalar is read.
    """
    from rlhf.lengths import fit_example, note_lengths
    from rlhf.tokenization import encode_prompt, encode_response

    p = encode_prompt(tokenizer, prompt)
    r = encode_response(tokenizer, response, add_eos=True)
    fitted = fit_example(p, r, max_len)
    if fitted is not None:
        return fitted[0] + fitted[1]
    note_lengths(max_len, **({"dropped": 1} if drop else {"truncated": 1}))
    if drop:
        return None
    keep_r = max(1, max_len - 1)
    return p[:1] + r[: keep_r - 1] + r[-1:] if keep_r > 1 else r[-1:]


def score_texts(model, tokenizer, prompts: Sequence[str], responses: Sequence[str], *, max_len: int,
                batch_size: int, device: torch.device, centered: bool = True) -> list[float]:
    """Rewards of (prompt, response) pairs, in order."""
    import torch

    from rlhf.batching import left_pad
    from rlhf.devices import autocast

    from rlhf.lengths import position_limit

    model.eval()
    max_len = min(max_len, position_limit(model) or max_len)
    out: list[float] = []
    for start in range(0, len(prompts), batch_size):
        seqs = [encode_pair(tokenizer, p, r, max_len)
                for p, r in zip(prompts[start: start + batch_size], responses[start: start + batch_size], strict=True)]
        ids, mask = left_pad(seqs, tokenizer.pad_token_id)
        with torch.no_grad(), autocast(device):
            r = rewards_from_ids(model, ids.to(device), mask.to(device), centered=centered)
        out.extend(r.float().cpu().tolist())
    return out


# ----------------------------------------------------------------------------------------------
# Pairwise formats


HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def parse_hh(chosen: str, rejected: str, where: str = "record") -> tuple[str, str, str]:
    """Anthropic HH-RLHF transcripts -> (prompt, chosen response, rejected response).

    The prompt is the shared prefix of both transcripts up to and including the last
    "\\n\\nAssistant:" they have in common (the two differ only in the final assistant turn).
    A single-turn prompt "\\n\\nHuman: q\\n\\nAssistant:" becomes plain "q"; multi-turn prompts keep
    the earlier turns as text ("Human: …\\n\\nAssistant: …\\n\\nHuman: q").
    """
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    cut = chosen.rfind(ASSISTANT, 0, n)  # the last assistant marker lying wholly inside the shared prefix
    if cut < 0:
        raise StageError(f"{where}: chosen and rejected share no '\\n\\nAssistant:' turn; not an HH-RLHF transcript pair")
    prefix = chosen[:cut]
    chosen_resp = chosen[cut + len(ASSISTANT):].strip()
    rejected_resp = rejected[cut + len(ASSISTANT):].strip()
    if HUMAN not in prefix:
        raise StageError(f"{where}: no '\\n\\nHuman:' turn before the final assistant turn")
    if prefix.count(HUMAN) == 1 and ASSISTANT not in prefix and prefix.startswith(HUMAN):
        prompt = prefix[len(HUMAN):].strip()
    else:
        prompt = prefix.strip()
    if not prompt or not chosen_resp or not rejected_resp:
        raise StageError(f"{where}: empty prompt or response after splitting the HH transcripts")
    return prompt, chosen_resp, rejected_resp
