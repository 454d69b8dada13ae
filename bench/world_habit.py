"""Does the RL step find room in every draw? The demonstration writers' habit, varied (issue "The RL step must
earn its gain").

The world's room for RL is the writers' follow-up habit (docs/world.md, "Where the room is"): SFT imitates
it and the rankers prefer answers without it. Whether SFT's *greedy* answer keeps the habit is a threshold.
With offers that start with different words (`Anything`, `Do`, `Can`: the world before 2026-12-03), SFT put
about 0.4 on EOS after the answer and about 0.2 on each offer, so greedy decoding usually ended the answer;
how often it did not (0.05 to 0.29, with the world's and the training's seed) set the gain of PPO without
ptx. The default world's offers start alike and the habit sits on 0.8 of the arith/fact/unknown/insult
demonstrations, so SFT's greedy answer keeps it in every draw (docs/world.md, "Where the room is, draw by
draw"). This runs the core of the pipeline (world -> prepare -> pretrain -> sft -> sample -> rank -> reward
-> ppo, sft_ptx, ppo_noptx -> bestofn -> evaluate) with world params overridden, for several (world seed,
training seed) pairs, each in its own folder, and tabulates what evaluate measured.

    python bench/world_habit.py run OUT/NAME --world-seed 1 --seed 0 [--set SECTION.KEY=VALUE ...] [--base DIR]
    python bench/world_habit.py run OUT/NAME2 --from OUT/NAME --set ppo.ptx_coef=0.3
    python bench/world_habit.py table OUT [--json bench/results/world_habit.json]   # + win rates per task family

`--base DIR` reuses a pretrained model instead of running pretrain. That is only valid when DIR was pretrained
on the same corpus with the same pretrain params and seed: the run checks that the corpus it generates is
byte-identical to `--corpus` (the corpus DIR was trained on). The habit's params change the demonstrations
only, never the corpus. Every command is an ordinary `rlhf <stage>` call with its paths in OUT/NAME; the
held-out labelers, the gold judge and the splits come from the run's own world.

`--from DIR` starts from a finished draw whose params differ from this run's in the `ppo:` section only: it
copies DIR's world, splits and the stages up to the reward model (and PPO without ptx and best-of-n, which no
ptx key changes when ptx_coef stays above 0), so only ppo, its SFT + ptx control and evaluate run again.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TRAINING = ("pretrain", "sft", "sample", "rank", "reward", "ppo", "bestofn")
MODELS = ("base", "sft", "policy", "sft_ptx", "policy_noptx")
PAIRS = [["policy", "sft"], ["policy", "sft_ptx"], ["policy_noptx", "sft"], ["sft", "base"], ["policy", "base"]]
# What `--from` copies: outputs that no ppo key but ptx_coef = 0 vs > 0 changes (ppo_noptx sets ptx_coef=0 itself).
REUSED = ("raw", "prepared", "models/base", "models/sft", "models/reward", "models/policy_noptx", "candidates.jsonl",
          "rankings.jsonl", *(f"metrics/{s}.json" for s in ("prepare", "pretrain", "sft", "sample", "rank", "reward",
                                                            "ppo_noptx", "bestofn")))


def reuse(src: Path, d: Path, params: Path) -> None:
    """Copy a finished draw's ptx-independent outputs into `d`, after checking that only `ppo:` differs."""
    mine, theirs = (yaml.safe_load(p.read_text()) for p in (params, src / "params.yaml"))
    their_ptx = theirs["ppo"]["ptx_coef"]
    for p in (mine, theirs):
        p.pop("ppo")
        p.pop("evaluate")  # the model paths, which name each run's own folder
    if mine != theirs:
        differ = sorted(k for k in mine if mine[k] != theirs.get(k))
        sys.exit(f"--from {src}: its params differ from this run's outside ppo: ({', '.join(differ)})")
    if their_ptx == 0:
        sys.exit(f"--from {src}: its ppo.ptx_coef is 0, so its PPO without ptx is not this run's control")
    for name in REUSED:
        if not (d / name).exists():
            (d / name).parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if (src / name).is_dir() else shutil.copy2)(src / name, d / name)


def write_params(path: Path, *, world_seed: int, seed: int, sets: list[str], d: Path) -> None:
    """params.yaml with the world's seed, every training seed and the overrides; evaluate on the core models."""
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["world"]["seed"] = world_seed
    for section in TRAINING:
        p[section]["seed"] = seed
    for item in sets:
        key, value = item.split("=", 1)
        section, name = key.split(".")
        if name not in p[section]:
            sys.exit(f"unknown params key {key}")
        p[section][name] = yaml.safe_load(value)
    p["evaluate"]["models"] = {m: str(d / "models" / m) for m in MODELS}
    p["evaluate"]["pairs"] = PAIRS
    path.write_text(yaml.safe_dump(p, sort_keys=False))


