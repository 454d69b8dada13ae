"""Results over training seeds: queue the pipeline once per seed with DVC, then summarize the spread.

`rlhf seeds run` queues one DVC experiment per seed (`dvc exp run --queue -n seed-<s> -S <section>.seed=<s>
...`) and runs the queue (`dvc exp run --run-all`); each experiment runs in its own temporary copy of
the repository, so the workspace is left as it was. Every params section with a `seed` key gets the
seed, except the sections that define what is measured and on what: the world and its splits
(`world`, `prepare`) and the evaluation (`evaluate`: the held-out labelers' draws and the bootstrap).
Seed 0 is the default run, restored from DVC's run cache when `dvc repro` has already produced it.

`rlhf seeds summarize` reads each experiment's metrics files (`dvc exp show --json`, or folders with a
metrics/ directory), picks the headline numbers (HEADLINE below: gold per model, win rates, RM
accuracy, toxicity, TruthfulQA MC1/MC2, best-of-n), and writes per number: mean, sample standard
deviation, min, max and a 95% Student-t interval of the mean over seeds, with the per-seed values;
as JSON and as a markdown table, with the CPU and torch version that produced them.

Pure helpers (flattening, selection, statistics, the t quantile) are unit-tested in tests/test_seeds.py.
"""

from __future__ import annotations

import fnmatch
import json
import math
import platform
import re
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rlhf.errors import StageError

# Sections whose seed stays fixed across the sweep: what the world is, how it is split, how models are judged.
FIXED_SECTIONS = ("world", "prepare", "evaluate")

# What both judging stages measure (evaluate: the core models; compare: the other algorithms), per model and pair.
JUDGED = (
    "models.*.gold.total",
    "win_rates.*.win_rate",
    "win_rates.*.gold_win_rate",
    "win_rates.*.ci_low",  # each seed's own bootstrap interval: "above 0.5 in every seed" needs them
    "win_rates.*.ci_high",
    "models.*.toxicity*.expected_max_toxicity",
    "models.*.toxicity*.toxicity_probability",
    "models.*.truthfulqa.mc1",
    "models.*.truthfulqa.mc2",
    "models.*.crows_pairs.pct_stereotype",
    "models.*.kl.mean",
)
# Headline numbers, as glob patterns over flattened metric paths "<metrics file stem>.<key>.<key>...".
# A pattern that matches nothing (a stage that did not run, a model not evaluated) is left out.
HEADLINE = (
    *(f"{stage}.{pattern}" for stage in ("evaluate", "compare") for pattern in JUDGED),
    "reward.heldout.accuracy_gold",
    "reward.heldout.accuracy_labels",
    "reward.heldout.spearman_gold_within_prompt",
    "bestofn.best_of.*.gold.mean",
    "bestofn.best_of.*.proxy.mean",
    "bestofn.sft_greedy.gold.mean",
    "bestofn.best_of.*.vs_greedy.mean",
    "ppo.test.*.gold.total",
    "ppo.final_rollout.kl",
    "ppo.corpus_logprob.tax",
    "reward_round2.heldout.accuracy_gold",
    "*.timing.wall_s",
    "*.timing.*_per_s",
)


# ----------------------------------------------------------------------------------------------
# Which seeds to set


def training_seed_keys(params: Mapping[str, Any]) -> list[str]:
    """'<section>.seed' for every params section that has a seed, except FIXED_SECTIONS, in file order."""
    return [f"{name}.seed" for name, section in params.items()
            if isinstance(section, dict) and "seed" in section and name not in FIXED_SECTIONS]


def queue_commands(seeds: Sequence[int], keys: Sequence[str], *, prefix: str, jobs: int) -> list[list[str]]:
    """The DVC commands of a sweep: one `dvc exp run --queue` per seed, then one `--run-all`."""
    cmds = []
    for s in seeds:
        overrides = [arg for key in keys for arg in ("-S", f"{key}={s}")]
        cmds.append(["dvc", "exp", "run", "--queue", "--name", f"{prefix}-{s}", *overrides])
    cmds.append(["dvc", "exp", "run", "--run-all", "--jobs", str(jobs)])
    return cmds


