"""K-way batching (InstructGPT) vs the naive pairwise variant of reward-model training, on the same data.

    python bench/rm_kway_vs_pairwise.py            # after `dvc repro reward` on the default world

Both variants start from the same SFT model and head init, see the same rankings, the same held-out
prompts and the same number of optimizer steps under the same LR schedule (`reward` params from
params.yaml; checkpoints and mid-run evaluation off). They differ only in batching:
- kway:  one batch element per ranked prompt; each of its K responses gets ONE forward pass and all
         C(K,2) pairs share those scalars (Ouyang et al. 2022, sec. 3.5; docs/ppo.md item 2);
- pairs: one batch element per (winner, loser) pair, pairs shuffled across batches, two forward passes
         per pair (what TRL, DeepSpeed-Chat and OpenRLHF do).
Reports training wall time, forward passes, and held-out accuracy against the labels and the gold judge.
Writes bench/results/rm_kway_vs_pairwise.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--sft", default="models/sft")
    ap.add_argument("--data", default="data/rankings/rankings.jsonl")
    ap.add_argument("--demos", default="data/prepared/sft.jsonl")
    ap.add_argument("--world", default="data/raw/world.json")
    ap.add_argument("--seeds", default="0", help="comma-separated reward.seed values (head init, order, split)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/rm_kway_vs_pairwise.json"))
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from rlhf.io import write_json
    from rlhf.params import load_section
    from rlhf import preferences
    from stages import reward

    base = load_section(args.params, "reward", reward.Params)
    runs = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for batching in ("kway", "pairs"):
            p = dataclasses.replace(base, batching=batching, seed=seed, eval_every=0, checkpoint_every=0)
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.time()
                m = reward.run(p, sft=Path(args.sft), data=Path(args.data), demos=Path(args.demos),
                               world=Path(args.world), out=Path(tmp) / "rm", metrics=Path(tmp) / "m.json",
                               plots=Path(tmp) / "plots", checkpoints=None)
                wall = time.time() - t0
            h = m["heldout"]
            groups = preferences.load_groups(Path(args.data), base.data_format)
            train = [g for g in groups if not preferences.is_heldout(g["prompt"], p.val_fraction, p.seed)]
            n_pairs = sum(len(g["pairs"]) for g in train)
            fwd = 2 * n_pairs if batching == "pairs" else sum(len(g["responses"]) for g in train)
            runs.append({
                "batching": batching, "seed": seed, "steps": m["train"]["steps"],
                "batch_elements_per_step": m["train"]["per_step"],
                "forward_passes_per_epoch": fwd, "train_pairs": n_pairs,
                "train_s": m["timing"]["train_s"], "stage_wall_s": round(wall, 1),
                "final_train_loss": m["train"]["train_loss"],
                "heldout_accuracy_labels": h["accuracy_labels"], "heldout_accuracy_gold": h.get("accuracy_gold"),
                "heldout_spearman_gold_within_prompt": h.get("spearman_gold_within_prompt"),
                "heldout_labels_gold_agreement": h.get("labels_gold_agreement"),
                "heldout_pairs": h["pairs"], "heldout_prompts": h["prompts"],
            })
            print(json.dumps(runs[-1]), flush=True)

    def mean(batching: str, key: str) -> float | None:
        vals = [r[key] for r in runs if r["batching"] == batching and r[key] is not None]
        return round(sum(vals) / len(vals), 4) if vals else None

    summary = {b: {k: mean(b, k) for k in ("train_s", "heldout_accuracy_labels", "heldout_accuracy_gold",
                                            "heldout_spearman_gold_within_prompt")} for b in ("kway", "pairs")}
    summary["speedup_train_s"] = round(summary["pairs"]["train_s"] / summary["kway"]["train_s"], 2)
    result = {
        "what": "reward-model training, K-way batching vs naive pairwise, same data/steps/schedule",
        "params": dataclasses.asdict(base), "data": args.data, "runs": runs, "summary": summary,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()},
    }
    write_json(args.out, result)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
