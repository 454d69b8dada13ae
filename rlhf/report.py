"""The evaluation report: one self-contained HTML file (figures embedded as base64 PNG) and a Markdown twin.

`build_report(result, ...)` takes the evaluate stage's metrics and writes reports/report.html,
reports/report.md and reports/figures/*.png (the PNGs the Markdown links to). Nothing is fetched from
the network: the HTML opens offline, anywhere. Its first screen answers "did the policy beat SFT, by how
much, how sure": a verdict sentence, the regressions, and every metric with its 95% interval and the
direction that is better. `read_curves(plots)` collects the dvclive TSV curves of every training stage
that exists (pretrain, sft, reward, ppo); `read_overoptimization(plots)` PPO's proxy-vs-gold table.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlhf.io import atomic_write_text
from rlhf.suites import SUITES, Metric

# Section titles, in order; tests check that every one is in both files of a world report (a user-data
# report leaves out the gold section and the suites switched off in evaluate.suites).
SECTIONS = (
    "Headline",
    "Helpfulness: win rates",
    "Gold judge scores per task family",
    "Gold against KL (Gao et al. 2022)",
    *(s.title for s in SUITES),
    "Training cost",
    "Training curves",
    "Examples",
    "Run information",
    "Settings",
)
CURVE_STAGES = ("pretrain", "sft", "reward", "ppo")
MARK = {"higher": "↑", "lower": "↓", "half": "(0.5 best)", None: ""}
GOLD = Metric("total", "gold total", "higher")

# One chart per idea: (title, y label, curve names that share the axes) per stage. Curves named nowhere
# fill the remaining panels of a stage with few groups (another model, another logger).
CURVE_GROUPS: dict[str, list[tuple[str, str, tuple[str, ...]]]] = {
    "pretrain": [("Language-model loss", "cross-entropy (nats/token)", ("train/loss", "eval/val_loss")),
                 ("Learning rate", "learning rate", ("train/lr",))],
    "sft": [("Loss on demonstrations", "cross-entropy (nats/token)", ("train/loss", "eval/val_loss")),
            ("Learning rate", "learning rate", ("train/lr",))],
    "reward": [("Ranking loss", "loss (nats per pair)", ("train/loss", "eval/val_loss")),
               ("Held-out accuracy", "pairs ordered as labeled (share)", ("eval/val_accuracy",)),
               ("Learning rate", "learning rate", ("train/lr",))],
    "ppo": [("Reward-model score (proxy)", "mean RM score per rollout", ("objective/rm_score",)),
            ("Gold judge score (true)", "mean gold total per rollout", ("gold/score",)),
            ("KL to the SFT policy", "KL (nats per response)", ("objective/kl",)),
            ("RLHF reward (score − β·KL)", "reward per response", ("objective/rlhf_reward",)),
            ("Policy entropy", "entropy (nats, summed over a response)", ("objective/entropy",)),
            ("Response length", "tokens", ("val/response_length",))],
}
LEGEND = {"train/loss": "train", "eval/val_loss": "validation"}
MAX_PANELS = 6


# ----------------------------------------------------------------------------------------------
# Curves


def read_tsv(path: Path) -> tuple[list[float], list[float], str]:
    """One dvclive curve: (steps, values, name of the value column)."""
    with path.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    if not rows:
        return [], [], path.stem
    cols = [c for c in rows[0] if c not in ("step", "timestamp")]
    col = cols[-1] if cols else path.stem
    steps, values = [], []
    for i, r in enumerate(rows):
        try:
            steps.append(float(r.get("step", i)))
            values.append(float(r[col]))
        except (TypeError, ValueError):
            continue
    return steps, values, col


def read_curves(folders: Sequence[Path]) -> dict[str, dict[str, tuple[list[float], list[float], str]]]:
    """{stage: {metric: (steps, values, "step")}} from dvclive's `<folder>/**/*.tsv`, one folder per stage
    (plots/<stage>, named by its stage); a missing folder is left out (the report notes it)."""
    out: dict[str, dict[str, tuple[list[float], list[float], str]]] = {}
    for stage_dir in map(Path, folders):
        if not stage_dir.is_dir():
            continue
        curves = {}
        for tsv in sorted(stage_dir.rglob("*.tsv")):
            steps, values, _ = read_tsv(tsv)
            if steps:
                rel = tsv.relative_to(stage_dir).with_suffix("")
                parts = rel.parts[2:] if rel.parts[:2] == ("plots", "metrics") else rel.parts
                curves["/".join(parts)] = (steps, values, "step")
        if curves:
            out[stage_dir.name] = curves
    return out


def read_overoptimization(folders: Sequence[Path]) -> dict[str, list[dict[str, float]]]:
    """{stage: rows of (step, sqrt_kl, proxy_score, gold_score)} from `<folder>/overoptimization.csv`."""
    out: dict[str, list[dict[str, float]]] = {}
    for folder in map(Path, folders):
        path = folder / "overoptimization.csv"
        if not path.is_file():
            continue
        with path.open(encoding="utf-8", newline="") as fh:
            try:
                rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(fh)]
            except (TypeError, ValueError):
                continue
        if rows and {"sqrt_kl", "proxy_score", "gold_score"} <= set(rows[0]):
            out[folder.name] = rows
    return out


def read_stage_metrics(files: Sequence[Path]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """({stage: metrics} of the training stages' metrics files that exist, named by file stem, and the
    missing or unreadable ones, as notes): a model removed from the pipeline leaves a note, not a crash."""
    import json

    found, missing = {}, []
    for path in map(Path, files):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            missing.append(f"{path}: not found")
            continue
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            missing.append(f"{path}: unreadable ({type(exc).__name__})")
            continue
        if isinstance(data, dict):
            found[path.stem] = data
        else:
            missing.append(f"{path}: not a JSON object")
    return found, missing


def gold_kl_points(models: dict[str, Any], bestofn: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Gao et al. (2022)'s points: each model whose KL evaluate measured (its greedy test gold, and the gold
    of the temperature-1 samples the KL was measured on), and best-of-n at its KL from SFT with the gold of
    its pick among n samples from SFT (metrics/bestofn.json, at its own temperature), when it carries gold per n."""
    points = []
    for name, m in models.items():
        kl = m.get("kl")
        if kl and "mean" in kl:
            p = {"name": name, "kind": "policy", "kl": kl["mean"], "sqrt_kl": round(math.sqrt(max(kl["mean"], 0.0)), 4)}
            if "gold" in m:
                p["gold"] = m["gold"]["total"]
            if "gold_sampled" in kl:
                p["gold_sampled"] = kl["gold_sampled"]
            points.append(p)
    for n, row in sorted((bestofn or {}).get("best_of", {}).items(), key=lambda x: int(x[0])):
        gold = row.get("gold", {}).get("mean") if isinstance(row.get("gold"), dict) else None
        if gold is not None and "kl" in row:
            points.append({"name": f"best-of-{n}", "kind": "best-of-n", "kl": row["kl"],
                           "sqrt_kl": round(math.sqrt(max(row["kl"], 0.0)), 4), "gold_sampled": gold})
    return points