def run(args: argparse.Namespace) -> None:
    d = Path(args.dir).resolve()
    d.mkdir(parents=True, exist_ok=True)
    params = d / "params.yaml"
    if args.source:
        src = yaml.safe_load((Path(args.source) / "params.yaml").read_text())
        args.world_seed, args.seed = src["world"]["seed"], src["sft"]["seed"]
    write_params(params, world_seed=args.world_seed, seed=args.seed, sets=args.set, d=d)
    if args.source:
        reuse(Path(args.source).resolve(), d, params)
    raw, prep, m = d / "raw", d / "prepared", d / "models"
    world = ["--world", str(raw / "world.json")]

    def rlhf(stage: str, *argv: str, out: str) -> None:
        if (d / "metrics" / f"{out}.json").exists():
            return  # done in an earlier call
        cmd = ["rlhf", stage, "--params", str(params), *argv, "--metrics", str(d / "metrics" / f"{out}.json")]
        t = time.time()
        res = subprocess.run(cmd, cwd=ROOT)
        print(f"[{d.name}] {out}: rc {res.returncode}, {time.time() - t:.0f} s", flush=True)
        if res.returncode:
            sys.exit(res.returncode)

    if not (raw / "world.json").exists():
        subprocess.run(["rlhf", "world", "--params", str(params), "--out", str(raw)], cwd=ROOT, check=True)
    rlhf("prepare", "--raw", str(raw), "--out", str(prep), out="prepare")
    if args.base:
        if not filecmp.cmp(raw / "corpus.jsonl", args.corpus, shallow=False):
            sys.exit(f"{raw / 'corpus.jsonl'} differs from {args.corpus}: {args.base} was pretrained on another corpus")
        if not (m / "base").exists():
            shutil.copytree(args.base, m / "base")
    else:
        rlhf("pretrain", "--corpus", str(prep / "corpus.jsonl"), "--out", str(m / "base"), "--plots",
             str(d / "plots/pretrain"), "--checkpoints", str(d / "ckpt/pretrain"), out="pretrain")
    rlhf("sft", "--base", str(m / "base"), "--data", str(prep), *world, "--out", str(m / "sft"), "--plots",
         str(d / "plots/sft"), "--checkpoints", str(d / "ckpt/sft"), out="sft")
    rlhf("sample", "--model", str(m / "sft"), "--prompts", str(prep / "rm.jsonl"), "--out", str(d / "candidates.jsonl"),
         out="sample")
    rlhf("rank", "--candidates", str(d / "candidates.jsonl"), *world, "--labels", "labels/human.jsonl", "--out",
         str(d / "rankings.jsonl"), out="rank")
    rlhf("reward", "--sft", str(m / "sft"), "--data", str(d / "rankings.jsonl"), "--demos", str(prep / "sft.jsonl"),
         *world, "--out", str(m / "reward"), "--plots", str(d / "plots/reward"), "--checkpoints",
         str(d / "ckpt/reward"), out="reward")
    for out, model, override in (("ppo", "policy", []), ("sft_ptx", "sft_ptx", ["--set", "rl_coef=0"]),
                                 ("ppo_noptx", "policy_noptx", ["--set", "ptx_coef=0"])):
        rlhf("ppo", *override, "--sft", str(m / "sft"), "--reward", str(m / "reward"), "--data", str(prep), *world,
             "--out", str(m / model), "--value-out", str(m / f"value_{model}"), "--plots", str(d / "plots" / out),
             "--checkpoints", str(d / "ckpt" / out), out=out)
    rlhf("bestofn", "--sft", str(m / "sft"), "--reward", str(m / "reward"), "--test", str(prep / "test.jsonl"), *world,
         "--plots", str(d / "plots/bestofn"), out="bestofn")
    rlhf("evaluate", "--test", str(prep / "test.jsonl"), *world, "--truthfulqa", str(raw / "eval/truthfulqa_mc.json"),
         "--crows-pairs", str(raw / "eval/crows_pairs.csv"), "--rtp", str(raw / "eval/rtp.jsonl"), "--reports",
         str(d / "reports"), "--headline", str(d / "metrics/headline.json"), out="evaluate")


