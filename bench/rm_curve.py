"""Tabulate bench/rm_curve.sh's variants: reward-model accuracy and best-of-n gold per variant.

    python bench/rm_curve.py OUT [--write bench/results/rm_curve.json]

Reads OUT/<variant>/reward.json and bestofn.json (the reward and bestofn stages' metrics files) and prints
one markdown row per variant; --write stores the rows with the machine that produced them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ORDER = ("base", "big", "overlap2", "double", "t07_half", "t07", "t07_double")
SETTINGS = {
    "base": "SFT-initialized RM (0.97M), 1x prompts, candidates T=1, 5 epochs",
    "big": "own base 5.3M (pretrained + SFT on the same data), 1x, T=1, 5 epochs",
    "overlap2": "1x prompts each ranked by 2 labelers, T=1, 3 epochs",
    "double": "2x prompts (rm + ppo sets), T=1, 3 epochs",
    "t07_half": "0.5x prompts, candidates and best-of-n at T=0.7, 5 epochs",
    "t07": "1x prompts, T=0.7, 5 epochs",
    "t07_double": "2x prompts, T=0.7, 3 epochs",
}


def row(directory: Path) -> dict:
    reward = json.loads((directory / "reward.json").read_text())
    best = json.loads((directory / "bestofn.json").read_text())
    gold = {n: v["gold"]["mean"] for n, v in best["best_of"].items()}
    b8 = best["best_of"]["8"]["gold"]
    return {
        "variant": directory.name, "setting": SETTINGS.get(directory.name, ""),
        "rankings": reward["train"]["comparisons"], "heldout_accuracy_gold": reward["heldout"]["accuracy_gold"],
        "heldout_accuracy_labels": reward["heldout"]["accuracy_labels"],
        "labels_gold_agreement": reward["heldout"]["labels_gold_agreement"],
        "best_of_gold": gold, "best_of_8_ci": [b8["ci_low"], b8["ci_high"]],
        "temperature": best["temperature"], "sft_greedy_gold": best["sft_greedy"]["gold"]["mean"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--write", type=Path)
    args = ap.parse_args()
    names = [n for n in ORDER if (args.out / n / "bestofn.json").is_file()]
    names += sorted(p.name for p in args.out.iterdir() if p.is_dir() and p.name not in ORDER and (p / "bestofn.json").is_file())
    rows = [row(args.out / n) for n in names]
    print("| variant | setting | rankings | RM gold acc | best-of-1 | best-of-8 [95% CI] | best-of-16 | SFT greedy |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        g = r["best_of_gold"]
        print(f"| {r['variant']} | {r['setting']} | {r['rankings']} | {r['heldout_accuracy_gold']:.3f} | {g['1']:.3f} | "
              f"{g['8']:.3f} [{r['best_of_8_ci'][0]:.3f}, {r['best_of_8_ci'][1]:.3f}] | {g['16']:.3f} | {r['sft_greedy_gold']:.3f} |")
    if args.write:
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from rlhf.seeds import machine

        args.write.write_text(json.dumps({"machine": machine(), "variants": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
