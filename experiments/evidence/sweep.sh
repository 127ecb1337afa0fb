#!/usr/bin/env bash
# The evidence sweep, one run at a time, seeds interleaved so that pairs (method, supervised) finish early.
# Resumable: a finished run is skipped, an interrupted one continues from its checkpoints/last.ckpt.
# Run directories stay in RUNS_DIR (outside the repository). After each finished run, the report adds it to the
# committed run records (EVIDENCE_DIR/runs.jsonl: results, per-image scores, validation curves; no checkpoints)
# and rewrites the committed report (EVIDENCE_DIR/report/) from the records; a run already in the records is
# skipped, so the sweep can continue in another sitting on another machine.
#
# usage: SEMISEG_DATA_DIR=/path/holding/NEU_data experiments/evidence/sweep.sh [RUNS_DIR]
#   METHODS_A="supervised uaps" SEEDS_A="0 1 2 3 4" METHODS_B="mean_teacher cps fixmatch unimatch" SEEDS_B="0 1 2"
#   THREADS=1: torch threads a run (default: all cores). On 2 cores, two instances with THREADS=1 over disjoint
#   method/seed lists (the joblib shape, 1.71x the throughput of one 2-thread job: README "Performance") share
#   RUNS_DIR and the records; the report step holds a lock, so neither loses the other's record.
#   `touch RUNS_DIR/pause` holds the sweep before its next run (e.g. to free the CPU for a benchmark); rm to go on
#   EXPERIMENT=native_crops_mtiles EVIDENCE_DIR=experiments/native_resolution: another preset, its own records
#   (default: evidence_neu_cpu into experiments/evidence); give each preset its own RUNS_DIR
#   OVERRIDES="trainer.max_steps=1 ...": extra Hydra overrides for every run (a smoke test; they change the
#   runs' identity, so never mix such runs into real records)
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${SEMISEG_DATA_DIR:?set SEMISEG_DATA_DIR to the folder that holds NEU_data}"
RUNS_DIR="${1:-${EVIDENCE_RUNS_DIR:-$HOME/semiseg_runs/evidence}}"
PYTHON="${PYTHON:-.venv/bin/python}"
EVIDENCE_DIR="${EVIDENCE_DIR:-experiments/evidence}"
RECORDS="$EVIDENCE_DIR/runs.jsonl"
METHODS_A="${METHODS_A:-supervised uaps}"
SEEDS_A="${SEEDS_A:-0 1 2 3 4}"
METHODS_B="${METHODS_B-mean_teacher cps fixmatch unimatch}"  # set but empty: none
SEEDS_B="${SEEDS_B:-0 1 2}"
THREADS="${THREADS:-auto}"
EXPERIMENT="${EXPERIMENT:-evidence_neu_cpu}"
read -r -a EXTRA <<< "${OVERRIDES:-}"

recorded() {  # method seed: is the run in the records?
  [ -f "$RECORDS" ] && "$PYTHON" - "$RECORDS" "$1" "$2" <<'PY'
import json, sys
path, method, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
records = [json.loads(line)["results"] for line in open(path) if line.strip()]
sys.exit(0 if any(r["method"] == method and r["seed"] == seed for r in records) else 1)
PY
}

run_one() {  # method seed
  local name="$1_s$2" dir="$RUNS_DIR/$1_s$2"
  while [ -f "$RUNS_DIR/pause" ]; do sleep 20; done
  if recorded "$1" "$2"; then echo "in $RECORDS already: $name"; return; fi
  echo "$(date -u +%FT%TZ) start $name"
  "$PYTHON" -m semiseg.train "experiment=$EXPERIMENT" "method=$1" "seed=$2" data.num_workers=0 \
    "num_threads=$THREADS" logger=csv resume=true "hydra.run.dir=$dir" ${EXTRA[@]+"${EXTRA[@]}"}
  (
    flock 9  # one report at a time: each reads the records, adds its run and rewrites them
    local sources=("$dir")
    if [ -f "$RECORDS" ]; then sources=("$RECORDS" "$dir"); fi
    "$PYTHON" -m semiseg.report "${sources[@]}" --out "$EVIDENCE_DIR/report" --save-records "$RECORDS" > /dev/null
  ) 9> "$RUNS_DIR/.records.lock"
  echo "$(date -u +%FT%TZ) done $name"
}

for seed in $SEEDS_A; do for method in $METHODS_A; do run_one "$method" "$seed"; done; done
for seed in $SEEDS_B; do for method in $METHODS_B; do run_one "$method" "$seed"; done; done
