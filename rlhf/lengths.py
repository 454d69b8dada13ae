"""Lengths: a model's position limit, left truncation of prompts, and the counts a stage reports.

Nothing reaches a model longer than its position limit (`position_limit`, docs/models.md). Prompts are
cut on the left (the end of the conversation is kept), responses are kept: generation gives a prompt
`limit - max_new_tokens` tokens, a training example that cannot hold its whole response is dropped.
Every cut and drop is counted in the stage's `LengthTally` (`length_tally`), which the stage reports as
a metric and one warning line.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlhf.errors import StageError


POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def position_limit(model) -> int | None:
    """The most tokens `model` (a model, a config or its dict, or a model folder) can take at once, or None when its
    config names no limit. GPT-2 calls it n_positions (and n_ctx), Llama, Qwen2 and GPT-NeoX
    max_position_embeddings; rotary models run past it, but on positions they never trained on."""
    if isinstance(model, (str, Path)):
        from transformers import AutoConfig

        try:
            model = AutoConfig.from_pretrained(str(model))
        except (OSError, ValueError) as exc:
            raise StageError(f"{model}: cannot read its config.json ({str(exc).splitlines()[0]})") from None
    cfg = getattr(model, "config", model)
    for key in POSITION_KEYS:
        value = cfg.get(key) if isinstance(cfg, dict) else getattr(cfg, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


class LengthTally:
    """What a stage cut to fit its models' position limits: prompts left-truncated, records dropped.

    The library's encoders report here (`note_lengths`) while the stage's tally is open (`length_tally`),
    so a stage gets its counts without passing a counter through every helper; `report` gives the metric
    and prints the one warning line.
    """

    def __init__(self) -> None:
        self.limit: int | None = None
        self.truncated = 0
        self.dropped = 0

    def note(self, limit: int | None, truncated: int = 0, dropped: int = 0) -> None:
        if limit is not None:
            self.limit = limit if self.limit is None else min(self.limit, limit)
        self.truncated += truncated
        self.dropped += dropped

    def metrics(self) -> dict[str, Any]:
        return {"position_limit": self.limit, "prompts_truncated": self.truncated, "records_dropped": self.dropped}

    def report(self, stage: str) -> dict[str, Any]:
        """The `lengths` metric; one warning line on stderr when anything was cut or dropped."""
        if self.truncated or self.dropped:
            from rlhf.progress import console

            console.print(f"[yellow]{stage}: {self.truncated} prompts cut on the left and {self.dropped} records "
                          f"dropped to fit the model's {self.limit} positions (docs/models.md)", soft_wrap=True)
        return self.metrics()


_TALLY: list[LengthTally] = [LengthTally()]  # the open tally; a fresh one per stage run


def length_tally() -> LengthTally:
    """Open a fresh tally for this stage run: the library's cuts and drops are counted in it from now on."""
    _TALLY[0] = LengthTally()
    return _TALLY[0]


def open_length_tally() -> LengthTally:
    """The tally `length_tally` last opened (a stage whose setup opened it reports it at the end)."""
    return _TALLY[0]


def note_lengths(limit: int | None, *, truncated: int = 0, dropped: int = 0) -> None:
    _TALLY[0].note(limit, truncated, dropped)


def warn_rarely_ended(stage: str, ended_share: float, max_new_tokens: int, key: str, below: float = 0.5) -> None:
    """One warning line when fewer than `below` of a stage's sampled responses ended with EOS: the cap
    `key` is likely below what the SFT model needs (sft's metrics: response_tokens_p95), or SFT never
    learned to stop. Responses cut by the cap are ranked and rewarded as they are."""
    if ended_share < below:
        from rlhf.progress import console

        console.print(f"[yellow]{stage}: only {ended_share:.0%} of responses ended with EOS within {key}="
                      f"{max_new_tokens} tokens; raise {key} (sft reports response_tokens_p95) or train SFT longer",
                      soft_wrap=True)


def fit_prompt(ids: Sequence[int], budget: int) -> list[int]:
    """`ids` cut on the left to `budget` tokens, keeping its first token (BOS in the chat format) and the
    end (the latest turns and the assistant marker the response follows)."""
    ids = list(ids)
    if len(ids) <= budget:
        return ids
    return ids[:1] + ids[len(ids) - budget + 1:] if budget >= 2 else ids[len(ids) - budget:]


def fit_example(prompt: Sequence[int], response: Sequence[int], limit: int | None) -> tuple[list[int], list[int]] | None:
    """(prompt, response) with the prompt cut on the left so the whole response fits `limit` (a cut counted in
    the open tally), or None when the response alone leaves no room for a prompt token (the caller drops
    the record and counts it, or cuts otherwise)."""
    prompt, response = list(prompt), list(response)
    if limit is None or len(prompt) + len(response) <= limit:
        return prompt, response
    if len(response) + 1 > limit:
        return None
    note_lengths(limit, truncated=1)
    return fit_prompt(prompt, limit - len(response)), response


def fit_pair(context: list[int], continuation: list[int], limit: int) -> tuple[list[int], list[int]]:
    """Context cut on the left so context + continuation fit `limit`, one context token kept at least (the
    continuation then loses its start)."""
    if len(context) + len(continuation) <= limit:
        return context, continuation
    keep = max(1, limit - len(continuation)) if context else 0
    return context[len(context) - keep:], continuation[len(continuation) - (limit - keep):]


def prompt_budget(model, max_new_tokens: int) -> int | None:
    """Tokens a prompt may take so that it and `max_new_tokens` fit the model's positions (None: no limit)."""
    limit = position_limit(model)
    if limit is None:
        return None
    if max_new_tokens >= limit:
        raise StageError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's {limit} "
                         f"positions; set it below {limit}")
    return limit - max_new_tokens


def fit_queries(model, queries: Sequence[Sequence[int]], max_new_tokens: int, *, count: bool = True) -> list[list[int]]:
    """Prompts cut on the left so each plus `max_new_tokens` fits the model (counted in the open tally unless
    `count` is False: a second pass over prompts whose cuts were already counted)."""
    budget = prompt_budget(model, max_new_tokens)
    if budget is None:
        return [list(q) for q in queries]
    cut = sum(len(q) > budget for q in queries)
    if cut and count:
        note_lengths(budget + max_new_tokens, truncated=cut)
    return [fit_prompt(q, budget) for q in queries]
