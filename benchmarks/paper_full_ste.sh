#!/bin/bash
# One pair of the `paper` recipe under the STE-MM authors' full STE budget (ste-mm-random: 10 epochs on the
# 60000 training images, Adam 1e-3, batch 256; e5-a/STE-MM configs/rebasin/method/ste.yaml), beside WM and the
# naive path: test loss barrier (first 2000 test images, 11 lambdas, as the recipe), R(0)/R(0.3), L2 reduction.
# The recipe itself runs 1 epoch on 10000 images (1.7% of this budget) to fit 2 CPU cores.
#   benchmarks/paper_full_ste.sh RUN_A RUN_B OUT      # RUN_*: model stage folders of `lmckit reproduce --recipe paper`
set -euo pipefail
A=$1; B=$2; O=$3; mkdir -p "$O"
lmckit match "$A" "$B" --method ste --ste-protocol ste-mm-random --epochs 10 --out "$O/ste-mm-random.json" --quiet
lmckit match "$A" "$B" --method weight --out "$O/wm.json" --quiet
for p in wm ste-mm-random; do
  lmckit barrier "$A" "$B" --perm "$O/$p.json" --split test --limit 2000 --points 11 --json --quiet > "$O/barrier-$p.json"
  lmckit analyze "$A" "$B" --perm "$O/$p.json" --no-data --gamma 0 0.3 --json --quiet > "$O/analyze-$p.json"
done
lmckit barrier "$A" "$B" --split test --limit 2000 --points 11 --json --quiet > "$O/barrier-naive.json"
