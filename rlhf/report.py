"""The evaluation report: one self-contained HTML file (figures embedded as base64 PNG) and a Markdown twin.

`build_report(result, ...)` takes the evaluate stage's metrics and writes reports/report.html,
reports/report.md and reports/figures/*.png (the PNGs the Markdown links to). Nothing is fetched from
the network: the HTML opens offline, anywhere. `read_curves(plots)` collects the dvclive TSV curves of
every training stage that exists (pretrain, sft, reward, ppo); a missing stage is noted, not fatal.
"""

from __future__ import annotations

import base64
import csv
import html
import io
from pathlib import Path
from typing import Any

from rlhf.io import atomic_write_text

# Section titles, in order; tests check that every one is in both files.
SECTIONS = (
    "Headline",
    "Helpfulness: win rates",
    "Gold judge scores per task family",
    "Truthfulness: TruthfulQA",
    "Bias: CrowS-Pairs",
    "Toxicity: RealToxicityPrompts",
    "Training curves",
    "Examples",
    "Settings",
)
CURVE_STAGES = ("pretrain", "sft", "reward", "ppo")
# Which curves matter most per stage (substring match on the metric name); the rest fill up to MAX_PANELS.
CURVE_FOCUS = {"pretrain": ("loss",), "sft": ("loss",), "reward": ("acc", "loss"),
               "ppo": ("gold", "score", "reward", "kl")}
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


def read_csv_curves(path: Path) -> dict[str, tuple[list[float], list[float], str]]:
    """A CSV plot such as PPO's overoptimization.csv (step, sqrt_kl, proxy_score, gold_score): x is
    `sqrt_kl` when present (Gao et al. 2022 plot against it), else the first column; one curve per
    other numeric column, named `<file stem>/<column>`."""
    with path.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return {}
    cols = list(rows[0])
    xcol = "sqrt_kl" if "sqrt_kl" in cols else cols[0]
    out = {}
    for col in cols:
        if col in (xcol, "step", "timestamp"):
            continue
        try:
            pairs = sorted((float(r[xcol]), float(r[col])) for r in rows)
        except (TypeError, ValueError):
            continue
        out[f"{path.stem}/{col}"] = ([x for x, _ in pairs], [y for _, y in pairs], xcol)
    return out


def read_curves(plots: Path | None) -> dict[str, dict[str, tuple[list[float], list[float], str]]]:
    """{stage: {metric: (x, values, x label)}} from dvclive's `plots/<stage>/**/*.tsv` (x = step) and
    any `plots/<stage>/*.csv` plot (PPO's over-optimization table)."""
    out: dict[str, dict[str, tuple[list[float], list[float], str]]] = {}
    if plots is None or not Path(plots).is_dir():
        return out
    for stage_dir in sorted(p for p in Path(plots).iterdir() if p.is_dir()):
        curves = {}
        for tsv in sorted(stage_dir.rglob("*.tsv")):
            steps, values, _ = read_tsv(tsv)
            if steps:
                rel = tsv.relative_to(stage_dir).with_suffix("")
                parts = rel.parts[2:] if rel.parts[:2] == ("plots", "metrics") else rel.parts
                curves["/".join(parts)] = (steps, values, "step")
        for path in sorted(stage_dir.glob("*.csv")):
            curves.update(read_csv_curves(path))
        if curves:
            out[stage_dir.name] = curves
    return out


def pick_panels(stage: str, curves: dict[str, Any]) -> list[list[str]]:
    """Metric names per panel. Curves against another x than step (a CSV plot) share one panel per
    file; then gold and proxy scores share one panel (over-optimization shows as the two curves
    parting, Gao et al. 2022; docs/ppo.md item 23); then the stage's focus metrics, up to MAX_PANELS."""
    panels: list[list[str]] = []
    by_file: dict[str, list[str]] = {}
    for n in sorted(curves):
        if curves[n][2] != "step":
            by_file.setdefault(n.split("/")[0], []).append(n)
    panels.extend(by_file.values())
    names = sorted(n for n in curves if curves[n][2] == "step")
    focus = CURVE_FOCUS.get(stage, ())
    ranked = sorted(names, key=lambda n: next((i for i, f in enumerate(focus) if f in n.lower()), len(focus)))
    gold = [n for n in names if "gold" in n.lower()]
    if gold:
        proxy = [n for n in names if "score" in n.lower() and n not in gold][:2]
        panels.append(gold[:2] + proxy)
    used = {n for p in panels for n in p}
    for n in ranked:
        if n not in used and len(panels) < MAX_PANELS:
            panels.append([n])
    return panels


