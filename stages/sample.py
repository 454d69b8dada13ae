"""sample: K candidate responses per reward-model prompt from the SFT model, for labelers to rank.

Reads  models/sft (or several models), data/prepared/rm.jsonl
Writes data/samples/candidates.jsonl, metrics/sample.json
Run    rlhf sample

InstructGPT's labelers ranked K = 4..9 responses per prompt (Ouyang et al. 2022, sec. 3.5). Responses
are sampled at temperature 1 with no top-k / top-p (docs/ppo.md item 8), with the KV cache, in
batches that hold the K copies of each prompt side by side. Each response is cut at its first EOS;
`ended` records whether it stopped by itself (a response that never stops is ranked as it is; a warning
when fewer than half did). A prompt too long for the model with max_new_tokens loses its start
(metrics: lengths, docs/models.md).

Several models (`rlhf sample --model models/sft --model models/policy_round1`) share the K slots of each
prompt in the order given (K // n each, the remainder to the first). InstructGPT's comparisons came from
several models, earlier PPO policies among them (Ouyang et al. 2022, sec. 3.2); a policy's own samples are
where the reward model it was trained against goes wrong (docs/world.md, "A second round of rankings").

Candidates format, one record per prompt (read back with `rlhf.rm.read_candidates`):
  {"prompt_id": str, "prompt": str, "responses": [K strings], "ended": [K bools]}
  plus "models": [K model folder names] when more than one model was sampled (`rlhf label` then
  shows them in a shuffled order, blinded, as it does for evaluation candidates).
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


def slots(k: int, n_models: int) -> list[int]:
    """How many of a prompt's K candidates each of `n_models` models writes: K // n each, the remainder to the
    first (the policy being improved keeps the larger share)."""
    share = [k // n_models] * n_models
    share[0] += k - sum(share)
    return share


def sample_model(params: Params, model: Path, rows: list[dict[str, Any]], per_prompt: int, device, bar) -> list[dict[str, Any]]:
    """`per_prompt` responses of one model to each prompt: each prompt repeated in a row, one batched,
    KV-cached sampling pass over all of them."""
    from rlhf.models import load_causal_lm, load_tokenizer
    from rlhf.sampling import generate_responses

    tokenizer = load_tokenizer(model)
    lm = load_causal_lm(model).to(device).eval()
    flat = [r["prompt"] for r in rows for _ in range(per_prompt)]
    task = bar.add_task("sample", total=len(flat), info=f"K={per_prompt} {model.name}")
    return generate_responses(lm, tokenizer, flat, max_new_tokens=params.max_new_tokens,
                              temperature=params.temperature, batch_size=params.batch_size, seed=params.seed,
                              device=device, on_batch=lambda n: bar.update(task, advance=n))


def run(params: Params, *, model: Path | list[Path], prompts: Path, out: Path, metrics: Path) -> dict[str, Any]:
    from rlhf.devices import pick_device, setup_torch
    from rlhf.lengths import length_tally, warn_rarely_ended
    from rlhf.progress import progress

    t0 = time.time()
    models = [Path(m) for m in model] if isinstance(model, (list, tuple)) else [Path(model)]
    require(len(models) <= params.k, "sample.k", f"must be at least the number of models sampled ({len(models)})")
    device = pick_device(params.device)
    setup_torch(params.threads, device)
    rows = read_jsonl(prompts, PROMPT_SCHEMA)
    if params.prompts:
        rows = rows[: params.prompts]
    lengths = length_tally()  # prompts too long for the model with max_new_tokens lose their start

    # 1. Each model's share of the K slots, sampled in one pass per model.
    share = slots(params.k, len(models))
    with progress() as bar:
        gens = [sample_model(params, m, rows, n, device, bar) for m, n in zip(models, share, strict=True)]

    # 2. Regroup into one record per prompt: the first model's responses first.
    records, gen = [], [g for per_model in gens for g in per_model]
    for i, r in enumerate(rows):
        chunk = [g for per_model, n in zip(gens, share, strict=True) for g in per_model[i * n: (i + 1) * n]]
        rec = {"prompt_id": r["id"], "prompt": r["prompt"],
               "responses": [g["response"] for g in chunk], "ended": [g["ended"] for g in chunk]}
        if len(models) > 1:
            rec["models"] = [m.name for m, n in zip(models, share, strict=True) for _ in range(n)]
        records.append(rec)
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
    if len(models) > 1:
        result["models"] = {m.name: k for m, k in zip(models, share, strict=True)}
    warn_rarely_ended("sample", result["ended_share"], params.max_new_tokens, "sample.max_new_tokens")
    write_json(metrics, result)
    result["timing"] = {"wall_s": round(time.time() - t0, 1)}
    return result


def summary(m: dict[str, Any]) -> str:
    return (f"{m['prompts']} prompts x {m['k']} responses, {m['ended_share']:.0%} ended with EOS, "
            f"{m['mean_distinct_per_prompt']:.2f} distinct per prompt ({m['timing']['wall_s']} s)")