def run_sweep(seeds: Sequence[int], *, params: Path, prefix: str, jobs: int, cwd: Path,
              echo: Callable[[str], None] = print) -> list[str]:
    """Queue and run one experiment per seed; returns the experiment names. Stops at a failed command."""
    from rlhf.params import read_yaml

    if not seeds:
        raise StageError("no seeds to run; pass --seeds N (N >= 1)")
    if len(set(seeds)) != len(seeds):
        raise StageError(f"seeds {list(seeds)} repeat a value; each seed runs once")
    keys = training_seed_keys(read_yaml(params))
    if not keys:
        raise StageError(f"{params}: no section outside {', '.join(FIXED_SECTIONS)} has a 'seed' key; nothing to vary")
    for cmd in queue_commands(seeds, keys, prefix=prefix, jobs=jobs):
        echo("$ " + " ".join(cmd))
        res = subprocess.run([dvc_executable(), *cmd[1:]], cwd=cwd)
        if res.returncode != 0:
            hint = "see `dvc queue logs <name>`" if "--run-all" in cmd else "is this a git repository with DVC?"
            raise StageError(f"`{' '.join(cmd[:4])}` exited with {res.returncode}; {hint}")
        # --run-all reports success even when an experiment failed; `dvc queue status` says which.
    failed = failed_experiments(cwd, [f"{prefix}-{s}" for s in seeds])
    if failed:
        raise StageError(f"experiments {', '.join(failed)} failed; `dvc queue logs {failed[0]}` shows why")
    return [f"{prefix}-{s}" for s in seeds]


def dvc_executable() -> str:
    """The `dvc` command: on PATH, or beside this Python (a virtual environment run without activating it)."""
    import shutil
    import sys

    found = shutil.which("dvc") or shutil.which("dvc", path=str(Path(sys.executable).parent))
    if found is None:
        raise StageError("dvc not found on PATH or beside this Python; install it (pip install dvc, or `make setup`) "
                         "or activate the environment that has it")
    return found


def failed_experiments(cwd: Path, names: Sequence[str]) -> list[str]:
    """Names among `names` whose queue task ended in failure (`dvc queue status`)."""
    res = subprocess.run([dvc_executable(), "queue", "status"], cwd=cwd, capture_output=True, text=True)
    failed = []
    for line in res.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1] in names and "Failed" in parts:
            failed.append(parts[1])
    return failed


# ----------------------------------------------------------------------------------------------
# Reading experiments


def read_run_dir(path: Path) -> dict[str, Any]:
    """A finished run in a folder (a copy of the repository, or anything holding metrics/*.json and params.yaml)."""
    from rlhf.io import read_json
    from rlhf.params import read_yaml

    path = Path(path)
    metrics_dir = path / "metrics"
    if not metrics_dir.is_dir():
        raise StageError(f"{path}: no metrics/ folder; point --runs at folders holding a finished run")
    metrics = {p.stem: read_json(p) for p in sorted(metrics_dir.glob("*.json"))}
    params = read_yaml(path / "params.yaml") if (path / "params.yaml").is_file() else {}
    return {"name": path.name, "params": params, "metrics": metrics}


