"""bestofn: best-of-n sampling against the reward model, the RL-free control for PPO.

Reads  models/sft, models/reward, data/prepared/test.jsonl, data/raw/world.json (gold judge; optional)
Writes metrics/bestofn.json, plots/bestofn/bestofn.csv (n, kl, sqrt_kl, proxy, gold)
Run    rlhf bestofn

No training. For each held-out test prompt the SFT model samples N responses at temperature T; the
reward model (with its demonstration bias, rlhf.rm.score_texts) and the gold judge score each one. For
n = 1, 2, 4, ..., N the stage reports the expected proxy and gold score of the response the RM picks
out of n samples, estimated without bias from all n-subsets of the N (Gao et al. 2022, "Scaling Laws
for Reward Model Overoptimization", appendix), against the KL of best-of-n from SFT. This is the
same gold-vs-sqrt(KL) chart as PPO's (plots/ppo/overoptimization.csv): if best-of-n's gold does not
rise with n, the reward model cannot tell better answers from worse ones among SFT's own samples, and
no RL step against it can either.

The KL from SFT has two parts. KL(best-of-n || π_T) to the sampler π_T is at most log n - (n-1)/n
(Stiennon et al. 2020, appendix G.3; Gao et al. 2022, sec. 2; equal when no two samples tie), reported
as `kl_sampling`. Sampling below T = 1 moves away from SFT's own distribution π by E[log π_T - log π]
over the picked response, estimated with the same subset weights from each sample's log-ratio
(rlhf.kl.tempering_log_ratio). `kl` is their sum; at T = 1 the second part is 0.

Why T = 0.5 by default: at T = 1 the small SFT model's samples score far below its greedy answer (test
gold 0.33 against 0.57, seed 0), so the RM's pick of 8 first has to make up the sampling noise and ends
below greedy in every seed; at T = 0.5 it ends above it in every seed (docs/world.md, "Best of n").

SFT's greedy answer to the same prompts is scored too (what `evaluate` reports for SFT), so
"the RM's best-of-8 beats SFT's greedy answer on test gold" reads off `vs_greedy` with a paired
bootstrap interval over prompts.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.errors import StageError
from rlhf.io import PROMPT_SCHEMA, atomic_write_text, read_jsonl, timing, write_json
from rlhf.params import require


@dataclass(frozen=True)
class Params:
    samples: int
    """N, responses sampled per prompt; best-of-n is reported for n = 1, 2, 4, ... up to N (and N itself)."""
    prompts: int
    """How many test prompts to use, in file order (0 = all of data/prepared/test.jsonl)."""
    max_new_tokens: int
    """Response length cap in tokens, for the samples and the greedy answer alike."""
    temperature: float
    """Sampling temperature T of the N responses (1.0: SFT's own distribution; below 1 the KL from SFT adds
    E[log π_T - log π] over the pick to log n - (n-1)/n)."""
    batch_size: int
    """Sequences per generation and scoring batch."""
    ci_resamples: int
    """Bootstrap resamples over prompts for the 95% intervals."""
    seed: int
    """Sampling and bootstrap seed: the same seed and models give the same numbers."""
    threads: int
    """torch CPU threads; 0 leaves torch's default."""
    device: str
    """'auto', 'cpu' or 'cuda'."""

    def validate(self) -> None:
        require(self.samples >= 1, "bestofn.samples", "must be >= 1")
        require(self.prompts >= 0, "bestofn.prompts", "must be >= 0 (0 = all test prompts)")
        require(self.max_new_tokens > 0, "bestofn.max_new_tokens", "must be > 0")
        require(self.temperature > 0, "bestofn.temperature", "must be > 0 (best-of-n picks among distinct samples)")
        require(self.batch_size > 0, "bestofn.batch_size", "must be > 0")
        require(self.ci_resamples > 0, "bestofn.ci_resamples", "must be > 0")


# ----------------------------------------------------------------------------------------------
# The best-of-n estimator (pure)