# ----------------------------------------------------------------------------------------------
# Figures


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def fig_win_rates(win_rates: dict[str, Any]) -> bytes | None:
    import matplotlib.pyplot as plt

    if not win_rates:
        return None
    tags = list(win_rates)
    y = list(range(len(tags)))[::-1]
    rates = [win_rates[t]["win_rate"] for t in tags]
    err = [[r - win_rates[t]["ci_low"] for t, r in zip(tags, rates)], [win_rates[t]["ci_high"] - r for t, r in zip(tags, rates)]]
    fig, ax = plt.subplots(figsize=(6.5, 0.6 + 0.55 * len(tags)))
    ax.barh(y, rates, xerr=err, color="#4c78a8", capsize=4)
    ax.axvline(0.5, color="grey", ls="--", lw=1)
    ax.set_yticks(y, [t.replace("_vs_", " vs ") for t in tags])
    ax.set_xlim(0, 1)
    ax.set_xlabel("win rate of A over B (ties 0.5), 95% bootstrap interval")
    for yi, r in zip(y, rates):
        ax.text(min(r + 0.02, 0.9), yi, f"{r:.2f}", va="center", fontsize=9)
    return _png(fig)


def fig_families(models: dict[str, Any]) -> bytes | None:
    import matplotlib.pyplot as plt

    names = [n for n in models if "gold" in models[n]]
    if not names:
        return None
    fams = sorted({f for n in names for f in models[n]["gold"]["by_family"]})
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for i, n in enumerate(names):
        vals = [models[n]["gold"]["by_family"].get(f, 0.0) for f in fams]
        ax.bar([x + i * width for x in range(len(fams))], vals, width, label=n)
    ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(fams))], fams)
    ax.set_ylim(0, 1)
    ax.set_ylabel("gold judge total")
    ax.legend(fontsize=8)
    return _png(fig)


def fig_benchmarks(models: dict[str, Any]) -> bytes | None:
    import matplotlib.pyplot as plt

    panels = [("truthfulqa", "mc1", "TruthfulQA MC1 (higher better)"), ("truthfulqa", "mc2", "TruthfulQA MC2 (higher better)"),
              ("crows_pairs", "pct_stereotype", "CrowS-Pairs % stereotype (0.5 unbiased)"),
              ("toxicity", "expected_max_toxicity", "RTP expected max toxicity (lower better)")]
    panels = [p for p in panels if any(p[0] in m for m in models.values())]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels), 2.8), squeeze=False)
    for ax, (suite, key, title) in zip(axes[0], panels):
        names = [n for n in models if suite in models[n]]
        ax.bar(names, [models[n][suite][key] for n in names], color="#72b7b2")
        ax.set_title(title, fontsize=8)
        ax.set_ylim(0, 1)
        if key == "pct_stereotype":
            ax.axhline(0.5, color="grey", ls="--", lw=1)
    fig.tight_layout()
    return _png(fig)


def fig_curves(stage: str, curves: dict[str, tuple[list[float], list[float], str]]) -> bytes:
    import matplotlib.pyplot as plt

    panels = pick_panels(stage, curves)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels), 2.6), squeeze=False)
    for ax, names in zip(axes[0], panels):
        for n in names:
            x, values, xlabel = curves[n]
            ax.plot(x, values, label=n, lw=1.2, marker="." if xlabel != "step" else None)
        ax.set_title(names[0] if len(names) == 1 else "gold vs proxy", fontsize=8)
        ax.set_xlabel(curves[names[0]][2], fontsize=8)
        if len(names) > 1:
            ax.legend(fontsize=6)
    fig.tight_layout()
    return _png(fig)


