#!/usr/bin/env bash
# What limits the reward model on the default world: its size, the number of comparisons, the
# temperature of the candidates the labelers rank (issue "The RL step must earn its gain", item 1).
#
# Run from the repository root after `dvc repro rank` (needs models/sft, data/prepared, data/samples,
# data/rankings). Every variant trains a reward model with `rlhf reward` and measures it with
# `rlhf bestofn` on the held-out test prompts; nothing in the pipeline's own outputs is touched.
#
#   bash bench/rm_curve.sh OUT [VARIANT ...]     # OUT: a scratch folder, e.g. /tmp/rm_curve
#
# Variants (default: all):
#   base        the pipeline's RM: SFT-initialized, 1x comparisons, candidates at T=1, 5 epochs
#   big         its own larger base: pretrain hidden 256 x 6 layers (5.3M params) on the same corpus
#               (same tokenizer), SFT on the same demonstrations, then the RM (slow: ~20 min)
#   overlap2    every prompt ranked by 2 labelers (2x rankings of the same candidates), 3 epochs
#   double      2x prompts (the rm and the ppo prompt sets), 3 epochs (~ the same compute as base)
#   t07         candidates and best-of-n at temperature 0.7, 1x comparisons, 5 epochs
#   t07_half    as t07 with the rankings of half of the prompts
#   t07_double  as t07 with 2x prompts, 3 epochs
# `double` uses the PPO prompts for the RM: fine for measuring the RM; a pipeline that wants the data
# would draw a larger prompt pool instead (world.n_* params).
# Results: OUT/<variant>/reward.json (held-out accuracy vs labels and gold) and bestofn.json;
# `python bench/rm_curve.py OUT` tabulates them into bench/results/rm_curve.json.
set -euo pipefail
OUT=${1:?usage: bash bench/rm_curve.sh OUT [VARIANT ...]}
shift
VARIANTS=${*:-base overlap2 double t07 t07_half t07_double big}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"

params() {  # params() DIR KEY=VALUE...: DIR/params.yaml = params.yaml with the assignments
  local dir=$1; shift
  mkdir -p "$dir"
  python - "$dir/params.yaml" "$@" <<'EOF'
import sys, yaml
p = yaml.safe_load(open("params.yaml"))
for item in sys.argv[2:]:
    key, value = item.split("=", 1)
    section, name = key.split(".")
    p[section][name] = yaml.safe_load(value)
yaml.safe_dump(p, open(sys.argv[1], "w"), sort_keys=False)
EOF
}

candidates() {  # candidates() DIR PROMPTS NAME: sample + rank with DIR/params.yaml
  rlhf sample --params "$1/params.yaml" --model models/sft --prompts "$2" --out "$1/$3_candidates.jsonl" --metrics "$1/$3_sample.json"
  rlhf rank --params "$1/params.yaml" --candidates "$1/$3_candidates.jsonl" --world data/raw/world.json \
    --labels labels/human.jsonl --out "$1/$3_rankings.jsonl" --metrics "$1/$3_rank.json"
}

half() {  # half() IN OUT: the rankings of half of the prompts (all of a prompt's rankings together)
  python - "$1" "$2" <<'EOF'
import json, random, sys
rows = open(sys.argv[1]).read().splitlines()
prompts = sorted({json.loads(r)["prompt"] for r in rows})
random.Random(0).shuffle(prompts)
keep = set(prompts[: len(prompts) // 2])
open(sys.argv[2], "w").write("".join(r + "\n" for r in rows if json.loads(r)["prompt"] in keep))
EOF
}

measure() {  # measure() DIR RM_BASE RANKINGS
  rlhf reward --params "$1/params.yaml" --sft "$2" --data "$3" --demos data/prepared/sft.jsonl --world data/raw/world.json \
    --out "$1/reward" --metrics "$1/reward.json" --plots "$1/plots/reward" --checkpoints "$1/checkpoints/reward"
  rlhf bestofn --params "$1/params.yaml" --sft models/sft --reward "$1/reward" --test data/prepared/test.jsonl \
    --world data/raw/world.json --metrics "$1/bestofn.json" --plots "$1/plots/bestofn"
}

for v in $VARIANTS; do
  d="$OUT/$v"
  echo "== $v"
  case $v in
    base) params "$d"; measure "$d" models/sft data/rankings/rankings.jsonl ;;
    overlap2)
      params "$d" reward.epochs=3 rank.overlap_share=1.0 rank.overlap_labelers=2
      rlhf rank --params "$d/params.yaml" --candidates data/samples/candidates.jsonl --world data/raw/world.json \
        --labels labels/human.jsonl --out "$d/rankings.jsonl" --metrics "$d/rank.json"
      measure "$d" models/sft "$d/rankings.jsonl" ;;
    double)
      params "$d" reward.epochs=3
      candidates "$d" data/prepared/ppo.jsonl ppo
      cat data/rankings/rankings.jsonl "$d/ppo_rankings.jsonl" > "$d/rankings.jsonl"
      measure "$d" models/sft "$d/rankings.jsonl" ;;
    t07 | t07_half | t07_double)
      if [ $v = t07_double ]; then epochs=3; else epochs=5; fi
      params "$d" sample.temperature=0.7 bestofn.temperature=0.7 reward.epochs=$epochs
      candidates "$d" data/prepared/rm.jsonl rm
      cp "$d/rm_rankings.jsonl" "$d/rankings.jsonl"
      [ $v = t07_half ] && half "$d/rm_rankings.jsonl" "$d/rankings.jsonl"
      if [ $v = t07_double ]; then
        candidates "$d" data/prepared/ppo.jsonl ppo
        cat "$d/rm_rankings.jsonl" "$d/ppo_rankings.jsonl" > "$d/rankings.jsonl"
      fi
      measure "$d" models/sft "$d/rankings.jsonl" ;;
    big)
      params "$d" pretrain.hidden=256 pretrain.layers=6 pretrain.heads=8 pretrain.intermediate=768 pretrain.lr=0.002
      rlhf pretrain --params "$d/params.yaml" --out "$d/rm_base" --metrics "$d/pretrain.json" --plots "$d/plots/pretrain" \
        --checkpoints "$d/checkpoints/pretrain"
      rlhf sft --params "$d/params.yaml" --base "$d/rm_base" --data data/prepared --world data/raw/world.json \
        --out "$d/rm_sft" --metrics "$d/sft.json" --plots "$d/plots/sft" --checkpoints "$d/checkpoints/sft"
      measure "$d" "$d/rm_sft" data/rankings/rankings.jsonl ;;
    *) echo "unknown variant $v" >&2; exit 2 ;;
  esac
done
