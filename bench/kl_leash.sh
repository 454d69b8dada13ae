#!/usr/bin/env bash
# Is PPO without ptx held too loosely? (issue "The RL step must earn its gain")
#
# Over the 3-seed sweep (results/seeds.md) RLOO, against the same reward model with the same KL coefficient
# and as many episodes, ends at KL 1.25 from SFT and +0.073 test gold over SFT; PPO without ptx ends at KL
# 2.06 and +0.012, losing arith and fact where the reward model cannot tell right from wrong. PPO takes 4
# optimizer steps per rollout (2 epochs x 2 minibatches) where RLOO takes 1, so at the same beta it moves
# further. This runs PPO without ptx at other kl_coef values, on every seed's own SFT and reward model.
#
#   bash bench/kl_leash.sh OUT [SEED ...]     # OUT: a scratch folder; SEEDS default 0 1 2
#   KL="0.4" bash bench/kl_leash.sh OUT 0     # the kl_coef values to run (default "0.3 0.5")
#   PTX=1 KL="0.4" bash bench/kl_leash.sh OUT  # PPO-ptx (ptx_coef 1, the default) at that kl_coef instead
#
# Seed 0 uses the workspace's models (run `dvc repro reward` first). Any other seed N builds its own
# pretrain -> sft -> sample -> rank -> reward in OUT/seed-N with every training seed = N, as `rlhf seeds
# run` does (world, splits and evaluation fixed), so its reward model is the sweep's seed-N one: the
# reward metrics let you check that. Each variant is judged by `rlhf evaluate` against that seed's SFT
# (held-out labelers, gold, KL from SFT) with the benchmarks off.
# Results: OUT/seed-N/kl-<beta>/ (PPO-ptx: ptx-kl-<beta>/) {ppo.json,evaluate.json}; `python bench/kl_leash.py OUT`
# tabulates them.
set -euo pipefail
OUT=${1:?usage: bash bench/kl_leash.sh OUT [SEED ...]}
shift
SEEDS=${*:-0 1 2}
KL=${KL:-0.3 0.5}
PTX=${PTX:-0}
if [ "$PTX" = 0 ]; then name=policy_noptx; prefix=kl; else name=policy; prefix=ptx-kl; fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"

params() {  # params() FILE SEED [KEY=VALUE ...]: params.yaml with every training seed = SEED and the assignments
  python - "$@" <<'EOF'
import sys, yaml
from rlhf.seeds import training_seed_keys
path, seed, items = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
p = yaml.safe_load(open("params.yaml"))
for key in training_seed_keys(p):
    section, name = key.split(".")
    p[section][name] = seed
for item in items:
    key, value = item.split("=", 1)
    section, name = key.split(".")
    p[section][name] = yaml.safe_load(value)
yaml.safe_dump(p, open(path, "w"), sort_keys=False)
EOF
}

for seed in $SEEDS; do
  dir="$OUT/seed-$seed"
  mkdir -p "$dir"
  params "$dir/params.yaml" "$seed"
  if [ "$seed" = 0 ]; then
    models=models
  else
    models="$dir/models"
    if [ ! -f "$dir/reward.json" ]; then
      P=(--params "$dir/params.yaml")
      rlhf pretrain "${P[@]}" --corpus data/prepared/corpus.jsonl --out "$models/base" --metrics "$dir/pretrain.json" --plots "$dir/plots/pretrain" --checkpoints "$dir/ckpt/pretrain"
      rlhf sft "${P[@]}" --base "$models/base" --data data/prepared --world data/raw/world.json --out "$models/sft" --metrics "$dir/sft.json" --plots "$dir/plots/sft" --checkpoints "$dir/ckpt/sft"
      rlhf sample "${P[@]}" --model "$models/sft" --prompts data/prepared/rm.jsonl --out "$dir/candidates.jsonl" --metrics "$dir/sample.json"
      rlhf rank "${P[@]}" --candidates "$dir/candidates.jsonl" --world data/raw/world.json --labels labels/human.jsonl --out "$dir/rankings.jsonl" --metrics "$dir/rank.json"
      rlhf reward "${P[@]}" --sft "$models/sft" --data "$dir/rankings.jsonl" --demos data/prepared/sft.jsonl --world data/raw/world.json --out "$models/reward" --metrics "$dir/reward.json" --plots "$dir/plots/reward" --checkpoints "$dir/ckpt/reward"
    fi
  fi
  for beta in $KL; do
    run="$dir/$prefix-$beta"
    mkdir -p "$run"
    if [ ! -f "$run/ppo.json" ]; then
      rlhf ppo --params "$dir/params.yaml" --set "ptx_coef=$PTX" --set "kl_coef=$beta" --sft "$models/sft" --reward "$models/reward" \
        --data data/prepared --world data/raw/world.json --out "$run/policy" --value-out "$run/value" \
        --metrics "$run/ppo.json" --plots "$run/plots" --checkpoints "$run/ckpt"
    fi
    if [ ! -f "$run/evaluate.json" ]; then
      params "$run/eval.yaml" "$seed" "evaluate.models={sft: $models/sft, $name: $run/policy}" \
        "evaluate.pairs=[[$name, sft]]" "evaluate.suites=[]"
      rlhf evaluate --params "$run/eval.yaml" --plots "$run/plots" --stage-metrics "$run/ppo.json" \
        --reports "$run/reports" --metrics "$run/evaluate.json" --headline "$run/headline.json"
    fi
  done
done
