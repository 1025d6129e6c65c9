#!/usr/bin/env bash
# Issue 18's task quality: shared_basis at 5 / 10 / 20 % of the five separate adapters' storage,
# Table 1 setting (SmolLM2-135M-Instruct, five English tasks, 150 examples per task), choices
# tuned on val first, then reported on test. Resumable: finished bundles are kept (runs/, ignored
# by git) and generations come from benchmarks/results/eval-cache.
#
#   benchmarks/shared_basis_quality.sh val    # at 10 %: closed form vs MAE refinement, on val
#   benchmarks/shared_basis_quality.sh test [REFINE_STEPS]  # 5 / 10 / 20 % on test (default 0)
#
# Runs niced (NICE, default 19), one torch thread (THREADS) per job: the box is shared.
set -euo pipefail
source "$(dirname "$0")/table1_eval.sh"
BUNDLES=runs/shared-basis

merge() {  # merge OUT [hydraopt merge options...]; a finished bundle is kept
  local out=$1; shift
  [ -f "$out/bundle.json" ] && return 0
  stamp "merge $out $*"
  hydra merge "${EN[@]/#/examples/adapters/}" --method shared_basis --threads 2 --out "$out" \
    --force "$@" > /dev/null 2>&1 || { echo "merge $out failed" >&2; return 1; }
}

step_val() {
  merge "$BUNDLES/b10" --budget 10
  merge "$BUNDLES/b10_refine50" --budget 10 --refine-steps 50
  evaluate "$RES/shared-basis-val" val \
    --system "bundle=$BUNDLES/b10:shared_basis 10 %" \
    --system "bundle=$BUNDLES/b10_refine50:shared_basis 10 % refined (50 MAE steps)"
}
step_test() {  # step_test [REFINE_STEPS]
  local steps=${1:-0} b suffix="" systems=()
  [ "$steps" = 0 ] || suffix=_refine$steps
  for b in 10 5 20; do
    merge "$BUNDLES/b$b$suffix" --budget "$b" --refine-steps "$steps"
    systems+=(--system "bundle=$BUNDLES/b$b$suffix:shared_basis $b %")
  done
  evaluate "$RES/shared-basis-test" test "${systems[@]}"
}

step=${1:?usage: shared_basis_quality.sh val|test [REFINE_STEPS]}
shift
declare -F "step_$step" >/dev/null || { echo "unknown step: $step" >&2; exit 2; }
"step_$step" "$@"
