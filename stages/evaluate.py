"""evaluate: compare models on held-out test prompts and the public benchmarks, and write the report.

Reads  the HF model folders named in `evaluate.models` (default models/base, models/sft, models/policy),
       data/prepared/test.jsonl (prompts no stage trained on), data/raw/world.json (gold judge and the
       held-out labelers; optional), the eval suites in the public formats (data/raw/eval/
       truthfulqa_mc.json, crows_pairs.csv, rtp.jsonl; each optional), the dvclive curves under plots/
Writes metrics/evaluate.json (`dvc metrics show/diff`), reports/report.html (self-contained),
       reports/report.md (+ reports/figures/*.png), reports/responses.jsonl (every model's test responses,
       ready to be labeled by humans)
Run    rlhf evaluate

What is measured (docs/evaluation.md has the exact definitions and their sources):
1. helpfulness: each model answers the test prompts; for every pair (A, B) in `evaluate.pairs` a judge
   picks the better answer per prompt (ties 0.5) -> win rate with a 95% bootstrap interval (InstructGPT
   fig. 1). The judge is the world's held-out labeler pool, or human labels, or a reward model (proxy).
   The gold judge's component scores per task family and the mean response length go beside it.
2. truthfulness: TruthfulQA MC1/MC2 as lm-evaluation-harness computes them.
3. bias: CrowS-Pairs pct_stereotype and likelihood_diff (lm-evaluation-harness, causal LMs).
4. toxicity: RealToxicityPrompts expected maximum toxicity and toxicity probability (Gehman et al. 2020).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhf import benchmarks as B
from rlhf.errors import StageError
from rlhf.io import read_jsonl, write_json, write_jsonl
from rlhf.params import require

TEST_SCHEMA = {"id": (str, True), "prompt": (str, True)}
JUDGES = ("heldout", "labels", "reward")


@dataclass(frozen=True)
class Params:
    models: dict[str, str]
    """Models to compare, name -> HF model folder (default base, sft, policy); the order is the report's."""
    pairs: list[list[str]]
    """Win-rate comparisons [A, B] ("A preferred to B"), names from `models`."""
    judge: str
    """Who picks the better answer: 'heldout' (the world's held-out labelers), 'labels' (human labels in
    `labels`), or 'reward' (the reward model in `reward_model`, reported as a proxy judge)."""
    labels: str
    """Human labels for judge 'labels': JSONL of rankings or pairwise records on reports/responses.jsonl."""
    reward_model: str
    """Reward-model folder for judge 'reward'."""
    test_prompts: int
    """Test prompts to answer and judge (0 = all of data/prepared/test.jsonl)."""
    max_new_tokens: int
    """Response length cap for test prompts."""
    temperature: float
    """Sampling temperature of test responses; 0 = greedy (deterministic and each model's most likely answer)."""
    judge_seed: int
    """Seed of the labeler draw, the order in which a labeler sees the two answers, and the bootstrap."""
    ci_resamples: int
    """Bootstrap resamples for the 95% win-rate interval."""
    truthfulqa_primer: str
    """'none', 'qa' (TruthfulQA's six-QA primer, lm-eval's default) or a literal primer string."""
    rtp_prompts: int
    """RealToxicityPrompts prompts to use (0 = all)."""
    rtp_k: int
    """Continuations per prompt (paper: 25)."""
    rtp_top_p: float
    """Nucleus sampling mass (paper: 0.9)."""
    rtp_temperature: float
    """Sampling temperature (paper: 1)."""
    rtp_max_new_tokens: int
    """Tokens per continuation (paper: 20)."""
    rtp_format: str
    """'raw': the prompt is plain text to continue (the paper's setting); 'chat': sent as a user turn."""
    toxicity_scorer: str
    """'gold': the world's harm scorer (rlhf.judge.harm_score); else an HF text-classification folder or id."""
    toxicity_label: str
    """Label of a classifier scorer whose probability is the toxicity (e.g. 'toxic')."""
    examples: int
    """Test prompts shown side by side in the report."""
    batch_size: int
    """Sequences per forward pass when scoring and sampling."""
    seed: int
    """Sampling seed (test responses when temperature > 0, RTP continuations)."""
    threads: int
    """torch CPU threads; 0 leaves torch's default."""
    device: str
    """'auto', 'cpu' or 'cuda'."""

    def validate(self) -> None:
        require(len(self.models) > 0, "evaluate.models", "name at least one model folder")
        for i, pair in enumerate(self.pairs):
            require(len(pair) == 2 and pair[0] != pair[1], f"evaluate.pairs[{i}]", "must be [A, B] with A != B")
            for name in pair:
                require(name in self.models, f"evaluate.pairs[{i}]", f"'{name}' is not in evaluate.models")
        require(self.judge in JUDGES, "evaluate.judge", f"must be one of {', '.join(JUDGES)}")
        require(self.judge != "labels" or bool(self.labels), "evaluate.labels", "judge 'labels' needs a labels file")
        require(self.judge != "reward" or bool(self.reward_model), "evaluate.reward_model",
                "judge 'reward' needs a reward-model folder")
        for key in ("test_prompts", "rtp_prompts", "examples"):
            require(getattr(self, key) >= 0, f"evaluate.{key}", "must be >= 0")
        for key in ("max_new_tokens", "rtp_k", "rtp_max_new_tokens", "batch_size", "ci_resamples"):
            require(getattr(self, key) > 0, f"evaluate.{key}", "must be > 0")
        require(0 < self.rtp_top_p <= 1, "evaluate.rtp_top_p", "must be in (0, 1]")
        require(self.rtp_temperature > 0, "evaluate.rtp_temperature", "must be > 0 (RTP samples)")
        require(self.temperature >= 0, "evaluate.temperature", "must be >= 0")
        require(self.rtp_format in ("raw", "chat"), "evaluate.rtp_format", "must be 'raw' or 'chat'")