def n_values(samples: int) -> list[int]:
    """n = 1, 2, 4, ... while <= samples, and samples itself."""
    ns = [1 << k for k in range(samples.bit_length()) if 1 << k <= samples]
    return ns if ns[-1] == samples else [*ns, samples]


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || sampling policy) = log n - (n-1)/n nats (Stiennon et al. 2020, app. G.3)."""
    return math.log(n) - (n - 1) / n


def best_of_n_weights(samples: int, n: int) -> list[float]:
    """w_i = C(i-1, n-1) / C(N, n), i = 1..N in ascending RM order: the chance that the i-th lowest of N
    is the highest of a uniformly drawn n-subset (Gao et al. 2022, appendix). The weights sum to 1."""
    if not 1 <= n <= samples:
        raise ValueError(f"n must be in 1..{samples}, got {n}")
    total = math.comb(samples, n)
    return [math.comb(i - 1, n - 1) / total for i in range(1, samples + 1)]


def best_of_n_expectation(proxy: Sequence[float], values: Sequence[float], n: int) -> float:
    """Expected `values` of the sample with the highest `proxy` among n of the N drawn without replacement,
    averaged exactly over all C(N, n) subsets.

    Samples whose proxy scores tie share their mean value first, which is the expectation when the RM
    breaks a tie at random (identical responses tie, and have equal values anyway).
    """
    if len(proxy) != len(values):
        raise ValueError("proxy and values must have one entry per sample")
    groups: dict[float, list[float]] = defaultdict(list)
    for r, v in zip(proxy, values, strict=True):
        groups[r].append(v)
    ordered = sorted(proxy)  # ascending: the i-th lowest gets weight C(i-1, n-1) / C(N, n)
    tied_mean = {r: sum(vs) / len(vs) for r, vs in groups.items()}
    return sum(w * tied_mean[r] for w, r in zip(best_of_n_weights(len(proxy), n), ordered, strict=True))


def mean_ci(values: Sequence[float], *, resamples: int, seed: int) -> dict[str, float]:
    """Mean with its 95% percentile-bootstrap interval over prompts."""
    from rlhf.benchmarks import bootstrap_ci

    lo, hi = bootstrap_ci(values, resamples=resamples, seed=seed)
    return {"mean": round(sum(values) / len(values), 4), "ci_low": round(lo, 4), "ci_high": round(hi, 4)}


def family_means(families: Sequence[str], values: Sequence[float]) -> dict[str, float]:
    """Mean of `values` per task family (the gold judge's families)."""
    sums: dict[str, list[float]] = defaultdict(list)
    for f, v in zip(families, values, strict=True):
        sums[f].append(v)
    return {f: round(sum(v) / len(v), 4) for f, v in sorted(sums.items())}


def curve_rows(per_n: dict[int, dict[str, Any]]) -> list[str]:
    """plots/bestofn/bestofn.csv: one row per n; the gold column only when a gold judge scored the samples."""
    has_gold = all("gold" in m for m in per_n.values())
    head = "n,kl,sqrt_kl,proxy" + (",gold" if has_gold else "")
    rows = [head]
    for n, m in per_n.items():
        row = f"{n},{m['kl']:.6f},{m['sqrt_kl']:.6f},{m['proxy']['mean']:.4f}"
        rows.append(row + (f",{m['gold']['mean']:.4f}" if has_gold else ""))
    return rows


# ----------------------------------------------------------------------------------------------
# The stage


def best_of_curve(proxy: list[float], gold: list[float] | None, greedy_gold: list[float] | None,
                  families: list[str], *, samples: int, ci: dict[str, Any],
                  tempering: list[float] | None = None) -> dict[int, dict[str, Any]]:
    """For each n of n_values(samples): the KL from SFT, and the expected proxy and gold score (mean and
    interval over prompts) of the RM's pick among n of each prompt's `samples` samples (laid out prompt
    by prompt), with gold by family and paired against SFT's greedy answer.

    `kl_sampling` is the analytic log n - (n-1)/n to the sampler; `kl` adds the expected tempering log-ratio
    log π_T - log π of the pick (`tempering`, one per sample; None or zeros at temperature 1)."""
    chunks = [slice(i * samples, (i + 1) * samples) for i in range(len(proxy) // samples)]
    per_n: dict[int, dict[str, Any]] = {}
    for n in n_values(samples):
        px = [best_of_n_expectation(proxy[c], proxy[c], n) for c in chunks]
        kl_sampling = best_of_n_kl(n)
        shift = (sum(best_of_n_expectation(proxy[c], tempering[c], n) for c in chunks) / len(chunks)
                 if tempering is not None else 0.0)
        kl = max(kl_sampling + shift, 0.0)  # an estimate; a KL is never below 0
        entry: dict[str, Any] = {"kl": round(kl, 6), "sqrt_kl": round(math.sqrt(kl), 6),
                                 "kl_sampling": round(kl_sampling, 6), "proxy": mean_ci(px, **ci)}
        if gold is not None:
            gd = [best_of_n_expectation(proxy[c], gold[c], n) for c in chunks]
            entry["gold"] = mean_ci(gd, **ci)
            entry["gold"]["by_family"] = family_means(families, gd)
            # Paired over prompts: best-of-n's gold minus SFT's greedy gold on the same prompt.
            entry["vs_greedy"] = mean_ci([a - b for a, b in zip(gd, greedy_gold, strict=True)], **ci)
        per_n[n] = entry
    return per_n


def run(params: Params, *, sft: Path, reward: Path, test: Path, world: Path | None, metrics: Path,
        plots: Path) -> dict[str, Any]:
    from rlhf.devices import pick_device, setup_torch
    from rlhf.gold import load_judge
    from rlhf.kl import tempering_log_ratio
    from rlhf.lengths import length_tally
    from rlhf.models import check_model_dir, load_causal_lm, load_reward_model, load_tokenizer
    from rlhf.progress import progress
    from rlhf.rm import score_texts
    from rlhf.sampling import generate_responses
    from rlhf.tokenization import same_tokenizer

    t0 = time.time()
    device = pick_device(params.device)
    setup_torch(params.threads, device)
    check_model_dir(sft, "SFT model")
    check_model_dir(reward, "reward model")
    tokenizer = load_tokenizer(sft)
    if not same_tokenizer(tokenizer, load_tokenizer(reward)):
        raise StageError(f"{reward}: the reward model's tokenizer differs from {sft}'s; train the RM from the same SFT model")
    policy = load_causal_lm(sft).to(device).eval()
    rm = load_reward_model(reward).to(device).eval()
    lengths = length_tally()  # prompts too long for a model lose their start (score_texts fits the RM's limit)
    judge = load_judge(world)
    rows = read_jsonl(test, PROMPT_SCHEMA)
    if params.prompts:
        rows = rows[: params.prompts]
    prompts = [r["prompt"] for r in rows]
    N = params.samples

    # 1. N samples per prompt (the prompt's copies side by side), and SFT's greedy answer.
    flat = [p for p in prompts for _ in range(N)]
    t_sample = time.time()
    with progress() as bar:
        task = bar.add_task("bestofn sample", total=len(flat) + len(prompts), info=f"N={N}")
        sampled = generate_responses(policy, tokenizer, flat, max_new_tokens=params.max_new_tokens,
                                     temperature=params.temperature, batch_size=params.batch_size, seed=params.seed,
                                     device=device, on_batch=lambda n: bar.update(task, advance=n), keep_tokens=True)
        greedy = generate_responses(policy, tokenizer, prompts, max_new_tokens=params.max_new_tokens, temperature=0.0,
                                    batch_size=params.batch_size, seed=params.seed, device=device,
                                    on_batch=lambda n: bar.update(task, advance=n))
    t_sample = time.time() - t_sample
    texts = [g["response"] for g in sampled]
    greedy_texts = [g["response"] for g in greedy]

    # 2. Each sample's log π_T - log π under SFT (0 at T = 1), for the KL from SFT.
    tempering = tempering_log_ratio(policy, tokenizer, flat, [g["tokens"] for g in sampled],
                                    temperature=params.temperature, max_new_tokens=params.max_new_tokens,
                                    batch_size=params.batch_size, device=device)

    # 3. Proxy (RM, centered by the demonstration bias) and gold score of every sample and greedy answer.
    proxy = score_texts(rm, tokenizer, flat + prompts, texts + greedy_texts, max_len=10**9,
                        batch_size=params.batch_size, device=device)
    proxy, greedy_proxy = proxy[: len(flat)], proxy[len(flat):]
    gold = [judge.score(p, r)["total"] for p, r in zip(flat, texts, strict=True)] if judge else None
    greedy_gold = [judge.score(p, r)["total"] for p, r in zip(prompts, greedy_texts, strict=True)] if judge else None

    # 4. Per prompt and n: expected proxy and gold of the RM's pick among n of its N samples.
    ci = {"resamples": params.ci_resamples, "seed": params.seed}
    families = [judge.family(p) for p in prompts] if judge else []
    per_n = best_of_curve(proxy, gold, greedy_gold, families, samples=N, ci=ci, tempering=tempering)

    result: dict[str, Any] = {
        "prompts": len(prompts), "samples": N, "temperature": params.temperature,
        "tempering_kl": round(sum(tempering) / len(tempering), 6),  # KL(π_T || π) per response, estimated
        "distinct_per_prompt": round(sum(len(set(texts[i * N:(i + 1) * N])) for i in range(len(prompts)))
                                     / len(prompts), 3),
        "best_of": {str(n): m for n, m in per_n.items()},
        "sft_greedy": {"proxy": mean_ci(greedy_proxy, **ci)},
        "lengths": lengths.report("bestofn"),
    }
    if greedy_gold is not None:
        result["sft_greedy"]["gold"] = {**mean_ci(greedy_gold, **ci), "by_family": family_means(families, greedy_gold)}
    # No training: the timing's "train_s" is the sampling, samples/s its throughput (greedy answers included).
    result["timing"] = timing(t0, train_s=t_sample, done=len(flat) + len(prompts), unit="samples")
    write_json(metrics, result, sort_keys=False)  # n in numeric order (1, 2, 4, ..., 16), not as text
    atomic_write_text(Path(plots) / "bestofn.csv", "\n".join(curve_rows(per_n)) + "\n")
    return result


def summary(m: dict[str, Any]) -> str:
    ns = list(m["best_of"])
    key = "gold" if "gold" in m["sft_greedy"] else "proxy"
    curve = ", ".join(f"{n}: {m['best_of'][n][key]['mean']:.3f}" for n in ns)
    return (f"{m['prompts']} prompts x {m['samples']} samples; {key} of best-of-n {curve}; "
            f"SFT greedy {m['sft_greedy'][key]['mean']:.3f} ({m['timing']['wall_s']} s)")
