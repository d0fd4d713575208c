#!/usr/bin/env bash
# Merging three vit-fmnist ViTs (seeds 0, 1, 2; width 32) under the permutation and orthogonal classes,
# anchor and MergeMany, without norm and with LayerNorm (issue 29). Models: the run store of
# benchmarks/symmetry_barriers.py (RUNS, default /tmp/symruns). Prints one summary line per merge and writes
# each merge folder under OUT (default /tmp/symmerge).
#
#   bash benchmarks/symmetry_merge.sh [RUNS] [OUT] > docs/results/symmetry-merge-vit-fmnist.txt
set -euo pipefail
RUNS=${1:-/tmp/symruns}
OUT=${2:-/tmp/symmerge}
mkdir -p "$OUT"
LMCKIT=${LMCKIT:-lmckit}
declare -A MODELS=(
  [none]="87d8e57e766c3451 b13bc23d050f3b03 1ce882421ec7471d"
  [layernorm]="026d725c162e842d 06da179769539c72 c3b02ac6fc3e2f34"
)
for norm in none layernorm; do
  paths=()
  for r in ${MODELS[$norm]}; do paths+=("$RUNS/train/$r"); done
  for sym in permutation orthogonal; do
    for multi in anchor mergemany; do
      dir="$OUT/$norm-$sym-$multi"
      rm -rf "$dir"
      $LMCKIT merge "${paths[@]}" --symmetry "$sym" --multi "$multi" --out "$dir" --limit 2500 --points 11 \
        --quiet --json > "$dir.json"
      python3 - "$dir.json" "$norm" "$sym" "$multi" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
b = r["pairwise_barriers"] + r["anchor_barriers"]
mean = sum(x["loss_barrier"] for x in b) / len(b)
curve = r["merged_accuracy_curve"]
label = [k for k in curve if k != "naive"][0]
print(f"{sys.argv[2]:10s} {sys.argv[3]:12s} {sys.argv[4]:10s} models acc {min(r['model_accuracies']):.4f}-"
      f"{max(r['model_accuracies']):.4f}  merged loss {r['merged_loss']:.4f} acc {r['merged_accuracy']:.4f}  "
      f"naive merged acc {curve['naive'][-1]['accuracy']:.4f}  mean pair loss barrier {mean:.4f} ({len(b)} pairs)  "
      f"{r['seconds']:.0f}s")
PY
    done
  done
done
