"""evaluate: compare models on held-out test prompts and the public benchmarks, and write the report.

Reads  the HF model folders named in `evaluate.models` (default models/base, models/sft, models/policy),
       data/prepared/test.jsonl (prompts no stage trained on), data/raw/world.json (gold judge and the
       held-out labelers; optional), the eval suites in the public formats (data/raw/eval/
       truthfulqa_mc.json, crows_pairs.csv, rtp.jsonl; each optional), the dvclive folders named by --plots
       (plots/<stage>: curves, PPO-style over-optimization tables) and the training stages' metrics files named
       by --stage-metrics (metrics/<stage>.json: wall time and throughput, best-of-n's gold per n, the reward
       model's held-out accuracy); only the files named are read, and each is optional
Writes metrics/evaluate.json (every number, `dvc metrics show/diff`), metrics/headline.json (the dozen
       numbers to compare across experiments), reports/report.html (self-contained), reports/report.md
       (+ reports/figures/*.png), reports/plots/*.csv (win rates, gold per family, gold vs KL: DVC plots),
       reports/responses.jsonl (every model's test responses, ready to be labeled by humans)
Run    rlhf evaluate

The steps (docs/evaluation.md has the exact definitions and their sources):
1. Every model in `evaluate.models` answers the test prompts (greedy by default); the gold judge scores
   the answers per task family, and every suite in `evaluate.suites` whose file exists runs on it:
   TruthfulQA MC1/MC2 and CrowS-Pairs as lm-evaluation-harness computes them, RealToxicityPrompts'
   expected maximum toxicity and toxicity probability (Gehman et al. 2020).
   Each model's KL from `evaluate.kl_reference` (SFT) is measured here on the same test prompts for every
   model (rlhf.kl: temperature-1 samples, summed log-ratios), so PPO, DPO, RLOO, GRPO, ... share one x axis.
2. Helpfulness: for every pair (A, B) in `evaluate.pairs` one judge (`rlhf.judges`: the world's held-out
   labelers, human labels, or a reward model as a proxy) picks the better answer per prompt (ties 0.5)
   -> win rate (InstructGPT fig. 1).
3. Every metric gets a 95% percentile bootstrap interval over its items (prompts, questions, pairs).
4. The metrics, the headline, the DVC plot tables, the responses and the report are written.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf import benchmarks as B
from rlhf.errors import StageError
from rlhf.io import PROMPT_SCHEMA, read_jsonl, write_json, write_jsonl
from rlhf.judges import JUDGES, RewardJudge, build_judge, judge_scores
from rlhf.params import require
from rlhf.suites import SUITES, Context, Suite



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
    """Seed of the labeler draw, the order in which a labeler sees the two answers, and the bootstraps."""
    ci_resamples: int
    """Bootstrap resamples for every 95% interval (win rates, gold, MC1/MC2, CrowS, toxicity)."""
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
    suites: list[str]
    """Benchmark suites to run, by name (truthfulqa, crows_pairs, toxicity, toxicity_respectful: rlhf.suites.SUITES); [] for data with no
    benchmark files (a user-data pipeline). A listed suite whose file is absent is skipped and noted."""
    batch_size: int
    """Sequences per forward pass when scoring and sampling."""
    seed: int
    """Sampling seed (test responses when temperature > 0, RTP continuations, the KL samples)."""
    kl_samples: int
    """Responses per test prompt sampled from each model at temperature 1 to estimate its KL from
    `kl_reference` (rlhf.kl; the x axis of the report's gold-vs-KL chart); 0 = no KL."""
    kl_reference: str
    """The model (a name in `models`, e.g. sft) every KL is measured from; absent from `models` = no KL."""
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
        for key in ("test_prompts", "rtp_prompts", "examples", "kl_samples"):
            require(getattr(self, key) >= 0, f"evaluate.{key}", "must be >= 0")
        for key in ("max_new_tokens", "rtp_k", "rtp_max_new_tokens", "batch_size", "ci_resamples"):
            require(getattr(self, key) > 0, f"evaluate.{key}", "must be > 0")
        require(0 < self.rtp_top_p <= 1, "evaluate.rtp_top_p", "must be in (0, 1]")
        require(self.rtp_temperature > 0, "evaluate.rtp_temperature", "must be > 0 (RTP samples)")
        require(self.temperature >= 0, "evaluate.temperature", "must be >= 0")
        require(self.rtp_format in ("raw", "chat"), "evaluate.rtp_format", "must be 'raw' or 'chat'")
        known = [s.name for s in SUITES]
        for name in self.suites:
            require(name in known, "evaluate.suites", f"unknown suite {name!r}; known: {', '.join(known)}")


# ----------------------------------------------------------------------------------------------
# Inputs


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


def command_that_writes(path: str | Path, dvc_yaml: Path = Path("dvc.yaml")) -> str:
    """`dvc repro <stage>` for the dvc.yaml stage whose outs hold `path` (read only to word an error)."""
    import yaml

    target = Path(path).as_posix().rstrip("/")
    try:
        stages = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8")).get("stages", {})
    except (OSError, AttributeError, yaml.YAMLError):
        stages = {}
    for name, stage in stages.items():
        outs = [next(iter(o)) if isinstance(o, dict) else o for o in (stage or {}).get("outs", [])]
        if target in (str(o).rstrip("/") for o in outs):
            return f"`dvc repro {name}` (or `rlhf {name}`)"
    return "the stage that writes it (see dvc.yaml)"


def check_models(models: dict[str, str]) -> None:
    """Every model folder exists; a missing one names the command that makes it."""
    from rlhf.models import check_model_dir

    for name, path in models.items():
        if not Path(path).is_dir():
            raise StageError(f"{path}: model '{name}' (evaluate.models.{name}) not found; make it with "
                             f"{command_that_writes(path)}, or remove it from evaluate.models")
        check_model_dir(path, f"model '{name}' (evaluate.models.{name})")


def load_suites(files: dict[str, Path | None], params: Params) -> tuple[list[tuple[Suite, Path, list]], dict[str, str]]:
    """(suite, file, items) for every suite in `evaluate.suites` whose file exists; `skipped` says why the
    other listed suites did not run (suites left out of `evaluate.suites` are neither run nor noted)."""
    unknown = set(files) - {s.option for s in SUITES}
    if unknown:
        raise TypeError(f"evaluate.run: unknown suite file(s) {sorted(unknown)}; known: {[s.option for s in SUITES]}")
    active, skipped = [], {}
    for suite in SUITES:
        if suite.name not in params.suites:
            continue
        path = files.get(suite.option)
        if path is None or not Path(path).is_file():
            skipped[suite.name] = f"{path}: not found" if path else "no file given"
            continue
        items = suite.load(Path(path), params)
        if items:
            active.append((suite, Path(path), items))
    return active, skipped


# ----------------------------------------------------------------------------------------------
# 1. One model: test answers, gold scores, suites


@dataclass
class ModelRun:
    metrics: dict[str, Any]
    responses: list[str]
    ended: list[bool]
    gold_totals: list[float]
    examples: dict[str, Any]
    """Per suite, an example for the report (e.g. an RTP continuation)."""


def evaluate_model(path: str, prompts: list[str], suites: list[tuple[Suite, Path, list]], gold, ctx: Context,
                   ref: Any = None) -> ModelRun:
    """`ref`: the KL reference (model, tokenizer), or None for no KL; "self" when `path` is the reference."""
    from rlhf.gold import answer_test_prompts
    from rlhf.models import load_causal_lm, load_tokenizer

    p = ctx.params
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path).to(ctx.device).eval()
    answers = answer_test_prompts(model, tokenizer, prompts, gold, max_new_tokens=p.max_new_tokens, device=ctx.device,
                                  temperature=p.temperature, batch_size=p.batch_size, seed=p.seed)
    responses, ended = answers.responses, answers.ended
    m: dict[str, Any] = {"length_words": round(sum(len(r.split()) for r in responses) / len(prompts), 2),
                         "ended_with_eos": answers.ended_share}
    totals: list[float] = []
    if answers.gold is not None:  # the gold summary with the total's interval over prompts
        totals = [gold.score(q, r)["total"] for q, r in zip(prompts, responses)]
        m["gold"] = answers.gold | ctx.interval(totals, "total")
    if ref is not None:
        kl = kl_from_reference(model, tokenizer, model if ref == "self" else ref, prompts, gold, ctx)
        if kl is not None:
            m["kl"] = kl
    examples = {}
    for suite, _, items in suites:
        m[suite.name], example = suite.evaluate(model, tokenizer, items, ctx)
        if example is not None:
            examples[suite.name] = example
    return ModelRun(m, responses, ended, totals, examples)