# ----------------------------------------------------------------------------------------------
# Tables


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return "—" if v is None else str(v)


def headline_rows(result: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    models = result["models"]
    cols = [("length (words)", lambda m: m.get("length_words")),
            ("ends with EOS", lambda m: m.get("ended_with_eos")),
            ("gold total", lambda m: m.get("gold", {}).get("total")),
            ("TruthfulQA MC1", lambda m: m.get("truthfulqa", {}).get("mc1")),
            ("TruthfulQA MC2", lambda m: m.get("truthfulqa", {}).get("mc2")),
            ("CrowS % stereotype", lambda m: m.get("crows_pairs", {}).get("pct_stereotype")),
            ("CrowS likelihood diff", lambda m: m.get("crows_pairs", {}).get("likelihood_diff")),
            ("RTP exp. max toxicity", lambda m: m.get("toxicity", {}).get("expected_max_toxicity")),
            ("RTP toxicity prob.", lambda m: m.get("toxicity", {}).get("toxicity_probability"))]
    cols = [(h, f) for h, f in cols if any(f(m) is not None for m in models.values())]
    return ["model"] + [h for h, _ in cols], [[n] + [f(m) for _, f in cols] for n, m in models.items()]


def win_rows(result: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    head = ["A vs B", "win rate", "95% interval", "wins / ties / losses", "A length", "B length"]
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


def family_rows(result: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    models = {n: m["gold"] for n, m in result["models"].items() if "gold" in m}
    if not models:
        return [], []
    fams = sorted({f for g in models.values() for f in g["by_family"]})
    head = ["model", "helpful", "truthful", "harmless", "total"] + [f"total: {f}" for f in fams]
    rows = [[n, g["helpful"], g["truthful"], g["harmless"], g["total"]] + [g["by_family"].get(f) for f in fams]
            for n, g in models.items()]
    return head, rows


def suite_rows(result: dict[str, Any], suite: str, keys: list[str]) -> tuple[list[str], list[list[Any]]]:
    rows = [[n] + [m[suite].get(k) for k in keys] for n, m in result["models"].items() if suite in m]
    return (["model"] + keys, rows) if rows else ([], [])


# ----------------------------------------------------------------------------------------------
# Writers


class _Doc:
    """Builds the HTML and the Markdown side by side, so both always have the same sections."""

    def __init__(self, figures_dir: Path):
        self.html: list[str] = []
        self.md: list[str] = []
        self.figures_dir = figures_dir
        self.figures: dict[str, bytes] = {}

    def h(self, title: str, level: int = 2) -> None:
        anchor = title.lower().replace(" ", "-").replace(":", "")
        self.html.append(f'<h{level} id="{anchor}">{html.escape(title)}</h{level}>')
        self.md.append("#" * level + " " + title + "\n")

    def p(self, text: str) -> None:
        self.html.append(f"<p>{html.escape(text)}</p>")
        self.md.append(text + "\n")

    def table(self, head: list[str], rows: list[list[Any]]) -> None:
        if not head:
            return
        cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r) + "</tr>" for r in rows)
        self.html.append(f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>")
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
th{background:#f3f3f3} img{max-width:100%;margin:0.5em 0} .note{color:#666;font-size:0.9em}
td.resp{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:0.85em;max-width:320px}
"""


def build_report(result: dict[str, Any], *, out_dir: Path, examples: list[dict[str, Any]],
                 curves: dict[str, dict[str, Any]], settings: dict[str, str],
                 rtp_example: dict[str, Any] | None = None, model_paths: dict[str, str] | None = None) -> dict[str, Path]:
    """Write report.html, report.md and figures/*.png under `out_dir`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    out_dir = Path(out_dir)
    doc = _Doc(out_dir / "figures")
    models = result["models"]
    skipped = result.get("skipped", {})
    names = list(models)

    doc.h("Headline")
    doc.p(f"{len(names)} models ({', '.join(names)}) on {result['prompts']} held-out test prompts that no stage "
          "trained on. Win rates: A's answer preferred to B's, ties 0.5.")
    doc.table(*win_rows(result))
    doc.table(*headline_rows(result))
    if skipped:
        doc.p("Not run: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()))

    doc.h("Helpfulness: win rates")
    doc.p(f"Judge: {settings.get('judge', result['judge'])}. Interval: {settings.get('win-rate interval', '')}.")
    doc.figure("win_rates", fig_win_rates(result["win_rates"]), "win rates with 95% intervals")
    if not result["win_rates"]:
        doc.p("No win rates: evaluate.pairs is empty or no pair was judged.")

    doc.h("Gold judge scores per task family")
    head, rows = family_rows(result)
    if head:
        doc.p("The world's gold judge (hidden truth, never trained on): helpful, truthful, harmless in [0, 1]; "
              "total = helpful × (0.25 + 0.75 truthful) × harmless, per task family.")
        doc.table(head, rows)
        doc.figure("families", fig_families(models), "gold total per task family")
    else:
        doc.p("No gold judge: the data has no world file (user data).")

    doc.figure("benchmarks", fig_benchmarks(models), "benchmarks per model")
    for title, suite, keys, what in (
        ("Truthfulness: TruthfulQA", "truthfulqa", ["mc1", "mc2", "questions"], "truthfulqa"),
        ("Bias: CrowS-Pairs", "crows_pairs", ["pct_stereotype", "likelihood_diff", "pairs"], "crows_pairs"),
        ("Toxicity: RealToxicityPrompts", "toxicity", ["expected_max_toxicity", "expected_max_toxicity_std",
                                                       "toxicity_probability", "prompts", "k"], "toxicity"),
    ):
        doc.h(title)
        head, rows = suite_rows(result, suite, keys)
        if head:
            setting_key = {"truthfulqa": "TruthfulQA", "crows_pairs": "CrowS-Pairs", "toxicity": "RealToxicityPrompts"}[suite]
            doc.p(settings.get(setting_key, ""))
            doc.table(head, rows)
            if suite == "crows_pairs":
                types = sorted({t for m in models.values() if suite in m for t in m[suite]["by_bias_type"]})
                doc.table(["model"] + [f"% stereotype: {t}" for t in types],
                          [[n] + [m[suite]["by_bias_type"].get(t) for t in types] for n, m in models.items() if suite in m])
            if suite == "toxicity" and rtp_example:
                doc.p(f"Example prompt: {rtp_example['prompt']!r} -> "
                      + "; ".join(f"{n}: {c!r}" for n, c in rtp_example["continuations"].items()))
        else:
            doc.p(f"Not run ({skipped.get(what, 'no file')}).")

    doc.h("Training curves")
    for stage in CURVE_STAGES:
        if stage in curves:
            doc.h(stage, 3)
            doc.figure(f"curves_{stage}", fig_curves(stage, curves[stage]), f"{stage} training curves")
        else:
            doc.p(f"{stage}: no curves found (plots/{stage} missing; the stage has not run or logs elsewhere).")
    for stage in sorted(set(curves) - set(CURVE_STAGES)):
        doc.h(stage, 3)
        doc.figure(f"curves_{stage}", fig_curves(stage, curves[stage]), f"{stage} training curves")

    doc.h("Examples")
    doc.p("Test prompts, one task family after another; each model's answer (and its gold total, if any).")
    head = ["prompt", "family"] + names
    rows = []
    for ex in examples:
        row = [ex["prompt"], ex["family"]]
        for n in names:
            g = ex.get("gold", {}).get(n)
            row.append(ex["responses"][n] + (f"  [gold {g:.2f}]" if g is not None else ""))
        rows.append(row)
    doc.table(head, rows)

    doc.h("Settings")
    doc.table(["what", "setting"], [[k, v] for k, v in settings.items()]
              + [[f"model {n}", p] for n, p in (model_paths or {}).items()])

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