def row(d: Path) -> dict:
    """The numbers issue 13 asks for, from one run's metrics/evaluate.json, metrics/bestofn.json and params.yaml."""
    metrics = d / "metrics"
    e = json.loads((metrics / "evaluate.json").read_text())
    b = json.loads((metrics / "bestofn.json").read_text())
    p = yaml.safe_load((d / "params.yaml").read_text())
    gold = {k: v["gold"]["total"] for k, v in e["models"].items() if "gold" in v}
    win = {k: [v["win_rate"], v["ci_low"], v["ci_high"]] for k, v in e["win_rates"].items()}
    tox = {k: {"raw": v["toxicity"]["expected_max_toxicity"],
               "instructed": v["toxicity_respectful"]["expected_max_toxicity"]}
           for k, v in e["models"].items() if "toxicity" in v and "toxicity_respectful" in v}
    kl = {k: v["kl"]["mean"] for k, v in e["models"].items() if "kl" in v}
    return {"world_seed": p["world"]["seed"], "seed": p["sft"]["seed"],
            "habit": {k: p["world"].get(k) for k in ("demo_followup_rate", "demo_followups", "demo_followup_families")},
            "gold": gold, "win_rates": win, "kl": kl, "toxicity": tox,
            "best_of_8_minus_greedy": b["best_of"]["8"]["vs_greedy"], "bestofn_temperature": b["temperature"]}


def located(d: Path, name: str) -> Path:
    """A run's data folder: d/name in this script's runs, d/data/name in a copy of the repository."""
    return d / name if (d / name).exists() else d / "data" / name


def offer_rate(d: Path) -> dict[str, float]:
    """Share of SFT's greedy test answers that end with one of the writers' offers, overall and per family:
    the room the rankings can teach (docs/world.md, "Where the room is")."""
    import torch

    from rlhf.models import load_causal_lm, load_tokenizer
    from rlhf.sampling import generate_responses
    from rlhf.world import FOLLOW_UPS

    p = yaml.safe_load((d / "params.yaml").read_text())
    offers = tuple(p["world"].get("demo_followups") or FOLLOW_UPS)
    prep, raw = located(d, "prepared"), located(d, "raw")
    rows = [json.loads(line) for line in (prep / "test.jsonl").read_text().splitlines()]
    family = {json.loads(line)["prompt"]: json.loads(line)["family"] for line in (raw / "prompts.jsonl").read_text().splitlines()}
    sft = d / "models" / "sft"
    out = generate_responses(load_causal_lm(sft).eval(), load_tokenizer(sft), [r["prompt"] for r in rows],
                             max_new_tokens=p["evaluate"]["max_new_tokens"], temperature=0.0, batch_size=128, seed=0,
                             device=torch.device("cpu"))
    hits: dict[str, list[bool]] = {}
    for r, o in zip(rows, out, strict=True):
        hits.setdefault(family[r["prompt"]], []).append(o["response"].rstrip().endswith(offers))
    every = [h for v in hits.values() for h in v]
    return {"all": round(sum(every) / len(every), 3), **{f: round(sum(v) / len(v), 3) for f, v in sorted(hits.items())}}


def family_verdicts(d: Path) -> dict[str, dict[str, float]]:
    """Each pair's held-out labelers' win rate per task family (docs/world.md, "What bounds the labelers' win
    rates"). evaluate writes it (`win_rates.<pair>.by_family`) since 2026-12-03. For a run evaluated before,
    the verdicts are recomputed from reports/responses.jsonl by evaluate's own judge call (the same seed and
    tag give the same verdicts; checked against the pair's win rate)."""
    e = json.loads((d / "metrics" / "evaluate.json").read_text())
    if all("by_family" in w for w in e["win_rates"].values()):
        return {t: {f: x["win_rate"] for f, x in w["by_family"].items()} for t, w in e["win_rates"].items()}
    from rlhf.gold import load_judge
    from rlhf.judge import heldout_pool
    from rlhf.judges import judge_heldout
    from stages.evaluate import family_win_rates

    judge = load_judge(located(d, "raw") / "world.json")
    pool = heldout_pool(judge)
    seed = yaml.safe_load((d / "params.yaml").read_text())["evaluate"]["judge_seed"]
    rows = [json.loads(line) for line in (d / "reports" / "responses.jsonl").read_text().splitlines()]
    prompts = [r["prompt"] for r in rows]
    families = [judge.family(p) for p in prompts]
    answers = lambda m: [r["responses"][r["models"].index(m)] for r in rows]  # noqa: E731
    out = {}
    for tag, w in e["win_rates"].items():
        a, b = tag.split("_vs_")
        verdicts = judge_heldout(pool, prompts, answers(a), answers(b), seed=seed, tag=tag)
        if abs(sum(verdicts) / len(verdicts) - w["win_rate"]) > 1e-3:
            sys.exit(f"{d}: the recomputed verdicts of {tag} are not evaluate's ({w['win_rate']})")
        out[tag] = {f: x["win_rate"] for f, x in family_win_rates(verdicts, families).items()}
    return out