# ----------------------------------------------------------------------------------------------
# ----------------------------------------------------------------------------------------------
# Judges: per prompt, 1.0 when A's answer is preferred, 0.0 when B's, 0.5 for a tie.


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


@torch.no_grad()
def reward_scores(model, tokenizer, prompts: Sequence[str], responses: Sequence[str], *, batch_size: int,
                  device: torch.device) -> list[float]:
    """Reward of each (prompt, response): chat prompt + response + EOS, scalar read at the last real token
    (docs/ppo.md item 1; left padding puts it last in every row)."""
    from rlhf.modeling import autocast, encode_prompt, encode_response, left_pad, position_ids

    out: list[float] = []
    for s in range(0, len(prompts), batch_size):
        seqs = [encode_prompt(tokenizer, p) + encode_response(tokenizer, r, add_eos=True)
                for p, r in zip(prompts[s: s + batch_size], responses[s: s + batch_size], strict=True)]
        ids, mask = (t.to(device) for t in left_pad(seqs, tokenizer.pad_token_id))
        with autocast(device):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
        out.extend(float(v) for v in logits[:, 0].float().cpu())
    return out


# ----------------------------------------------------------------------------------------------
# Benchmarks on one model


def _truncate(ctx: list[int], cont: list[int], max_len: int | None) -> tuple[list[int], list[int]]:
    """lm-eval keeps the last max_length + 1 tokens of context + continuation (left truncation)."""
    if max_len is None or len(ctx) + len(cont) <= max_len + 1:
        return ctx, cont
    keep = max(1, max_len + 1 - len(cont))
    return ctx[-keep:], cont


def model_max_len(model) -> int | None:
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        if isinstance(getattr(cfg, key, None), int):
            return getattr(cfg, key)
    return None


def truthfulqa_eval(model, tokenizer, items: list[B.TruthfulQAItem], primer: str, *, batch_size: int,
                    device: torch.device) -> dict[str, Any]:
    """MC1 and MC2: each choice scored as the continuation " " + answer of the QA context (lm-eval)."""
    from rlhf.modeling import continuation_loglik

    max_len = model_max_len(model)
    keys: dict[tuple[int, str], int] = {}  # (question, answer) -> index: mc1 and mc2 share most answers
    pairs = []
    for qi, item in enumerate(items):
        ctx = B.truthfulqa_context(item.question, primer)
        for choice in dict.fromkeys(item.mc1_choices + item.mc2_choices):
            keys[(qi, choice)] = len(pairs)
            pairs.append(_truncate(*B.encode_pair(tokenizer, ctx, " " + choice), max_len))
    lls = continuation_loglik(model, tokenizer, pairs, batch_size=batch_size, device=device)
    mc1, mc2 = [], []
    for qi, item in enumerate(items):
        mc1.append(B.mc1_score([lls[keys[(qi, c)]] for c in item.mc1_choices], item.mc1_gold))
        mc2.append(B.mc2_score([lls[keys[(qi, c)]] for c in item.mc2_choices], item.mc2_labels))
    return {"mc1": round(sum(mc1) / len(mc1), 4), "mc2": round(sum(mc2) / len(mc2), 4), "questions": len(items)}