def human_title(name: str) -> str:
    """'eval/val_loss' -> 'Eval: val loss' for curves no group names."""
    head, _, tail = name.rpartition("/")
    text = (f"{head}: {tail}" if head else tail).replace("_", " ")
    return text[:1].upper() + text[1:]


def _constant(values: list[float]) -> bool:
    finite = [v for v in values if math.isfinite(v)]
    return not finite or max(finite) - min(finite) <= 1e-12 * max(1.0, abs(finite[0]))


def pick_panels(stage: str, curves: dict[str, Any]) -> list[tuple[str, str, list[str]]]:
    """(title, y label, curve names) per panel: the stage's groups whose curves exist, then (when the
    groups give fewer than three panels) other curves one per panel; constant curves are left out."""
    live = {n for n, c in curves.items() if not _constant(c[1])}
    panels = []
    for title, ylabel, names in CURVE_GROUPS.get(stage, []):
        present = [n for n in names if n in live]
        if present:
            panels.append((title, ylabel, present))
    if len(panels) < 3:
        grouped = {n for _, _, names in CURVE_GROUPS.get(stage, []) for n in names}
        for n in sorted(live - grouped):
            if len(panels) >= MAX_PANELS:
                break
            panels.append((human_title(n), n.rpartition("/")[2].replace("_", " "), [n]))
    return panels[:MAX_PANELS]


# ----------------------------------------------------------------------------------------------
# Figures


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _ci(m: dict[str, Any], key: str) -> tuple[float, float] | None:
    lo, hi = m.get(f"{key}_ci_low"), m.get(f"{key}_ci_high")
    return (lo, hi) if lo is not None and hi is not None else None


