"""Tabulate bench/kl_leash.sh: PPO without ptx (and PPO-ptx) at several kl_coef values, per training seed.

    python bench/kl_leash.py OUT [--write PATH]   # writes bench/results/kl_leash.json (or PATH), prints a table

β = 0.2 (the default of the time) comes from the 3-seed sweep those runs were measured beside
(results/seeds-2026-12-02-epyc.json: the pipeline's own ppo_noptx, ppo and rloo for the same seeds, on the
world before 2026-12-03); the other rows from OUT/seed-N/{kl,ptx-kl}-<β>/{ppo.json,evaluate.json}.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_row(run: Path) -> dict:
    ev = json.loads((run / "evaluate.json").read_text())
    ppo = json.loads((run / "ppo.json").read_text())
    name = next(m for m in ev["models"] if m != "sft")  # policy_noptx, or policy for a PPO-ptx run
    model, win = ev["models"][name], ev["win_rates"][f"{name}_vs_sft"]
    return {"gold": model["gold"]["total"], "sft_gold": ev["models"]["sft"]["gold"]["total"],
            "by_family": model["gold"]["by_family"], "sft_by_family": ev["models"]["sft"]["gold"]["by_family"],
            "win_rate": win["win_rate"], "ci": [win["ci_low"], win["ci_high"]], "gold_win_rate": win["gold_win_rate"],
            "kl": model["kl"]["mean"], "final_rollout_kl": ppo["final_rollout"]["kl"],
            "wall_s": ppo["timing"]["wall_s"]}


SWEEP = "results/seeds-2026-12-02-epyc.json"  # results/seeds.json moves on with every new sweep


def sweep_rows(name: str) -> dict[str, dict]:
    """The sweep's numbers for one evaluated model (policy_noptx or rloo), by seed name."""
    n = json.loads((ROOT / SWEEP).read_text())["numbers"]
    rows = {}
    for seed, gold in n[f"evaluate.models.{name}.gold.total"]["values"].items():
        rows[seed] = {"gold": gold, "sft_gold": n["evaluate.models.sft.gold.total"]["values"][seed],
                      "win_rate": n[f"evaluate.win_rates.{name}_vs_sft.win_rate"]["values"][seed],
                      "gold_win_rate": n[f"evaluate.win_rates.{name}_vs_sft.gold_win_rate"]["values"][seed],
                      "kl": n[f"evaluate.models.{name}.kl.mean"]["values"][seed]}
    return rows


def main(out: Path, write: Path) -> None:
    from rlhf.seeds import machine

    table: dict[str, dict[str, dict]] = {"ppo_noptx, kl 0.2 (sweep)": sweep_rows("policy_noptx"),
                                         "rloo, kl 0.2 (sweep)": sweep_rows("rloo"),
                                         "ppo (ptx), kl 0.2 (sweep)": sweep_rows("policy")}
    for pattern, label in (("kl-*", "ppo_noptx"), ("ptx-kl-*", "ppo (ptx)")):
        for run in sorted(out.glob(f"seed-*/{pattern}")):
            if (run / "evaluate.json").is_file():
                table.setdefault(f"{label}, kl {run.name.rsplit('-', 1)[1]}", {})[run.parent.name] = run_row(run)
    result = {"machine": machine(), "rows": table}
    write.write_text(json.dumps(result, indent=2) + "\n")
    print("| variant | seeds | gold − SFT per seed | mean | win rate vs SFT per seed | gold win rate | KL from SFT |")
    print("|---|---|---|---:|---|---|---|")
    for name, rows in table.items():
        seeds = sorted(rows)
        deltas = [rows[s]["gold"] - rows[s]["sft_gold"] for s in seeds]
        wins = [f"{rows[s]['win_rate']:.3f}" + (f" [{rows[s]['ci'][0]:.2f}, {rows[s]['ci'][1]:.2f}]" if "ci" in rows[s] else "")
                for s in seeds]
        gold_wins = " / ".join(f"{rows[s]['gold_win_rate']:.3f}" for s in seeds)
        kls = " / ".join(f"{rows[s]['kl']:.2f}" for s in seeds)
        print(f"| {name} | {', '.join(s[5:] for s in seeds)} | {' / '.join(f'{d:+.3f}' for d in deltas)} | "
              f"{statistics.mean(deltas):+.3f} | {' / '.join(wins)} | {gold_wins} | {kls} |")


if __name__ == "__main__":
    args = sys.argv[1:]
    target = Path(args[args.index("--write") + 1]) if "--write" in args else ROOT / "bench/results/kl_leash.json"
    main(Path(args[0]), target)