def crows_pairs_eval(model, tokenizer, pairs: list[B.CrowsPair], *, batch_size: int, device: torch.device) -> dict[str, Any]:
    """Each sentence's log-likelihood conditioned on the BOS token alone (lm-eval: empty context)."""
    from rlhf.modeling import continuation_loglik

    seqs = [B.encode_pair(tokenizer, "", s) for p in pairs for s in (p.sent_more, p.sent_less)]
    lls = continuation_loglik(model, tokenizer, seqs, batch_size=batch_size, device=device)
    return B.crows_pairs_summary(pairs, lls[0::2], lls[1::2])


def rtp_continuations(model, tokenizer, prompts: list[str], params: Params, device: torch.device) -> list[list[str]]:
    """k continuations per prompt; the prompt is raw text after BOS (the paper continues plain text) or
    a chat user turn (`rtp_format: chat`)."""
    from rlhf.modeling import decode_response, encode_prompt, sample_tokens

    if params.rtp_format == "chat":
        queries = [encode_prompt(tokenizer, p) for p in prompts]
    else:
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        queries = [[bos] + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    rows = [q for q in queries for _ in range(params.rtp_k)]  # prompt i's continuations at rows i*k..i*k+k-1
    gen = torch.Generator(device=device.type if device.type != "cuda" else device)
    gen.manual_seed(params.seed)
    texts: list[str] = []
    for s in range(0, len(rows), params.batch_size):
        toks = sample_tokens(model, rows[s: s + params.batch_size], pad_id=tokenizer.pad_token_id,
                             eos_id=tokenizer.eos_token_id, max_new_tokens=params.rtp_max_new_tokens,
                             temperature=params.rtp_temperature, top_p=params.rtp_top_p, generator=gen, device=device)
        texts.extend(decode_response(tokenizer, row)[0] for row in toks.tolist())
    k = params.rtp_k
    return [texts[i * k:(i + 1) * k] for i in range(len(prompts))]


def make_toxicity_scorer(spec: str, label: str, device: torch.device) -> Callable[[list[str]], list[float]]:
    """'gold' -> the world's harm scorer; else a Hugging Face text-classification model (folder or hub id)
    whose `label` probability is the toxicity (Gehman et al. used Perspective API's TOXICITY)."""
    if spec == "gold":
        from rlhf.judge import harm_score

        return lambda texts: [harm_score(t) for t in texts]
    from transformers import pipeline

    try:
        # Safe loading, as everywhere: safetensors weights only, no code from the model folder.
        clf = pipeline("text-classification", model=spec, top_k=None, device=device, truncation=True,
                       trust_remote_code=False, model_kwargs={"use_safetensors": True})
    except (OSError, ValueError) as exc:
        raise StageError(f"evaluate.toxicity_scorer: cannot load '{spec}' as a text classifier "
                         f"({str(exc).splitlines()[0]}); use 'gold' or a local model folder") from None

    def score(texts: list[str]) -> list[float]:
        out = []
        for res in clf([t if t else " " for t in texts], batch_size=32):
            by_label = {r["label"].lower(): r["score"] for r in res}
            if label.lower() not in by_label:
                raise StageError(f"evaluate.toxicity_label: '{label}' is not a label of {spec} "
                                 f"(labels: {', '.join(sorted(by_label))})")
            out.append(float(by_label[label.lower()]))
        return out

    return score


# ----------------------------------------------------------------------------------------------
# The stage


def pick_examples(prompts: list[str], families: list[str], n: int) -> list[int]:
    """Indices of `n` test prompts, one family after another, so the report shows every kind of task."""
    by_family: dict[str, list[int]] = {}
    for i, f in enumerate(families):
        by_family.setdefault(f, []).append(i)
    picked, rnd = [], 0
    while len(picked) < min(n, len(prompts)):
        for f in sorted(by_family):
            if rnd < len(by_family[f]) and len(picked) < n:
                picked.append(by_family[f][rnd])
        rnd += 1
    return picked


def _suite(path: Path | None, what: str, skipped: dict[str, str]) -> Path | None:
    if path is None or not Path(path).is_file():
        skipped[what] = f"{path}: not found" if path else "no file given"
        return None
    return Path(path)


def run(params: Params, *, test: Path, world: Path | None, truthfulqa: Path | None, crows_pairs: Path | None,
        rtp: Path | None, plots: Path | None, reports: Path, metrics: Path) -> dict[str, Any]:
    from rlhf.gold import load_judge, summarize
    from rlhf.modeling import check_model_dir, generate_responses, load_causal_lm, load_reward_model, load_tokenizer, pick_device, setup_torch
    from rlhf.progress import progress
    from rlhf.report import build_report, read_curves

    t0 = time.time()
    device = pick_device(params.device)
    setup_torch(params.threads, device)
    for name, path in params.models.items():
        check_model_dir(path, f"model '{name}' (evaluate.models.{name})")
    records = read_jsonl(test, TEST_SCHEMA)
    if params.test_prompts:
        records = records[: params.test_prompts]
    prompts = [r["prompt"] for r in records]
    gold = load_judge(world)
    skipped: dict[str, str] = {}
    families = [gold.family(p) for p in prompts] if gold else [r.get("family", "all") for r in records]

    tqa_path = _suite(truthfulqa, "truthfulqa", skipped)
    crows_path = _suite(crows_pairs, "crows_pairs", skipped)
    rtp_path = _suite(rtp, "toxicity", skipped)
    tqa_items = B.read_truthfulqa(tqa_path) if tqa_path else []
    crows = B.read_crows_pairs(crows_path) if crows_path else []
    rtp_prompts = B.read_rtp(rtp_path) if rtp_path else []
    if params.rtp_prompts:
        rtp_prompts = rtp_prompts[: params.rtp_prompts]
    primer = B.resolve_primer(params.truthfulqa_primer)
    scorer = make_toxicity_scorer(params.toxicity_scorer, params.toxicity_label, device) if rtp_prompts else None

    # 1. Every model: test responses, gold scores, benchmarks.
    responses: dict[str, list[str]] = {}
    ended: dict[str, list[bool]] = {}
    per_model: dict[str, dict[str, Any]] = {}
    rtp_samples: dict[str, list[list[str]]] = {}
    timing: dict[str, float] = {}
    with progress() as bar:
        task = bar.add_task("evaluate", total=len(params.models), info="")
        for name, path in params.models.items():
            t1 = time.time()
            bar.update(task, info=name)
            tokenizer = load_tokenizer(path)
            model = load_causal_lm(path).to(device).eval()
            gen = generate_responses(model, tokenizer, prompts, max_new_tokens=params.max_new_tokens,
                                     temperature=params.temperature, batch_size=params.batch_size,
                                     seed=params.seed, device=device)
            responses[name] = [g["response"] for g in gen]
            ended[name] = [bool(g["ended"]) for g in gen]
            m: dict[str, Any] = {
                "length_words": round(sum(len(r.split()) for r in responses[name]) / len(prompts), 2),
                "ended_with_eos": round(sum(g["ended"] for g in gen) / len(gen), 4),
            }
            if gold is not None:
                m["gold"] = summarize(gold, prompts, responses[name])
            if tqa_items:
                m["truthfulqa"] = truthfulqa_eval(model, tokenizer, tqa_items, primer,
                                                  batch_size=params.batch_size, device=device)
            if crows:
                m["crows_pairs"] = crows_pairs_eval(model, tokenizer, crows, batch_size=params.batch_size, device=device)
            if rtp_prompts and scorer is not None:
                conts = rtp_continuations(model, tokenizer, rtp_prompts, params, device)
                rtp_samples[name] = conts
                flat = scorer([c for cs in conts for c in cs])
                k = params.rtp_k
                m["toxicity"] = B.toxicity_summary([flat[i * k:(i + 1) * k] for i in range(len(conts))])
            per_model[name] = m
            del model
            timing[name] = round(time.time() - t1, 1)
            bar.advance(task)

    # 2. Win rates: A vs B on every test prompt, judged by the chosen judge.
    if params.judge == "heldout":
        if gold is None:
            raise StageError(f"{world}: no world file, so there are no held-out labelers; set evaluate.judge "
                             "to 'labels' (human labels) or 'reward' (a reward-model folder)")
        from rlhf.judge import heldout_pool

        pool = heldout_pool(gold)
        judge_desc = f"held-out labelers of the world ({len(pool)}; one drawn per prompt)"
    elif params.judge == "labels":
        labels = read_human_labels(params.labels)
        judge_desc = f"human labels ({params.labels})"
    else:
        rm_tok = load_tokenizer(params.reward_model)
        rm = load_reward_model(params.reward_model).to(device).eval()
        rm_scores = {n: reward_scores(rm, rm_tok, prompts, r, batch_size=params.batch_size, device=device)
                     for n, r in responses.items()}
        for n, s in rm_scores.items():
            per_model[n]["reward_model_score"] = round(sum(s) / len(s), 4)
        judge_desc = f"reward model {params.reward_model} (a PROXY judge: the model PPO optimized, if it is the same)"
    gold_totals = ({n: [gold.score(p, r)["total"] for p, r in zip(prompts, rs)] for n, rs in responses.items()}
                   if gold is not None else {})

    win_rates: dict[str, Any] = {}
    for a, b in params.pairs:
        tag = f"{a}_vs_{b}"
        if params.judge == "heldout":
            outcomes, missing = judge_heldout(pool, prompts, responses[a], responses[b], seed=params.judge_seed, tag=tag), 0
        elif params.judge == "labels":
            outcomes, missing = judge_labels(labels, prompts, responses[a], responses[b])
        else:
            outcomes, missing = judge_scores(rm_scores[a], rm_scores[b]), 0
        if not outcomes:
            skipped[f"win_rate {tag}"] = "no labeled comparisons for this pair"
            continue
        w = B.win_rate(outcomes, resamples=params.ci_resamples, seed=params.judge_seed)
        if missing:
            w["unlabeled"] = missing
        w["a_length_words"] = per_model[a]["length_words"]
        w["b_length_words"] = per_model[b]["length_words"]
        if gold_totals:
            # Noise-free reference: the gold judge's own verdict per prompt (not a labeler's).
            w["gold_win_rate"] = round(sum(judge_scores(gold_totals[a], gold_totals[b])) / len(prompts), 4)
        win_rates[tag] = w

    result: dict[str, Any] = {
        "prompts": len(prompts),
        "judge": params.judge,
        "models": per_model,
        "win_rates": win_rates,
    }
    if skipped:
        result["skipped"] = skipped
    write_json(metrics, result)

    # 3. Responses for human labeling (the candidates format `rlhf label --candidates` reads), and the report.
    names = list(params.models)
    reports = Path(reports)
    write_jsonl(reports / "responses.jsonl", (
        {"prompt_id": r["id"], "prompt": r["prompt"], "responses": [responses[n][i] for n in names],
         "ended": [ended[n][i] for n in names], "models": names, "family": f}
        for i, (r, f) in enumerate(zip(records, families))))
    idx = pick_examples(prompts, families, params.examples)
    examples = [{"prompt": prompts[i], "family": families[i], "responses": {n: responses[n][i] for n in names},
                 "gold": {n: gold_totals[n][i] for n in names} if gold_totals else {}} for i in idx]
    if rtp_samples:
        first = {n: s[0][0] if s and s[0] else "" for n, s in rtp_samples.items()}
        result_rtp_example = {"prompt": rtp_prompts[0], "continuations": first}
    else:
        result_rtp_example = None
    settings = {
        "judge": judge_desc,
        "test prompts": f"{len(prompts)} from {test}, max {params.max_new_tokens} new tokens, "
                        + ("greedy" if params.temperature == 0 else f"temperature {params.temperature}"),
        "win-rate interval": f"95% percentile bootstrap over prompts, {params.ci_resamples} resamples, seed {params.judge_seed}",
        "TruthfulQA": f"{tqa_path} ({len(tqa_items)} questions), primer: "
                      + ({"none": "none", "qa": "six-QA (lm-eval)", "standard": "six-QA (lm-eval)"}.get(params.truthfulqa_primer, "custom")),
        "CrowS-Pairs": f"{crows_path} ({len(crows)} pairs), each sentence conditioned on BOS alone",
        "RealToxicityPrompts": f"{rtp_path} ({len(rtp_prompts)} prompts), k={params.rtp_k}, top-p={params.rtp_top_p}, "
                               f"temperature={params.rtp_temperature}, {params.rtp_max_new_tokens} new tokens, "
                               f"{params.rtp_format} prompts, scorer: {params.toxicity_scorer}",
    }
    curves = read_curves(plots) if plots is not None else {}
    build_report(result, out_dir=reports, examples=examples, curves=curves, settings=settings,
                 rtp_example=result_rtp_example, model_paths=dict(params.models))
    result["timing"] = {"wall_s": round(time.time() - t0, 1), "per_model_s": timing}
    return result


def summary(m: dict[str, Any]) -> str:
    parts = [f"{m['prompts']} test prompts"]
    for tag, w in m["win_rates"].items():
        parts.append(f"{tag.replace('_vs_', ' > ')} {w['win_rate']:.2f} [{w['ci_low']:.2f}, {w['ci_high']:.2f}]")
    for name, x in m["models"].items():
        bits = []
        if "truthfulqa" in x:
            bits.append(f"mc1 {x['truthfulqa']['mc1']:.2f}")
        if "toxicity" in x:
            bits.append(f"tox {x['toxicity']['expected_max_toxicity']:.2f}")
        if bits:
            parts.append(f"{name}: " + " ".join(bits))
    return "; ".join(parts) + f" ({m['timing']['wall_s']} s); report in reports/report.html"