def fig_win_rates(win_rates: dict[str, Any]) -> bytes | None:
    """Horizontal bars with 95% whiskers; the numbers are in the tick labels, so nothing overlaps."""
    import matplotlib.pyplot as plt

    if not win_rates:
        return None
    tags = list(win_rates)
    y = list(range(len(tags)))[::-1]
    w = [win_rates[t] for t in tags]
    rates = [x["win_rate"] for x in w]
    err = [[r - x["ci_low"] for r, x in zip(rates, w)], [x["ci_high"] - r for r, x in zip(rates, w)]]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.55 * len(tags)))
    ax.barh(y, rates, xerr=err, color="#4c78a8", capsize=4, height=0.6, label="judge's win rate, 95% interval")
    gold = [(yi, x["gold_win_rate"]) for yi, x in zip(y, w) if "gold_win_rate" in x]
    if gold:
        ax.scatter([g for _, g in gold], [yi for yi, _ in gold], marker="D", color="#e45756", zorder=3,
                   label="gold judge's win rate")
    ax.axvline(0.5, color="grey", ls="--", lw=1)
    ax.set_yticks(y, [f"{t.replace('_vs_', ' vs ')}   {x['win_rate']:.2f} [{x['ci_low']:.2f}, {x['ci_high']:.2f}]"
                      for t, x in zip(tags, w)])
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of test prompts where A's answer is preferred to B's (ties count 0.5)")
    ax.set_title("Win rate of A over B (0.5 = no preference)", pad=24)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=8, frameon=False)
    return _png(fig)


def fig_families(models: dict[str, Any]) -> bytes | None:
    import matplotlib.pyplot as plt

    names = [n for n in models if "gold" in models[n]]
    if not names:
        return None
    fams = sorted({f for n in names for f in models[n]["gold"]["by_family"]})
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(8, 3.4))
    for i, n in enumerate(names):
        vals = [models[n]["gold"]["by_family"].get(f, 0.0) for f in fams]
        ax.bar([x + i * width for x in range(len(fams))], vals, width, label=n)
    ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(fams))], fams)
    ax.set_ylim(0, 1)
    ax.set_xlabel("task family of the test prompt")
    ax.set_ylabel("mean gold total (0 to 1) ↑")
    ax.set_title("Gold judge score per task family")
    ax.legend(fontsize=8, ncol=min(len(names), 4), loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _png(fig)


def benchmark_panels(models: dict[str, Any]) -> list[tuple[str, Metric]]:
    panels = [("gold", GOLD)] + [(s.name, m) for s in SUITES for m in s.metrics if m.better]
    return [(suite, m) for suite, m in panels if any(suite in x for x in models.values())]


def fig_benchmarks(models: dict[str, Any]) -> bytes | None:
    """One panel per metric (a grid), bars with 95% whiskers, each value written above its whisker."""
    import matplotlib.pyplot as plt

    panels = benchmark_panels(models)
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
    for ax, (suite, metric) in zip(axes.flat, panels):
        names = [n for n in models if suite in models[n]]
        vals = [models[n][suite][metric.key] for n in names]
        cis = [_ci(models[n][suite], metric.key) or (v, v) for n, v in zip(names, vals)]
        ax.bar(names, vals, yerr=[[v - c[0] for v, c in zip(vals, cis)], [c[1] - v for v, c in zip(vals, cis)]],
               color="#72b7b2", capsize=4)
        for i, (v, c) in enumerate(zip(vals, cis)):
            ax.text(i, c[1] + 0.03, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{metric.label} {MARK[metric.better]}", fontsize=10)
        ax.set_ylim(0, 1.15)
        ax.set_ylabel("share (0 to 1)" if metric.key != "total" else "mean gold total (0 to 1)", fontsize=8)
        if metric.better == "half":
            ax.axhline(0.5, color="grey", ls="--", lw=1)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle("Every model on every metric (bars: value; whiskers: 95% bootstrap interval)", fontsize=11)
    fig.tight_layout()
    return _png(fig)


def fig_curves(stage: str, curves: dict[str, tuple[list[float], list[float], str]]) -> bytes | None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = pick_panels(stage, curves)
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 2.9 * rows), squeeze=False)
    for ax, (title, ylabel, names) in zip(axes.flat, panels):
        for n in names:
            x, values, _ = curves[n]
            ax.plot(x, values, lw=1.4, marker="." if len(x) < 30 else None, label=LEGEND.get(n, human_title(n)))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training step", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=8)
        if len(names) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    return _png(fig)