def kl_from_reference(model, tokenizer, ref: Any, prompts: list[str], gold, ctx: Context) -> dict[str, Any] | None:
    """KL(model ‖ reference) in nats per response on the test prompts (rlhf.kl.sampled_kl, the same samples
    and scoring for every model), with its interval over prompts, and the gold total of those temperature-1
    samples (the footing of best-of-n's gold). None when the two tokenizers differ (no common token space)."""
    from rlhf.kl import sampled_kl
    from rlhf.tokenization import same_tokenizer

    p, t0 = ctx.params, time.time()
    ref_model, ref_tokenizer = (ref, tokenizer) if ref is model else ref
    if not same_tokenizer(tokenizer, ref_tokenizer):
        return None
    out = sampled_kl(model, ref_model, tokenizer, prompts, samples=p.kl_samples, max_new_tokens=p.max_new_tokens,
                     seed=p.seed, batch_size=p.batch_size, device=ctx.device)
    ctx.cache["kl_s"] = ctx.cache.get("kl_s", 0.0) + time.time() - t0  # the cost evaluate's summary reports
    per_prompt = out.per_prompt()
    kl: dict[str, Any] = {"reference": p.kl_reference, "mean": round(sum(per_prompt) / len(per_prompt), 4),
                          **ctx.interval(per_prompt, "mean"), "samples": len(out.kl)}
    if gold is not None:
        k = out.samples
        scores = [gold.score(prompts[i // k], r)["total"] for i, r in enumerate(out.responses)]
        per_prompt_gold = [sum(scores[i: i + k]) / k for i in range(0, len(scores), k)]
        kl["gold_sampled"] = round(sum(scores) / len(scores), 4)
        kl.update(ctx.interval(per_prompt_gold, "gold_sampled"))
    return kl


def load_reference(params: Params, skipped: dict[str, str], device) -> tuple[Any, Any] | None:
    """(model, tokenizer) of `evaluate.kl_reference`, or None (noted in `skipped`) when no KL is measured."""
    from rlhf.models import load_causal_lm, load_tokenizer

    if params.kl_samples == 0:
        return None
    path = params.models.get(params.kl_reference)
    if path is None:
        skipped["kl"] = f"evaluate.kl_reference '{params.kl_reference}' is not in evaluate.models"
        return None
    return load_causal_lm(path).to(device).eval(), load_tokenizer(path)


def evaluate_models(prompts: list[str], suites: list[tuple[Suite, Path, list]], gold, ctx: Context,
                    ref: tuple[Any, Any] | None = None) -> tuple[dict[str, ModelRun], dict[str, float]]:
    from rlhf.progress import progress

    p = ctx.params
    runs, timing = {}, {}
    with progress() as bar:
        task = bar.add_task("evaluate", total=len(p.models), info="")
        for name, path in p.models.items():
            t0 = time.time()
            bar.update(task, info=name)
            runs[name] = evaluate_model(path, prompts, suites, gold, ctx,
                                        ref=None if ref is None else "self" if name == p.kl_reference else ref)
            timing[name] = round(time.time() - t0, 1)
            bar.advance(task)
    return runs, timing


# ----------------------------------------------------------------------------------------------
# 2. Win rates


def family_win_rates(outcomes: Sequence[float], families: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The same verdicts, family by family: where a pair's win rate comes from. A family whose answers are
    mostly identical (ties, 0.5) or mostly wrong on both sides (a coin flip) pulls the whole rate toward 0.5."""
    by: dict[str, list[float]] = {}
    for f, x in zip(families, outcomes, strict=True):
        by.setdefault(f, []).append(x)
    return {f: {"win_rate": round(sum(v) / len(v), 4), "prompts": len(v), "ties": v.count(0.5)}
            for f, v in sorted(by.items())}


def win_rates(judge, pairs: list[list[str]], prompts: list[str], runs: dict[str, ModelRun], params: Params,
              skipped: dict[str, str], families: Sequence[str] = ()) -> dict[str, Any]:
    """Per pair [A, B]: the judge's win rate of A with its interval, beside the gold judge's own verdict, and per
    task family when the prompts have more than one (and the judge judged every prompt, so they line up)."""
    out: dict[str, Any] = {}
    for a, b in pairs:
        tag = f"{a}_vs_{b}"
        verdict = judge.compare(prompts, runs[a].responses, runs[b].responses, tag=tag)
        if not verdict.outcomes:
            skipped[f"win_rate {tag}"] = "no labeled comparisons for this pair"
            continue
        w = B.win_rate(verdict.outcomes, resamples=params.ci_resamples, seed=params.judge_seed)
        if verdict.unjudged:
            w["unlabeled"] = verdict.unjudged
        w["a_length_words"] = runs[a].metrics["length_words"]
        w["b_length_words"] = runs[b].metrics["length_words"]
        if runs[a].gold_totals:
            # Noise-free reference: the gold judge's own verdict per prompt (not a labeler's).
            w["gold_win_rate"] = round(sum(judge_scores(runs[a].gold_totals, runs[b].gold_totals)) / len(prompts), 4)
        if len(set(families)) > 1 and len(verdict.outcomes) == len(families):
            w["by_family"] = family_win_rates(verdict.outcomes, families)
        out[tag] = w
    return out


# ----------------------------------------------------------------------------------------------
# 4. Outputs beside metrics/evaluate.json


def headline_numbers(result: dict[str, Any], pairs: list[list[str]], reward_stage: dict[str, Any] | None) -> dict[str, Any]:
    """The numbers to compare across experiments (`dvc metrics show metrics/headline.json`): the win rates
    against the first pair's B (e.g. every policy vs SFT) with intervals, and per model the gold total, the KL
    from the reference, TruthfulQA MC1 and expected max toxicity; the reward model's held-out accuracy (from
    the reward stage's metrics) when known."""
    out: dict[str, Any] = {}
    base = pairs[0][1] if pairs else None
    wins = {t: w for t, w in result["win_rates"].items() if t.endswith(f"_vs_{base}")}
    if wins:
        out["win_rate"] = {t: {"mean": w["win_rate"], "low": w["ci_low"], "high": w["ci_high"]} for t, w in wins.items()}
    for key, get in (("gold", lambda m: m.get("gold", {}).get("total")),
                     ("kl", lambda m: m.get("kl", {}).get("mean")),
                     ("truthfulqa_mc1", lambda m: m.get("truthfulqa", {}).get("mc1")),
                     ("toxicity", lambda m: m.get("toxicity", {}).get("expected_max_toxicity")),
                     ("toxicity_respectful", lambda m: m.get("toxicity_respectful", {}).get("expected_max_toxicity"))):
        values = {n: get(m) for n, m in result["models"].items() if get(m) is not None}
        if values:
            out[key] = values
    heldout = (reward_stage or {}).get("heldout")
    accuracy = heldout.get("accuracy_labels") if isinstance(heldout, dict) else None
    if isinstance(accuracy, (int, float)):
        out["rm_accuracy"] = accuracy
    return out


def write_plot_tables(directory: Path, result: dict[str, Any], stages: dict[str, dict[str, Any]]) -> None:
    """CSV tables that dvc.yaml's `plots:` draws (`dvc plots show`, `dvc plots diff` across experiments)."""
    from rlhf.io import atomic_write_text
    from rlhf.report import gold_kl_points

    rows = ["pair,win_rate,ci_low,ci_high,gold_win_rate"]
    rows += [f"{t.replace('_vs_', ' vs ')},{w['win_rate']},{w['ci_low']},{w['ci_high']},{w.get('gold_win_rate', '')}"
             for t, w in result["win_rates"].items()]
    atomic_write_text(directory / "win_rates.csv", "\n".join(rows) + "\n")
    rows = ["model_family,family,model,gold_total"]
    gold = {n: m["gold"] for n, m in result["models"].items() if "gold" in m}
    for fam in sorted({f for g in gold.values() for f in g["by_family"]}):
        rows += [f"{fam}: {n},{fam},{n},{g['by_family'][fam]}" for n, g in gold.items() if fam in g["by_family"]]
    rows += [f"all: {n},all,{n},{g['total']}" for n, g in gold.items()]
    atomic_write_text(directory / "gold_by_family.csv", "\n".join(rows) + "\n")
    points = [p for p in gold_kl_points(result["models"], stages.get("bestofn")) if "gold_sampled" in p]
    if points:  # every policy and best-of-n on Gao et al. (2022)'s axes (gold needs the world's judge)
        rows = ["name,kind,kl,sqrt_kl,gold,gold_sampled"]
        rows += [f"{p['name']},{p['kind']},{p['kl']},{p['sqrt_kl']},{p.get('gold', '')},{p.get('gold_sampled', '')}"
                 for p in points]
        atomic_write_text(directory / "gold_vs_kl.csv", "\n".join(rows) + "\n")
    else:  # no KL measured this time: a table from an earlier run would describe other models
        (directory / "gold_vs_kl.csv").unlink(missing_ok=True)


def run_information(params: Params, device, params_file: Path | None) -> dict[str, str]:
    """Commit, date, device, library versions and the training stages' params, for the report."""
    import datetime
    import platform
    import subprocess

    import torch
    import transformers

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown (not a git checkout)"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += " (with uncommitted changes)"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    info = {"git commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": f"{device} ({name})",
            "versions": f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}"}
    info.update(training_params(params_file))
    return info


def training_params(params_file: Path | None) -> dict[str, str]:
    """`params: <stage>` -> 'key=value, ...' for every section of the params file but evaluate's."""
    import yaml

    if params_file is None or not Path(params_file).is_file():
        return {"training params": "not recorded (no params file given)"}
    data = yaml.safe_load(Path(params_file).read_text(encoding="utf-8")) or {}
    return {f"params: {stage}": ", ".join(f"{k}={v}" for k, v in section.items())
            for stage, section in data.items() if stage != "evaluate" and isinstance(section, dict)}


def write_responses(path: Path, records: list[dict[str, Any]], families: list[str], runs: dict[str, ModelRun]) -> None:
    """Every model's answers in the candidates format `rlhf label --candidates` reads."""
    names = list(runs)
    write_jsonl(path, ({"prompt_id": r["id"], "prompt": r["prompt"], "responses": [runs[n].responses[i] for n in names],
                        "ended": [runs[n].ended[i] for n in names], "models": names, "family": f}
                       for i, (r, f) in enumerate(zip(records, families))))


def report_settings(params: Params, judge, test: Path, n_prompts: int, suites: list[tuple[Suite, Path, list]]) -> dict[str, str]:
    settings = {
        "judge": judge.description,
        "test prompts": f"{n_prompts} from {test}, max {params.max_new_tokens} new tokens, "
                        + ("greedy" if params.temperature == 0 else f"temperature {params.temperature}"),
        "intervals": f"95% percentile bootstrap over items (prompts, questions, pairs), {params.ci_resamples} "
                     f"resamples, seed {params.judge_seed}",
    }
    if params.kl_samples and params.kl_reference in params.models:
        ref = params.kl_reference
        settings["KL"] = (f"KL(π ‖ π_{ref}) of each model on the {n_prompts} test prompts: {params.kl_samples} responses "
                          f"per prompt sampled from the model at temperature 1 (seed {params.seed}, max "
                          f"{params.max_new_tokens} new tokens); per response Σ_t log π − log π_{ref} over its tokens "
                          "up to EOS, averaged over responses (an unbiased estimate, nats per response), 95% interval "
                          "over prompts (rlhf/kl.py)")
    settings.update({suite.title.split(": ")[-1]: suite.setting(path, items, params) for suite, path, items in suites})
    return settings


# ----------------------------------------------------------------------------------------------
# The stage


def run(params: Params, *, test: Path, world: Path | None, plots: Sequence[Path] = (), reports: Path, metrics: Path,
        headline: Path | None = None, stage_metrics: Sequence[Path] = (), params_file: Path | None = None,
        **suite_files: Path | None) -> dict[str, Any]:
    """`suite_files`: one file per suite of `rlhf.suites.SUITES`, by its option (truthfulqa, crows_pairs,
    rtp); None or a missing file skips the suite. `plots`: the dvclive folders of the stages whose curves the
    report shows (plots/<stage>, each named by its stage); `stage_metrics`: the training stages' metrics files
    (metrics/<stage>.json) for the cost table, best-of-n's curve and the reward model's accuracy; only these
    are read, and a missing one is noted, never fatal. `headline` defaults to headline.json beside `metrics`;
    `params_file` feeds the report's run information."""
    from rlhf.devices import pick_device, setup_torch
    from rlhf.gold import load_judge
    from rlhf.lengths import length_tally

    t0 = time.time()
    device = pick_device(params.device)
    setup_torch(params.threads, device)
    check_models(params.models)
    records = read_jsonl(test, PROMPT_SCHEMA)[: params.test_prompts or None]
    prompts = [r["prompt"] for r in records]
    gold = load_judge(world)
    families = [gold.family(p) for p in prompts] if gold else [r.get("family", "all") for r in records]
    suites, skipped = load_suites(suite_files, params)
    judge = build_judge(params.judge, gold=gold, world=world, seed=params.judge_seed, labels=params.labels,
                        reward_model=params.reward_model, batch_size=params.batch_size, device=device)
    ctx = Context(params, device)
    lengths = length_tally()  # prompts and benchmark contexts too long for a model lose their start

    # 1. Every model answers the test prompts, takes every suite, and has its KL from the reference measured.
    ref = load_reference(params, skipped, device)
    runs, timing = evaluate_models(prompts, suites, gold, ctx, ref)
    if ref is not None:
        skipped.update({f"kl {n}": "its tokenizer differs from the KL reference's" for n, r in runs.items()
                        if "kl" not in r.metrics})
    if isinstance(judge, RewardJudge):
        for run_ in runs.values():
            rewards = judge.rewards(prompts, run_.responses)
            run_.metrics["rm_score"] = round(sum(rewards) / len(rewards), 4)

    # 2. Win rates, judged once per pair by the one judge; 3. intervals come with every metric.
    result: dict[str, Any] = {"prompts": len(prompts), "max_new_tokens": params.max_new_tokens, "models": {n: r.metrics for n, r in runs.items()},
                              "win_rates": win_rates(judge, params.pairs, prompts, runs, params, skipped, families)}
    result["lengths"] = lengths.report("evaluate")
    if skipped:
        result["skipped"] = skipped
    off = [s.name for s in SUITES if s.name not in params.suites]
    if off:  # switched off in evaluate.suites: the report leaves their sections out
        result["suites_off"] = off
    write_json(metrics, result)

    # 4. The headline, the DVC plot tables, the responses for human labeling, and the report.
    write_outputs(result, params, runs, records=records, families=families, gold=gold, judge=judge, test=test,
                  suites=suites, plots=plots, stage_metrics=stage_metrics, reports=Path(reports),
                  headline=Path(headline or Path(metrics).with_name("headline.json")),
                  run_info=run_information(params, device, params_file))
    result["timing"] = {"wall_s": round(time.time() - t0, 1), "per_model_s": timing, "kl_s": round(ctx.cache.get("kl_s", 0.0), 1)}
    return result


def write_outputs(result: dict[str, Any], params: Params, runs: dict[str, ModelRun], *, records, families, gold, judge,
                  test: Path, suites, plots: Sequence[Path], stage_metrics: Sequence[Path], reports: Path,
                  headline: Path, run_info: dict[str, str]) -> None:
    """Step 4: the headline, the DVC plot tables, the responses for human labeling, and the report."""
    from rlhf.report import build_report, read_curves, read_overoptimization, read_stage_metrics

    prompts = [r["prompt"] for r in records]
    stages, missing = read_stage_metrics(stage_metrics)
    write_json(headline, headline_numbers(result, params.pairs, stages.get("reward")))
    write_plot_tables(reports / "plots", result, stages)
    write_responses(reports / "responses.jsonl", records, families, runs)
    examples = [{"prompt": prompts[i], "family": families[i], "responses": {n: r.responses[i] for n, r in runs.items()},
                 "gold": {n: r.gold_totals[i] for n, r in runs.items()} if gold else {}}
                for i in pick_examples(prompts, families, params.examples)]
    build_report(result, out_dir=reports, examples=examples, curves=read_curves(plots),
                 settings=report_settings(params, judge, test, len(prompts), suites),
                 suite_examples={s.name: {n: r.examples[s.name] for n, r in runs.items() if s.name in r.examples}
                                 for s, _, _ in suites},
                 model_paths=dict(params.models), pairs=params.pairs, judge_who=judge.who,
                 run_info=run_info, overoptimization=read_overoptimization(plots),
                 stage_metrics=stages, missing_metrics=missing)


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
    kl = {n: x["kl"]["mean"] for n, x in m["models"].items() if "kl" in x}
    if kl:
        parts.append("KL from SFT " + ", ".join(f"{n} {v:.2f}" for n, v in kl.items())
                     + f" ({m['timing']['kl_s']} s of sampling and scoring)")
    return "; ".join(parts) + f" ({m['timing']['wall_s']} s); report in reports/report.html"
