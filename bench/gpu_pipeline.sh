#!/usr/bin/env bash
# Every stage of dvc.yaml, in DAG order, without DVC, on the device that `device: auto` picks: the check
# that the whole pipeline runs on a GPU machine whose image has no DVC (dvclive is stood in for by
# bench/gpu_check.py's curve logger when it is missing). Works in a temporary copy of the repository
# and leaves the checkout alone.
#
#   bash bench/gpu_pipeline.sh                          # profiles/tiny.yaml, device: auto
#   PARAMS=params.yaml bash bench/gpu_pipeline.sh       # the default pipeline
#   PY=.venv/bin/python DEVICE=cpu bash bench/gpu_pipeline.sh
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PY:-python3}"
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac  # absolute: we cd below
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
for item in bench cli data labels profiles rlhf stages dvc.yaml params.yaml; do
  cp -r "$root/$item" "$work/"
done
cd "$work"
cp "$root/${PARAMS:-profiles/tiny.yaml}" params.yaml
sed -i "s/^\( *device:\) .*/\1 ${DEVICE:-auto}/" params.yaml
if ! "$PY" -c "import dvclive" 2>/dev/null; then
  mkdir -p stub/dvclive
  printf 'import sys\nsys.path.insert(0, %s)\nfrom gpu_check import _CurveLog as Live  # noqa: E402,F401\n' \
    "'$work/bench'" > stub/dvclive/__init__.py
  export PYTHONPATH="$work/stub:${PYTHONPATH:-}"
fi
export PYTHONPATH="$work:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Stage names and commands in dvc.yaml's dependency order (each stage after the stages whose outputs it reads).
"$PY" - > cmds.tsv <<'PY'
import yaml

stages = yaml.safe_load(open("dvc.yaml"))["stages"]
outs = {o if isinstance(o, str) else next(iter(o)): name for name, st in stages.items() for o in st.get("outs", [])}
done, order = set(), []
def visit(name):
    if name not in done:
        done.add(name)
        for dep in stages[name].get("deps", []):
            owner = next((s for o, s in outs.items() if dep == o or dep.startswith(o.rstrip("/") + "/")), None)
            if owner and owner != name:
                visit(owner)
        order.append(name)
for name in stages:
    visit(name)
for name in order:
    print(f"{name}\t{stages[name]['cmd']}")
PY
while IFS=$'\t' read -r name cmd; do
  start=$(date +%s)
  echo "== $name: $cmd"
  if ! eval "$PY -m cli ${cmd#rlhf }" > "log_$name.txt" 2>&1; then
    tail -30 "log_$name.txt"
    echo "FAILED: $name"
    exit 1
  fi
  grep -v "━" "log_$name.txt" | tail -1
  echo "   ok, $(( $(date +%s) - start )) s"
done < cmds.tsv