def fig_overoptimization(rows: list[dict[str, float]], window: int = 5) -> bytes:
    """Proxy and gold score per rollout against √KL (Gao et al. 2022): the points, and a moving average
    taken in √KL order (KL does not grow monotonically with the step, so step order would scribble)."""
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["sqrt_kl"])
    x = [r["sqrt_kl"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    twin = ax.twinx()
    for axis, key, color, label in ((ax, "proxy_score", "tab:blue", "proxy: reward-model score"),
                                    (twin, "gold_score", "tab:red", "gold judge score (true)")):
        y = [r[key] for r in rows]
        axis.scatter(x, y, s=12, color=color, alpha=0.4)
        w = max(1, min(window, len(y)))
        avg = [sum(y[max(0, i - w + 1): i + 1]) / len(y[max(0, i - w + 1): i + 1]) for i in range(len(y))]
        axis.plot(x, avg, color=color, lw=1.8, label=f"{label}, moving average of {w}")
        axis.set_ylabel(label, color=color)
    ax.set_xlabel("√KL(π ‖ π_SFT), KL in nats per response")
    ax.set_title("Over-optimization watch: proxy and gold score against √KL")
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2,
              fontsize=8, frameon=False)
    return _png(fig)


def fig_gold_vs_kl(points: list[dict[str, Any]], reference: str) -> bytes | None:
    """Every model and best-of-n on Gao et al. (2022)'s axes: test gold against √KL from the reference.
    A model is a filled dot at its greedy answers' gold (the report's gold) and a hollow ring at the gold of
    the temperature-1 samples its KL was measured on, the footing of best-of-n's curve."""
    import matplotlib.pyplot as plt

    models = [p for p in points if p["kind"] == "policy" and ("gold" in p or "gold_sampled" in p)]
    bon = [p for p in points if p["kind"] == "best-of-n"]
    if not models and not bon:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, p in enumerate(models):
        c = colors[i % len(colors)]
        if "gold" in p and "gold_sampled" in p:
            ax.plot([p["sqrt_kl"]] * 2, [p["gold"], p["gold_sampled"]], color=c, lw=0.8, alpha=0.6)
        if "gold_sampled" in p:
            ax.scatter([p["sqrt_kl"]], [p["gold_sampled"]], s=46, facecolors="none", edgecolors=c, linewidths=1.5)
        y = p.get("gold", p.get("gold_sampled"))
        ax.scatter([p["sqrt_kl"]], [y], s=46, color=c, zorder=3, label=p["name"])
        ax.annotate(p["name"], (p["sqrt_kl"], y), textcoords="offset points", xytext=(5, 4), fontsize=8, color=c)
    if bon:
        ax.plot([p["sqrt_kl"] for p in bon], [p["gold_sampled"] for p in bon], color="grey", ls="--", marker="s",
                ms=4, label="best-of-n from SFT (RM's pick)")
        for p in bon:
            ax.annotate(p["name"].replace("best-of-", "n="), (p["sqrt_kl"], p["gold_sampled"]),
                        textcoords="offset points", xytext=(3, -11), fontsize=7, color="grey")
    ax.set_xlabel(f"√KL(π ‖ π_{reference}), KL in nats per response")
    ax.set_ylabel("mean gold total on test prompts (0 to 1) ↑")
    ax.set_title(f"Gold against KL from {reference}: dot = greedy answers, ring = temperature-1 samples")
    right = max(p["sqrt_kl"] for p in models + bon)
    ax.set_xlim(-0.05, right * 1.08 + 0.05)  # room for the last point's label
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    return _png(fig)


# ----------------------------------------------------------------------------------------------
# Numbers and sentences


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return "—" if v is None else str(v)


def with_ci(m: dict[str, Any] | None, key: str) -> str | None:
    """'0.783 [0.71, 0.85]' (value and its 95% interval), or the bare value when there is no interval."""
    if not m or m.get(key) is None:
        return None
    ci = _ci(m, key)
    return f"{m[key]:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def worse(metric: Metric, a: float, b: float) -> bool:
    if metric.better == "higher":
        return a < b
    if metric.better == "lower":
        return a > b
    return metric.better == "half" and abs(a - 0.5) > abs(b - 0.5)


def _metrics_of(m: dict[str, Any]) -> list[tuple[dict[str, Any] | None, Metric]]:
    return [(m.get("gold"), GOLD)] + [(m.get(s.name), x) for s in SUITES for x in s.metrics if x.better]


def regressions(result: dict[str, Any], pairs: list[list[str]]) -> list[str]:
    """Per pair [A, B], every directed metric on which A is worse than B, named; overlapping intervals say so."""
    out = []
    models = result["models"]
    for a, b in pairs:
        for (ma, metric), (mb, _) in zip(_metrics_of(models[a]), _metrics_of(models[b])):
            if not ma or not mb or ma.get(metric.key) is None or mb.get(metric.key) is None:
                continue
            va, vb = ma[metric.key], mb[metric.key]
            if worse(metric, va, vb):
                ca, cb = _ci(ma, metric.key), _ci(mb, metric.key)
                noise = " (the 95% intervals overlap: may be noise)" if ca and cb and ca[0] <= cb[1] and cb[0] <= ca[1] else ""
                out.append(f"{a} {metric.label} {va:.3f} vs {b} {vb:.3f}: worse{noise}")
    return out


def verdict(result: dict[str, Any], pairs: list[list[str]], prefers: str) -> str:
    """One sentence on the first pair, e.g. 'policy beat sft: held-out labelers prefer it 0.58 [0.53, 0.62];
    test gold 0.60 → 0.71; by task family unknown 0.90, insult 0.70, sort 0.47.'"""
    if not pairs or f"{pairs[0][0]}_vs_{pairs[0][1]}" not in result["win_rates"]:
        return "No win rate to judge by: evaluate.pairs is empty or its first pair was not judged."
    a, b = pairs[0]
    w = result["win_rates"][f"{a}_vs_{b}"]
    interval = f"{w['win_rate']:.2f} [{w['ci_low']:.2f}, {w['ci_high']:.2f}]"
    if w["ci_low"] > 0.5:
        text = f"{a} beat {b}: {prefers} it {interval}"
    elif w["ci_high"] < 0.5:
        text = f"{a} lost to {b}: {prefers} it only {interval}"
    else:
        text = f"{a} and {b} are not distinguishable: {prefers} {a} {interval}, an interval that includes 0.5"
    gold = [result["models"][n].get("gold", {}).get("total") for n in (b, a)]
    if None not in gold:
        text += f"; test gold {gold[0]:.2f} → {gold[1]:.2f}"
    if w.get("by_family"):  # where the rate comes from, best family first
        fams = sorted(w["by_family"].items(), key=lambda kv: (-kv[1]["win_rate"], kv[0]))
        text += "; by task family " + ", ".join(f"{f} {x['win_rate']:.2f}" for f, x in fams)
    return text + "."


def headline_rows(result: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """One row per metric (its better direction in the name), one column per model, intervals beside values."""
    models = result["models"]
    rows = [("answer length (words)", lambda m: m.get("length_words")),
            ("answers that end with EOS ↑", lambda m: m.get("ended_with_eos")),
            ("reward-model score (proxy) ↑", lambda m: m.get("rm_score")),
            (f"{GOLD.label} ↑", lambda m: with_ci(m.get("gold"), "total")),
            ("KL from the reference (nats per response, sampled)", lambda m: with_ci(m.get("kl"), "mean"))]
    for suite in SUITES:
        for metric in suite.metrics:
            rows.append((f"{metric.label} {MARK[metric.better]}".strip(),
                         lambda m, s=suite.name, k=metric.key: with_ci(m.get(s), k)))
    rows = [(h, f) for h, f in rows if any(f(m) is not None for m in models.values())]
    return ["metric"] + list(models), [[h] + [f(m) for m in models.values()] for h, f in rows]


def win_rows(result: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    head = ["A vs B", "win rate ↑ (for A)", "95% interval", "wins / ties / losses", "A length", "B length"]
    has_gold = any("gold_win_rate" in w for w in result["win_rates"].values())
    if has_gold:
        head.append("gold judge's win rate")
    rows = []
    for tag, w in result["win_rates"].items():
        row = [tag.replace("_vs_", " vs "), w["win_rate"], f"[{w['ci_low']:.3f}, {w['ci_high']:.3f}]",
               f"{w['wins']} / {w['ties']} / {w['losses']}", w["a_length_words"], w["b_length_words"]]
        if has_gold:
            row.append(w.get("gold_win_rate"))
        rows.append(row)
    return head, rows


def win_family_rows(result: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Each pair's win rate per task family, with the family's prompts and ties: which tasks a verdict rests on."""
    wins = {t: w["by_family"] for t, w in result["win_rates"].items() if "by_family" in w}
    fams = sorted({f for by in wins.values() for f in by})
    if not fams:
        return [], []
    cell = lambda x: None if x is None else f"{x['win_rate']:.2f} ({x['prompts']}, {x['ties']} tied)"  # noqa: E731
    return (["A vs B"] + [f"{f} ↑ (prompts, tied)" for f in fams],
            [[t.replace("_vs_", " vs ")] + [cell(by.get(f)) for f in fams] for t, by in wins.items()])


def family_rows(result: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    models = {n: m["gold"] for n, m in result["models"].items() if "gold" in m}
    if not models:
        return [], []
    fams = sorted({f for g in models.values() for f in g["by_family"]})
    head = ["model", "helpful ↑", "truthful ↑", "harmless ↑", "total ↑"] + [f"total: {f} ↑" for f in fams]
    rows = [[n, g["helpful"], g["truthful"], g["harmless"], with_ci(g, "total")] + [g["by_family"].get(f) for f in fams]
            for n, g in models.items()]
    return head, rows


def suite_rows(result: dict[str, Any], suite) -> tuple[list[str], list[list[Any]]]:
    marks = {m.key: MARK[m.better] for m in suite.metrics}
    rows = [[n] + [with_ci(m[suite.name], k) if k in marks else m[suite.name].get(k) for k, _ in suite.table]
            for n, m in result["models"].items() if suite.name in m]
    return (["model"] + [f"{label} {marks.get(k, '')}".strip() for k, label in suite.table], rows) if rows else ([], [])


def stage_cost(m: dict[str, Any]) -> tuple[Any, Any, str | None, str | None]:
    """(wall s, training s, work, throughput) from one stage's metrics, each None where not recorded. Every
    stage that trains or samples writes a `timing` block (rlhf.io.timing): wall_s, train_s, `<unit>_per_s`."""
    timing = m.get("timing") if isinstance(m.get("timing"), dict) else {}
    wall = timing.get("wall_s")
    train = timing.get("train_s")
    work = rate = None
    if "episodes" in m:
        work = f"{m['episodes']:,} episodes"
    elif isinstance(m.get("train"), dict) and "pairs" in m["train"]:
        work = f"{m['train']['pairs']:,} pairs"
    elif "best_of" in m and "prompts" in m and "samples" in m:
        work = f"{m['prompts'] * m['samples']:,} samples"
    elif "trained_steps" in m or "steps" in m:  # pretrain, sft, the SFT + ptx control
        work = f"{m.get('trained_steps', m.get('steps')):,} steps"
    for key, value in timing.items():
        if key.endswith("_per_s"):
            rate = f"{value:,.1f} {key[: -len('_per_s')].replace('_', ' ')}/s"
    return wall, train, work, rate


def cost_rows(stages: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    head = ["stage", "wall time (s) ↓", "of which training (s)", "work", "throughput ↑"]
    rows = []
    for name, m in stages.items():
        wall, train, work, rate = stage_cost(m)
        rows.append([name, f"{wall:.1f}" if wall is not None else "not recorded",
                     f"{train:.1f}" if train is not None else None, work, rate])
    return head, rows


def section_cost(doc: _Doc, stages: dict[str, dict[str, Any]], missing: list[str]) -> None:
    doc.h("Training cost")
    if not stages:
        doc.p("No training stage's metrics file was given (rlhf evaluate --stage-metrics).")
    else:
        doc.p("Each training stage's cost as its metrics file records it (metrics/<stage>.json): wall time of the "
              "stage (loading and held-out evaluation included), the training loop's share of it (best-of-n: its "
              "sampling), and the loop's throughput: tokens per second for pretraining, demonstrations (examples) for "
              "SFT, preference pairs for the reward model and DPO, episodes (sampled responses) for the RL stages "
              "(steps for the SFT + ptx control, which samples none), samples for best-of-n. The RL stages and "
              "best-of-n also need the reward stage. 'not recorded': a metrics file written before stages recorded "
              "their timing. Wall times depend on the machine and its load: one run, not a distribution.", "note")
        doc.table(*cost_rows(stages))
    if missing:
        doc.p("Not read: " + "; ".join(missing) + ".", "note")


def section_gold_kl(doc: _Doc, result: dict[str, Any], stages: dict[str, dict[str, Any]], settings: dict[str, str]) -> None:
    """Gao et al. (2022)'s chart with every model and best-of-n, its caption, and its numbers."""
    points = gold_kl_points(result["models"], stages.get("bestofn"))
    if not any("gold" in p or "gold_sampled" in p for p in points):
        return
    reference = next((m["kl"]["reference"] for m in result["models"].values() if "kl" in m), "sft")
    bon_t = (stages.get("bestofn") or {}).get("temperature", 1.0)
    doc.h("Gold against KL (Gao et al. 2022)")
    doc.p(f"How far each model moved from {reference}, and what it bought. KL: {settings.get('KL', 'not recorded')}. "
          f"Best-of-n: the reward model's pick among n samples from SFT at temperature {bon_t} on the test "
          "prompts (metrics/bestofn.json), at its KL from SFT: at most log n − (n−1)/n from the sampler (Gao et al. "
          "2022), plus, below temperature 1, the sampler's own distance from SFT over the pick. Compare it with the "
          "rings (each model's own temperature-1 samples), not with the greedy dots.", "note")
    doc.figure("gold_vs_kl", fig_gold_vs_kl(points, reference), f"gold against sqrt KL from {reference}")
    doc.table(["model", f"KL from {reference} (nats)", "√KL", "gold, greedy ↑", "gold, temperature-1 samples ↑"],
              [[p["name"], p["kl"], p["sqrt_kl"], p.get("gold"), p.get("gold_sampled")] for p in points])


# ----------------------------------------------------------------------------------------------
# Writers


class _Doc:
    """Builds the HTML and the Markdown side by side, so both always have the same sections."""

    def __init__(self):
        self.html: list[str] = []
        self.md: list[str] = []
        self.figures: dict[str, bytes] = {}

    def h(self, title: str, level: int = 2) -> None:
        anchor = title.lower().replace(" ", "-").replace(":", "")
        self.html.append(f'<h{level} id="{anchor}">{html.escape(title)}</h{level}>')
        self.md.append("#" * level + " " + title + "\n")

    def p(self, text: str, cls: str = "") -> None:
        attr = f' class="{cls}"' if cls else ""
        self.html.append(f"<p{attr}>{html.escape(text)}</p>")
        self.md.append(("**" + text + "**" if cls == "verdict" else text) + "\n")

    def items(self, lines: list[str]) -> None:
        self.html.append("<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in lines) + "</ul>")
        self.md.append("".join(f"- {x}\n" for x in lines))

    def table(self, head: list[str], rows: list[list[Any]]) -> None:
        if not head:
            return
        cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
        # Numbers stay on one line ("0.783 [0.71, 0.85]"); long text (answers, settings) wraps.
        cell = lambda v: (f'<td class="text">{html.escape(_fmt(v))}</td>' if len(_fmt(v)) > 40  # noqa: E731
                          else f"<td>{html.escape(_fmt(v))}</td>")
        body = "".join("<tr>" + "".join(cell(v) for v in r) + "</tr>" for r in rows)
        # A table wider than the page (one column per model) scrolls inside its box; the page never does.
        self.html.append(f'<div class="scroll"><table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table></div>')
        md_cell = lambda v: _fmt(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
        self.md.append("| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n"
                       + "".join("| " + " | ".join(md_cell(v) for v in r) + " |\n" for r in rows))

    def figure(self, name: str, png: bytes | None, alt: str) -> None:
        if png is None:
            return
        self.figures[name] = png
        b64 = base64.b64encode(png).decode("ascii")
        self.html.append(f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">')
        self.md.append(f"![{alt}](figures/{name}.png)\n")


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.8em 0;font-size:0.9em}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3} td{white-space:nowrap} td.text{white-space:pre-wrap;max-width:340px}
img{max-width:100%;margin:0.5em 0} .note{color:#666;font-size:0.9em} div.scroll{overflow-x:auto;max-width:100%}
p.verdict{font-size:1.15em;font-weight:600;background:#eef5ee;border-left:4px solid #54a24b;padding:0.5em 0.8em}
"""


def section_headline(doc: _Doc, result: dict[str, Any], pairs: list[list[str]], prefers: str) -> None:
    names = list(result["models"])
    doc.h("Headline")
    doc.p(verdict(result, pairs, prefers), "verdict")
    found = regressions(result, pairs)
    doc.p("Regressions (A worse than B on a metric, for each compared pair [A, B]):" if found
          else "No regressions: for every compared pair [A, B], A is at least as good as B on every metric.")
    if found:
        doc.items(found)
    doc.p(f"{len(names)} models ({', '.join(names)}) on {result['prompts']} held-out test prompts that no stage "
          "trained on. ↑ higher is better, ↓ lower is better; [a, b] is a 95% bootstrap interval over items.", "note")
    doc.table(*win_rows(result))
    doc.table(*headline_rows(result))
    if result.get("skipped"):
        doc.p("Not run: " + "; ".join(f"{k} ({v})" for k, v in result["skipped"].items()))


def section_helpfulness(doc: _Doc, result: dict[str, Any], settings: dict[str, str]) -> None:
    doc.h("Helpfulness: win rates")
    doc.p(f"Judge: {settings.get('judge', 'not recorded')}. Intervals: {settings.get('intervals', '')}.")
    doc.figure("win_rates", fig_win_rates(result["win_rates"]), "win rates with 95% intervals")
    if not result["win_rates"]:
        doc.p("No win rates: evaluate.pairs is empty or no pair was judged.")
    head, rows = win_family_rows(result)
    if head:
        doc.h("Win rates per task family")
        doc.p("The same verdicts, family by family. Identical answers tie (0.5), and where both answers are wrong "
              "the judges' choice is close to a coin flip, so families the models answer alike pull a pair's "
              "win rate toward 0.5.", "note")
        doc.table(head, rows)
    head, rows = family_rows(result)
    if not head:  # user data: no world, so no gold section (the judge above is the only verdict)
        doc.p("No gold judge: the data has no world (user data), so the judge above gives the only verdict; "
              "a reward model as judge is a proxy, the model PPO optimized against.", "note")
        return
    doc.h("Gold judge scores per task family")
    doc.p("The world's gold judge (hidden truth, never trained on): helpful, truthful, harmless in [0, 1]; "
          "total = helpful × (0.25 + 0.75 truthful) × harmless, per task family.")
    doc.table(head, rows)
    doc.figure("families", fig_families(result["models"]), "gold total per task family")


def section_suites(doc: _Doc, result: dict[str, Any], settings: dict[str, str], suite_examples: dict[str, Any]) -> None:
    models = result["models"]
    doc.figure("benchmarks", fig_benchmarks(models), "every model on every metric, with 95% intervals")
    for suite in SUITES:
        if suite.name in result.get("suites_off", ()):  # switched off (evaluate.suites): no section
            continue
        doc.h(suite.title)
        head, rows = suite_rows(result, suite)
        if not head:
            doc.p(f"Not run ({result.get('skipped', {}).get(suite.name, 'no file')}).")
            continue
        doc.p(settings.get(suite.title.split(": ")[-1], ""))
        doc.table(head, rows)
        if suite.details:
            for block in suite.details({n: m[suite.name] for n, m in models.items() if suite.name in m},
                                       suite_examples.get(suite.name, {})):
                doc.table(*block[1:]) if block[0] == "table" else doc.p(block[1])


def section_curves(doc: _Doc, curves: dict[str, dict[str, Any]], overopt: dict[str, list[dict[str, float]]]) -> None:
    doc.h("Training curves")
    for stage in list(CURVE_STAGES) + sorted(set(curves) - set(CURVE_STAGES)):
        if stage not in curves:
            doc.p(f"{stage}: no curves found (plots/{stage} missing; the stage has not run or logs elsewhere).")
            continue
        doc.h(stage, 3)
        doc.figure(f"curves_{stage}", fig_curves(stage, curves[stage]), f"{stage} training curves")
        if stage in overopt:
            doc.p("Over-optimization watch (Gao et al. 2022): proxy (reward model) and gold score of each rollout "
                  "against √KL to the SFT policy; a gap that opens as KL grows means the policy exploits the "
                  f"reward model (plots/{stage}/overoptimization.csv; the stage's own PNG beside it).")
            doc.figure(f"overoptimization_{stage}", fig_overoptimization(overopt[stage]),
                       f"{stage}: proxy and gold score against sqrt KL")


def section_examples(doc: _Doc, names: list[str], examples: list[dict[str, Any]]) -> None:
    doc.h("Examples")
    doc.p("Test prompts, one task family after another; each model's answer (and its gold total, if any).")
    rows = []
    for ex in examples:
        row = [ex["prompt"], ex["family"]]
        for n in names:
            g = ex.get("gold", {}).get(n)
            row.append(ex["responses"][n] + (f"  [gold {g:.2f}]" if g is not None else ""))
        rows.append(row)
    doc.table(["prompt", "family"] + names, rows)


def build_report(result: dict[str, Any], *, out_dir: Path, examples: list[dict[str, Any]],
                 curves: dict[str, dict[str, Any]], settings: dict[str, str], suite_examples: dict[str, Any] | None = None,
                 model_paths: dict[str, str] | None = None, pairs: list[list[str]] | None = None,
                 judge_who: str = "the judge prefers", run_info: dict[str, str] | None = None,
                 overoptimization: dict[str, list[dict[str, float]]] | None = None,
                 stage_metrics: dict[str, dict[str, Any]] | None = None, missing_metrics: list[str] | None = None,
                 ) -> dict[str, Path]:
    """Write report.html, report.md and figures/*.png under `out_dir`; returns their paths.
    `pairs` defaults to the order of result["win_rates"]; `judge_who` is the verdict's subject and verb;
    `stage_metrics`: {stage: its metrics} (`read_stage_metrics`) for the cost table and best-of-n."""
    import matplotlib

    matplotlib.use("Agg")
    out_dir = Path(out_dir)
    pairs = pairs if pairs is not None else [t.split("_vs_", 1) for t in result["win_rates"]]
    doc = _Doc()
    section_headline(doc, result, pairs, judge_who)
    section_helpfulness(doc, result, settings)
    section_gold_kl(doc, result, stage_metrics or {}, settings)
    section_suites(doc, result, settings, suite_examples or {})
    section_cost(doc, stage_metrics or {}, missing_metrics or [])
    section_curves(doc, curves, overoptimization or {})
    section_examples(doc, list(result["models"]), examples)
    doc.h("Run information")
    doc.table(["what", "value"], [[k, v] for k, v in (run_info or {}).items()])
    doc.h("Settings")
    doc.table(["what", "setting"], [[k, v] for k, v in settings.items()]
              + [[f"model {n}", p] for n, p in (model_paths or {}).items()])
    return write_report(doc, out_dir)


def write_report(doc: _Doc, out_dir: Path) -> dict[str, Path]:
    body = "\n".join(doc.html)
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>rlhf evaluation report</title>"
            f"<style>{CSS}</style></head><body>\n<h1>rlhf evaluation report</h1>\n{body}\n</body></html>\n")
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    for old in fig_dir.glob("*.png"):
        if old.stem not in doc.figures:
            old.unlink()
    for name, png in doc.figures.items():
        (fig_dir / f"{name}.png").write_bytes(png)
    atomic_write_text(out_dir / "report.html", page)
    atomic_write_text(out_dir / "report.md", "# rlhf evaluation report\n\n" + "\n".join(doc.md))
    return {"html": out_dir / "report.html", "md": out_dir / "report.md", "figures": fig_dir}