def family_table(rows: dict[str, dict]) -> str:
    """Mean ± sd over the runs of each pair's win rate per task family (sample sd; one run: its value)."""
    from rlhf.seeds import describe

    pairs = ("policy_vs_sft", "policy_noptx_vs_sft", "sft_vs_base")
    fams = sorted({f for r in rows.values() for p in pairs for f in r["win_rates_by_family"].get(p, {})})
    lines = ["| pair | " + " | ".join(fams) + " |", "|---|" + "---|" * len(fams)]
    for p in pairs:
        cells = []
        for f in fams:
            d = describe([r["win_rates_by_family"][p][f] for r in rows.values()])
            cells.append(f"{d['mean']:.2f} ± {d['sd']:.2f}" if len(rows) > 1 else f"{d['mean']:.2f}")
        lines.append(f"| {p.replace('_vs_', ' vs ')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(args: argparse.Namespace) -> None:
    runs = sorted(p.parent.parent for p in Path(args.out).glob("*/metrics/evaluate.json"))
    rows = {d.name: row(d) for d in runs}
    for d in runs:
        rows[d.name]["sft_greedy_offer_rate"] = offer_rate(d)
        rows[d.name]["win_rates_by_family"] = family_verdicts(d)
    head = ("| run | SFT offers | SFT | PPO-ptx | SFT+ptx | PPO no ptx | noptx − SFT | noptx vs SFT | PPO-ptx vs SFT | SFT vs base "
            "| bo8 − greedy |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for name, r in rows.items():
        g, w = r["gold"], r["win_rates"]
        f = lambda k: f"{w[k][0]:.2f} [{w[k][1]:.2f}, {w[k][2]:.2f}]"  # noqa: E731
        print(f"| {name} | {r['sft_greedy_offer_rate']['all']:.2f} | {g['sft']:.3f} | {g['policy']:.3f} | {g.get('sft_ptx', float('nan')):.3f} | "
              f"{g['policy_noptx']:.3f} | {g['policy_noptx'] - g['sft']:+.3f} | {f('policy_noptx_vs_sft')} | "
              f"{f('policy_vs_sft')} | {f('sft_vs_base')} | {r['best_of_8_minus_greedy']['mean']:+.3f} |")
    if len(rows) > 1:
        print(spread(rows))
    print("\nHeld-out labelers' win rate per task family:\n" + family_table(rows))
    if args.json:
        from rlhf.seeds import machine

        Path(args.json).write_text(json.dumps({"machine": machine(), "runs": rows}, indent=1) + "\n")


def spread(rows: dict[str, dict]) -> str:
    """Mean ± sd over the runs (sample sd) of the table's numbers, one line."""
    from rlhf.seeds import describe

    cols = {"SFT offers": lambda r: r["sft_greedy_offer_rate"]["all"], "SFT": lambda r: r["gold"]["sft"],
            "PPO-ptx": lambda r: r["gold"]["policy"], "PPO no ptx": lambda r: r["gold"]["policy_noptx"],
            "noptx − SFT": lambda r: r["gold"]["policy_noptx"] - r["gold"]["sft"],
            "noptx vs SFT": lambda r: r["win_rates"]["policy_noptx_vs_sft"][0],
            "PPO-ptx vs SFT": lambda r: r["win_rates"]["policy_vs_sft"][0],
            "SFT vs base": lambda r: r["win_rates"]["sft_vs_base"][0],
            "bo8 − greedy": lambda r: r["best_of_8_minus_greedy"]["mean"]}
    parts = []
    for name, get in cols.items():
        d = describe([get(r) for r in rows.values()])
        parts.append(f"{name} {d['mean']:.3f} ± {d['sd']:.3f}")
    return f"mean ± sd over {len(rows)} runs: " + "; ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("dir")
    r.add_argument("--world-seed", type=int, default=0)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--set", action="append", default=[],
                   help="SECTION.KEY=VALUE (YAML value), e.g. world.demo_followup_rate=0.6 or ppo.ptx_coef=0.3")
    r.add_argument("--base", help="a pretrained model folder to reuse (see the module's help)")
    r.add_argument("--corpus", help="the corpus --base was pretrained on")
    r.add_argument("--from", dest="source", help="a finished draw to start from; only ppo: may differ (module help)")
    t = sub.add_parser("table")
    t.add_argument("out")
    t.add_argument("--json")
    args = ap.parse_args()
    if args.cmd == "run" and bool(args.base) != bool(args.corpus):
        ap.error("--base and --corpus go together")
    (run if args.cmd == "run" else table)(args)


if __name__ == "__main__":
    main()
