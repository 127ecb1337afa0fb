#!/usr/bin/env bash
# The evidence sweep, one run at a time, seeds interleaved so that pairs (method, supervised) finish early.
# Resumable: a finished run is skipped, an interrupted one continues from its checkpoints/last.ckpt.
# Run directories stay in RUNS_DIR (outside the repository); after each finished run, collect.py adds its
# figures to the committed tables experiments/evidence/{runs,curves,per_image_mIoU}.csv, and a run already in
# runs.csv is skipped, so the sweep can continue in another sitting on another machine.
#
# usage: SEMISEG_DATA_DIR=/path/holding/NEU_data experiments/evidence/sweep.sh [RUNS_DIR]
#   METHODS_A="supervised uaps" SEEDS_A="0 1 2 3 4" METHODS_B="mean_teacher cps fixmatch unimatch" SEEDS_B="0 1 2"
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${SEMISEG_DATA_DIR:?set SEMISEG_DATA_DIR to the folder that holds NEU_data}"
RUNS_DIR="${1:-${EVIDENCE_RUNS_DIR:-$HOME/semiseg_runs/evidence}}"
PYTHON="${PYTHON:-.venv/bin/python}"
TABLE=experiments/evidence/runs.csv
METHODS_A="${METHODS_A:-supervised uaps}"
SEEDS_A="${SEEDS_A:-0 1 2 3 4}"
METHODS_B="${METHODS_B:-mean_teacher cps fixmatch unimatch}"
SEEDS_B="${SEEDS_B:-0 1 2}"

run_one() {  # method seed
  local name="$1_s$2" dir="$RUNS_DIR/$1_s$2"
  # `touch RUNS_DIR/pause` holds the sweep between runs (e.g. to free the CPU for a benchmark); rm it to go on
  while [ -f "$RUNS_DIR/pause" ]; do sleep 20; done
  if [ -f "$TABLE" ] && grep -q "^$1,$2," "$TABLE"; then echo "in $TABLE already: $name"; return; fi
  echo "$(date -u +%FT%TZ) start $name"
  "$PYTHON" -m semiseg.train experiment=evidence_neu_cpu "method=$1" "seed=$2" data.num_workers=0 \
    logger=csv resume=true "hydra.run.dir=$dir"
  "$PYTHON" experiments/evidence/collect.py "$dir"
  echo "$(date -u +%FT%TZ) done $name"
}

for seed in $SEEDS_A; do for method in $METHODS_A; do run_one "$method" "$seed"; done; done
for seed in $SEEDS_B; do for method in $METHODS_B; do run_one "$method" "$seed"; done; done