def experiments_from_show(show: Any, names: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Named experiments in `dvc exp show --json` output: [{name, params, metrics}], in the order listed.

    The JSON's nesting differs between DVC versions, so any object with a "name" and a "data" holding
    "metrics" counts as one experiment; metrics files are keyed by their stem (metrics/evaluate.json ->
    evaluate). `names` keeps only those experiments.
    """
    wanted = set(names) if names is not None else None
    found: dict[str, dict[str, Any]] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            data = node.get("data")
            name = node.get("name")
            if isinstance(name, str) and isinstance(data, dict) and "metrics" in data:
                if (wanted is None or name in wanted) and name not in found:
                    found[name] = {"name": name, "params": _file_data(data.get("params")),
                                   "metrics": {Path(k).stem: v for k, v in _file_data_by_file(data["metrics"]).items()}}
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(show)
    return list(found.values())


def _file_data_by_file(files: Any) -> dict[str, Any]:
    """{"metrics/x.json": {"data": {...}}} -> {"metrics/x.json": {...}} (files that failed to load are left out)."""
    if not isinstance(files, dict):
        return {}
    return {path: entry["data"] for path, entry in files.items() if isinstance(entry, dict) and "data" in entry}


def _file_data(files: Any) -> dict[str, Any]:
    """The params files' contents merged into one mapping (params.yaml's sections)."""
    merged: dict[str, Any] = {}
    for data in _file_data_by_file(files).values():
        if isinstance(data, dict):
            merged.update(data)
    return merged


def read_experiments(cwd: Path, names: Sequence[str] | None, prefix: str) -> list[dict[str, Any]]:
    """Experiments of the repository at `cwd` by name, or all whose name starts with `prefix`-.

    `--all-commits`: experiments queued on an earlier commit (the sweep ran, then something was
    committed) are still found; without it `dvc exp show` lists only those based on HEAD."""
    res = subprocess.run([dvc_executable(), "exp", "show", "--json", "--all-commits"], cwd=cwd, capture_output=True,
                         text=True)
    if res.returncode != 0:
        raise StageError(f"`dvc exp show --json` failed in {cwd}: {(res.stderr.strip().splitlines() or ['?'])[-1]}")
    exps = experiments_from_show(json.loads(res.stdout), names)
    if names is not None:
        missing = sorted(set(names) - {e["name"] for e in exps})
        if missing:
            raise StageError(f"no experiment named {missing[0]}; `dvc exp list` shows the names")
        return sorted(exps, key=lambda e: list(names).index(e["name"]))
    exps = [e for e in exps if e["name"].startswith(f"{prefix}-")]
    if not exps:
        raise StageError(f"no experiments named {prefix}-*; run `rlhf seeds run` first")
    return sort_by_seed(exps)


def sort_by_seed(exps: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Experiments in seed order (`dvc exp show` lists the newest first); unknown seeds last, by name."""
    return sorted(exps, key=lambda e: (seed_of(e) is None, seed_of(e) or 0, _natural(e["name"])))


def seed_of(exp: Mapping[str, Any]) -> int | None:
    """The training seed an experiment ran with (the first non-fixed section's seed), if known."""
    for key in training_seed_keys(exp.get("params", {})):
        section, _ = key.split(".")
        return exp["params"][section]["seed"]
    return None


# ----------------------------------------------------------------------------------------------
# Headline numbers and their statistics


