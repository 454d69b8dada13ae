"""sample: K candidate responses per reward-model prompt from the SFT model, for labelers to rank.

Reads  models/sft, data/prepared/rm.jsonl
Writes data/samples/candidates.jsonl, metrics/sample.json
Run    rlhf sample

InstructGPT's labelers ranked K = 4..9 responses per prompt (Ouyang et al. 2022, sec. 3.5). Responses
are sampled at temperature 1 with no top-k / top-p (docs/ppo.md item 8), with the KV cache, in
batches that hold the K copies of each prompt side by side. Each response is cut at its first EOS;
`ended` records whether it stopped by itself (a response that never stops is ranked as it is; a warning
when fewer than half did). A prompt too long for the model with max_new_tokens loses its start
(metrics: lengths, docs/models.md).

Candidates format, one record per prompt (read back with `rlhf.rm.read_candidates`):
  {"prompt_id": str, "prompt": str, "responses": [K strings], "ended": [K bools]}
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.io import PROMPT_SCHEMA, read_jsonl, write_json, write_jsonl
from rlhf.params import require

@dataclass(frozen=True)
class Params:
    k: int
    """Responses per prompt (InstructGPT: 4 to 9); every pair of them becomes a comparison."""
    prompts: int
    """How many rm prompts to sample for, in file order (0 = all)."""
    max_new_tokens: int
    """Response length cap in tokens; responses that reach it without EOS have ended=false."""
    temperature: float
    """Sampling temperature (1.0: the policy's own distribution, as InstructGPT sampled candidates)."""
    batch_size: int
    """Sequences per generation batch (a multiple of k keeps each prompt's K copies together)."""
    seed: int
    """Sampling seed: the same seed and model give the same candidates."""
    threads: int
    """torch CPU threads; 0 leaves torch's default."""
    device: str
    """'auto', 'cpu' or 'cuda'."""

    def validate(self) -> None:
        require(4 <= self.k <= 9, "sample.k", "must be between 4 and 9 (InstructGPT ranked K = 4..9)")
        require(self.prompts >= 0, "sample.prompts", "must be >= 0 (0 = all rm prompts)")
        require(self.max_new_tokens > 0, "sample.max_new_tokens", "must be > 0")
        require(self.temperature > 0, "sample.temperature", "must be > 0 (ranking needs diverse samples)")
        require(self.batch_size > 0, "sample.batch_size", "must be > 0")


def run(params: Params, *, model: Path, prompts: Path, out: Path, metrics: Path) -> dict[str, Any]:
    from rlhf.devices import pick_device, setup_torch
    from rlhf.lengths import length_tally, warn_rarely_ended
    from rlhf.models import load_causal_lm, load_tokenizer
    from rlhf.progress import progress
    from rlhf.sampling import generate_responses

    t0 = time.time()
    device = pick_device(params.device)
    setup_torch(params.threads, device)
    rows = read_jsonl(prompts, PROMPT_SCHEMA)
    if params.prompts:
        rows = rows[: params.prompts]
    tokenizer = load_tokenizer(model)
    lm = load_causal_lm(model).to(device).eval()
    lengths = length_tally()  # prompts too long for the model with max_new_tokens lose their start

    # 1. Each prompt repeated K times in a row; one batched, KV-cached sampling pass over all of them.
    flat = [r["prompt"] for r in rows for _ in range(params.k)]
    with progress() as bar:
        task = bar.add_task("sample", total=len(flat), info=f"K={params.k}")
        gen = generate_responses(lm, tokenizer, flat, max_new_tokens=params.max_new_tokens,
                                 temperature=params.temperature, batch_size=params.batch_size, seed=params.seed,
                                 device=device, on_batch=lambda n: bar.update(task, advance=n))

    # 2. Regroup into one record per prompt.
    records = []
    for i, r in enumerate(rows):
        chunk = gen[i * params.k: (i + 1) * params.k]
        records.append({"prompt_id": r["id"], "prompt": r["prompt"],
                        "responses": [g["response"] for g in chunk], "ended": [g["ended"] for g in chunk]})
    write_jsonl(out, records)

    # 3. What labelers will see: share that stopped, length, and how many of the K differ.
    n = len(gen)
    distinct = [len(set(rec["responses"])) for rec in records]
    result: dict[str, Any] = {
        "prompts": len(records), "k": params.k, "responses": n,
        "ended_share": round(sum(g["ended"] for g in gen) / n, 4),
        "mean_words": round(sum(len(g["response"].split()) for g in gen) / n, 2),
        "mean_distinct_per_prompt": round(sum(distinct) / len(distinct), 3),
        "all_identical_share": round(sum(d == 1 for d in distinct) / len(distinct), 4),
        "lengths": lengths.report("sample"),
    }
    warn_rarely_ended("sample", result["ended_share"], params.max_new_tokens, "sample.max_new_tokens")
    write_json(metrics, result)
    result["timing"] = {"wall_s": round(time.time() - t0, 1)}
    return result


def summary(m: dict[str, Any]) -> str:
    return (f"{m['prompts']} prompts x {m['k']} responses, {m['ended_share']:.0%} ended with EOS, "
            f"{m['mean_distinct_per_prompt']:.2f} distinct per prompt ({m['timing']['wall_s']} s)")