def flatten(tree: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of nested dicts as {"a.b.c": value}; booleans, strings and lists are left out."""
    out: dict[str, float] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool) and math.isfinite(tree):
        out[prefix] = float(tree)
    return out


def headline(metrics: Mapping[str, Any], patterns: Sequence[str] = HEADLINE) -> dict[str, float]:
    """The numbers of `metrics` ({file stem: contents}) matching `patterns`, in pattern order."""
    flat = flatten(dict(metrics))
    out: dict[str, float] = {}
    for pattern in patterns:
        for key in sorted((k for k in flat if fnmatch.fnmatchcase(k, pattern)), key=_natural):
            out.setdefault(key, flat[key])
    return out


def _natural(key: str) -> list[Any]:
    """Sort key that orders numbers inside names by value: best_of.2 before best_of.16."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def t_two_sided_mass(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer df, exactly (Abramowitz & Stegun 26.7.3 and 26.7.4)."""
    theta = math.atan(t / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2 == 1:  # 2/pi * (theta + sin(theta) * [cos + 2/3 cos^3 + 2*4/(3*5) cos^5 + ... up to cos^(df-2)])
        term, total = math.cos(theta), 0.0
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c2 * (2 * k) / (2 * k + 1)
        return 2 / math.pi * (theta + s * total) if df > 1 else 2 / math.pi * theta
    term, total = 1.0, 0.0  # even df: sin(theta) * [1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ... up to cos^(df-2)]
    for k in range(1, df // 2 + 1):
        total += term
        term *= c2 * (2 * k - 1) / (2 * k)
    return s * total


def t_quantile(level: float, df: int) -> float:
    """t such that P(|T| <= t) = level (the two-sided critical value: 12.706 for df 1 at 0.95)."""
    if df < 1 or not 0 < level < 1:
        raise ValueError("t_quantile needs df >= 1 and 0 < level < 1")
    lo, hi = 0.0, 1.0
    while t_two_sided_mass(hi, df) < level:
        hi *= 2
    for _ in range(200):  # bisection to float precision
        mid = (lo + hi) / 2
        if t_two_sided_mass(mid, df) < level:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return (lo + hi) / 2


def describe(values: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """n, mean, sample sd (n-1), min, max and the Student-t interval of the mean (sd and interval need n >= 2)."""
    n = len(values)
    if n == 0:
        raise ValueError("describe needs at least one value")
    mean = sum(values) / n
    out: dict[str, Any] = {"n": n, "mean": mean, "sd": None, "min": min(values), "max": max(values),
                           "ci_low": None, "ci_high": None}
    if n >= 2:
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
        half = t_quantile(level, n - 1) * sd / math.sqrt(n)
        out.update(sd=sd, ci_low=mean - half, ci_high=mean + half)
    return out


def machine() -> dict[str, str]:
    """CPU model, core count, OS, Python and torch versions of this machine (torch read without importing it)."""
    import os
    from importlib import metadata

    cpu = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = "not installed"
    return {"cpu": cpu or platform.processor() or platform.machine(), "cores": str(os.cpu_count() or 0),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch_version}


def summarize(experiments: Sequence[Mapping[str, Any]], patterns: Sequence[str] = HEADLINE,
              level: float = 0.95) -> dict[str, Any]:
    """Per headline number: describe() over the experiments that have it, with each experiment's value."""
    if not experiments:
        raise StageError("no experiments to summarize")
    per_exp = {e["name"]: headline(e["metrics"], patterns) for e in experiments}
    keys: list[str] = []
    for numbers in per_exp.values():
        keys += [k for k in numbers if k not in keys]
    numbers = {}
    for key in keys:
        values = {name: v[key] for name, v in per_exp.items() if key in v}
        numbers[key] = {**describe(list(values.values()), level), "values": values}
    return {
        "level": level,
        "experiments": [{"name": e["name"], "seed": seed_of(e)} for e in experiments],
        "interval": f"{level:.0%} Student-t interval of the mean over experiments (n-1 degrees of freedom)",
        "machine": machine(),
        "numbers": numbers,
    }


def markdown(summary: Mapping[str, Any]) -> str:
    """The summary as a markdown table, one row per headline number, ready for the docs."""
    def f(v: Any) -> str:
        return "" if v is None else f"{v:.3f}"

    names = [e["name"] for e in summary["experiments"]]
    m = summary["machine"]
    lines = [
        f"Over {len(names)} runs ({', '.join(names)}); {summary['interval']}.",
        f"Machine: {m['cpu']} ({m['cores']} cores), torch {m['torch']}, Python {m['python']}.",
        "",
        "| metric | n | mean | sd | 95% interval | min | max | " + " | ".join(names) + " |",
        "|---|---:|---:|---:|---|---:|---:|" + "---:|" * len(names),
    ]
    for key, s in summary["numbers"].items():
        interval = "" if s["ci_low"] is None else f"[{f(s['ci_low'])}, {f(s['ci_high'])}]"
        per_run = " | ".join(f(s["values"].get(n)) for n in names)
        lines.append(f"| {key} | {s['n']} | {f(s['mean'])} | {f(s['sd'])} | {interval} | {f(s['min'])} | "
                     f"{f(s['max'])} | {per_run} |")
    return "\n".join(lines) + "\n"


def write_summary(summary: Mapping[str, Any], out_json: Path, out_md: Path) -> None:
    from rlhf.io import atomic_write_text, write_json

    write_json(out_json, dict(summary), sort_keys=False)
    atomic_write_text(out_md, markdown(summary))
