#!/usr/bin/env bash
# Issue 20's ablations (paper Table 5, Fig. 5, Fig. 6, Table 17, and the M = 1 default on val),
# as one resumable driver: every step skips what is already done (finished adapters are kept,
# generations come from benchmarks/results/eval-cache), so re-running it only does what is missing.
#
#   benchmarks/ablations.sh finetune [8|16]  # r = 8 / 16 adapters (examples/adapters-r{8,16})
#   benchmarks/ablations.sh distance   # Fig. 5: --distance mae|mse|fro|cos at M = 1, 2, 5
#   benchmarks/ablations.sh aonly      # Fig. 6: *_a_only merges vs HydraOpt M = 5
#   benchmarks/ablations.sh valcore    # M = 1 default on val: distances, head scale, TIES
#   benchmarks/ablations.sh val        # the same plus the baselines' coefficient grids on val
#   benchmarks/ablations.sh rank [8|16]      # Table 5: per-rank tables (needs `finetune`)
#   benchmarks/ablations.sh m1tables   # M = 1 x1.5 on the QA x4 and all-8 tables (test)
#   benchmarks/ablations.sh valties    # TIES weight/density grid on val
#   benchmarks/ablations.sh tiestest   # the best val-tuned TIES on test (Table 1 setting)
#   benchmarks/ablations.sh valtest    # the val grid's systems on test (Table 1 setting)
#   benchmarks/ablations.sh valbase [ta|dare|darets]  # TA / DARE / DARE-TIES weight grids on val
#   benchmarks/ablations.sh valbasetest ta=W dare=W darets=W  # their best val rows on test
#   benchmarks/ablations.sh cost [SHAPE]     # Table 17: merge time and peak RSS of every method
#   benchmarks/ablations.sh report     # print the tables, write the distance PNG
#   benchmarks/ablations.sh all        # all of the above, in this order
#
# Runs niced (NICE, default 19), one torch thread per job (the box is shared); THREADS=2 to use more.
set -euo pipefail
source "$(dirname "$0")/table1_eval.sh"

# r = 8 and r = 16 with alpha = 4r (the shipped r = 32 adapters use alpha = 128 = 4r; the paper
# gives r = 32 / alpha = 128 only and does not say how alpha moves with r, so alpha / r is kept).
step_finetune() {  # step_finetune [RANK...] (default 8 16)
  local r t out
  for r in ${@:-8 16}; do
    for t in "${EN[@]}"; do
      out=examples/adapters-r$r/$t
      if [ -f "$out/adapter_model.safetensors" ]; then stamp "r=$r $t done"; continue; fi
      stamp "finetune r=$r $t"
      hydra finetune "$t" --rank "$r" --alpha $((4 * r)) --out "$out" --threads "$THREADS" \
        --tasks-root "$TASKS_ROOT" --force --quiet
    done
  done
}

# Bundles live under runs/ablations/ (ignored by git), one dir per merge; a finished one is kept.
# Merges run at MERGE_THREADS = 2 because the merge's float reductions depend on the thread
# count: at 2 the MAE bundles are bit-identical to Table 1's (run with --threads 2), so their
# generations come from the committed cache; at 1 they differ in the last bits and miss it.
MERGE_THREADS=${MERGE_THREADS:-2}
BUNDLES=runs/ablations
merge() {  # merge OUT ADAPTER_ROOT [hydraopt merge options...]
  local out=$1 root=$2; shift 2
  [ -f "$out/bundle.json" ] && return 0
  stamp "merge $out $*"
  hydra merge "${EN[@]/#/$root/}" --threads "$MERGE_THREADS" --out "$out" --force "$@" \
    > /dev/null 2>&1 || { echo "merge $out failed" >&2; return 1; }
}

# Paper Fig. 5: HydraOpt's distance at M = 1, 2, 5 on the r = 32 adapters.
step_distance() {
  local m d
  SYSTEMS=(--system zero-shot --system lora=examples/adapters:LoRA)
  for m in 1 2 5; do
    for d in mae mse fro cos; do
      merge "$BUNDLES/r32/hydraopt_${d}_M$m" examples/adapters --heads "$m" --distance "$d"
      SYSTEMS+=(--system "bundle=$BUNDLES/r32/hydraopt_${d}_M$m:hydraopt $d M=$m")
    done
    # A table after each M (the rows of the smaller M come from the cache), so a run stopped
    # part way still leaves the finished M's results.
    evaluate "$RES/ablation-distance" test "${SYSTEMS[@]}"
  done
}

# Paper Fig. 6: the classic merges on A only (every B kept, 52 % at K = 5) vs HydraOpt M = 5.
step_aonly() {
  SYSTEMS=(--system zero-shot --system lora=examples/adapters:LoRA)
  for m in task_arithmetic ties dare_linear dare_ties; do
    merge "$BUNDLES/r32/$m" examples/adapters --method "$m"
    merge "$BUNDLES/r32/${m}_a_only" examples/adapters --method "${m}_a_only"
    SYSTEMS+=(--system "bundle=$BUNDLES/r32/$m:$m" --system "bundle=$BUNDLES/r32/${m}_a_only:${m}_a_only")
  done
  merge "$BUNDLES/r32/hydraopt_mae_M5" examples/adapters --heads 5
  SYSTEMS+=(--system "bundle=$BUNDLES/r32/hydraopt_mae_M5:hydraopt M=5")
  evaluate "$RES/ablation-a-only" test "${SYSTEMS[@]}"
}

# Item 5: HydraOpt M = 1 per distance and the baselines over coefficient grids, on val. The
# paper's coefficients (TA / DARE 1/K = 0.2, TIES / DARE-TIES 1.0, density 0.5) are grid points.
val_core_systems() {
  local d f
  SYSTEMS=()
  for d in mae mse fro cos; do
    merge "$BUNDLES/r32/hydraopt_${d}_M1" examples/adapters --heads 1 --distance "$d"
    SYSTEMS+=(--system "bundle=$BUNDLES/r32/hydraopt_${d}_M1:hydraopt $d M=1")
  done
  # Head magnitude calibration: the MAE M = 1 heads times f (ΔW' norm is ~0.5x each task's,
  # TIES's ~1.3x; `ablations.py magnitude`).
  for f in 1.5 2 2.5; do
    [ -f "$BUNDLES/r32/hydraopt_mae_M1_x$f/bundle.json" ] ||
      nice -n "$NICE" "$PY" benchmarks/ablations.py scale-heads "$BUNDLES/r32/hydraopt_mae_M1" \
        --factor "$f" --out "$BUNDLES/r32/hydraopt_mae_M1_x$f" 2>/dev/null
    SYSTEMS+=(--system "bundle=$BUNDLES/r32/hydraopt_mae_M1_x$f:hydraopt mae M=1 heads x$f")
  done
  ties_system 1.0 0.5
}
ties_system() {  # WEIGHT DENSITY
  merge "$BUNDLES/r32/ties_w$1_d$2" examples/adapters --method ties --density "$2" \
    --weights $1 $1 $1 $1 $1
  SYSTEMS+=(--system "bundle=$BUNDLES/r32/ties_w$1_d$2:ties w=$1 d=$2")
}
ta_system() {  # WEIGHT
  merge "$BUNDLES/r32/task_arithmetic_w$1" examples/adapters --method task_arithmetic \
    --weights $1 $1 $1 $1 $1
  SYSTEMS+=(--system "bundle=$BUNDLES/r32/task_arithmetic_w$1:task_arithmetic w=$1")
}
val_systems() {
  local w dn
  val_core_systems
  SYSTEMS=(--system zero-shot --system lora=examples/adapters:LoRA "${SYSTEMS[@]}")
  ta_system 0.2
  for w in 1.0 0.5 1.5; do
    for dn in 0.5 0.3 0.7; do
      [ "$w/$dn" = 1.0/0.5 ] || ties_system "$w" "$dn"
    done
  done
  ta_system 0.5
  ta_system 1.0
  for w in 0.2 0.5 1.0; do
    merge "$BUNDLES/r32/dare_linear_w${w}_d0.5" examples/adapters --method dare_linear \
      --density 0.5 --weights $w $w $w $w $w
    SYSTEMS+=(--system "bundle=$BUNDLES/r32/dare_linear_w${w}_d0.5:dare_linear w=$w d=0.5")
  done
  for w in 0.5 1.0; do
    merge "$BUNDLES/r32/dare_ties_w${w}_d0.5" examples/adapters --method dare_ties \
      --density 0.5 --weights $w $w $w $w $w
    SYSTEMS+=(--system "bundle=$BUNDLES/r32/dare_ties_w${w}_d0.5:dare_ties w=$w d=0.5")
  done
}
step_valcore() {  # the rows that decide the M = 1 default, a table of their own
  val_core_systems
  evaluate "$RES/ablation-val-core" val "${SYSTEMS[@]}"
}
step_val() {  # the baselines' whole grid next to them (the core rows come from the cache)
  val_systems
  evaluate "$RES/ablation-val" val "${SYSTEMS[@]}"
}
# The same systems on test (Table 1 setting), so the val-chosen rows can be read off next to the
# paper's coefficients.
step_valtest() {
  val_systems
  evaluate "$RES/ablation-val-test" test "${SYSTEMS[@]}"
}

# Item 5 on the other two tables: the val-chosen M = 1 (heads x1.5) on QA x4 and all-8 (test,
# 100 examples per task, their tables' setting; TIES and unscaled M = 1 rows are in table-qa4 /
# table-all8). Each table gets its own results dir.
step_m1tables() {
  local name root tasks out
  for name in qa4 all8; do
    case $name in
      qa4) root=examples/adapters-multilingual; tasks=(en-qa de-qa es-qa zh-qa) ;;
      all8) root=examples/adapters-all; tasks=(en-gc en-sr en-ts en-ta en-qa de-qa es-qa zh-qa) ;;
    esac
    out=$BUNDLES/$name/hydraopt_mae_M1_x1.5
    if [ ! -f "$out/bundle.json" ]; then
      stamp "merge $out"
      hydra merge "${tasks[@]/#/$root/}" --heads 1 --head-scale 1.5 --threads "$MERGE_THREADS" \
        --out "$out" --force > /dev/null 2>&1 || { echo "merge $out failed" >&2; return 1; }
    fi
    stamp "evaluate -> $RES/ablation-m1-$name (test)"
    hydra evaluate --tasks "${tasks[@]}" --split test --limit 100 --batch-size 16 \
      --threads "$THREADS" --tasks-root "$TASKS_ROOT" --out "$RES/ablation-m1-$name" \
      --cache "$CACHE" --quiet --system "bundle=$out:hydraopt M=1 heads x1.5"
  done
}

# Item 5, fair both ways: TIES's weight and density on val (the paper's w = 1, d = 0.5 is the
# centre; valcore has it), so the best val-tuned TIES can be read off next to M = 1 x1.5.
step_valties() {
  local wd
  SYSTEMS=()
  for wd in 1.0/0.5 0.5/0.5 1.5/0.5 1.0/0.3 1.0/0.7; do ties_system "${wd%/*}" "${wd#*/}"; done
  evaluate "$RES/ablation-val-ties" val "${SYSTEMS[@]}"
}

# Item 5, the other baselines on val. PEFT-style factor-space merges put sqrt(w) on each side, so
# with five near-identical A's (same seed) the paper's w = 1/K gives about the *sum* of the five
# updates (RESULTS.md section 3, item 3): the grid therefore goes *down* from the paper's weight,
# to 1/K^2 (about the mean) for TA, and a further 1/4 for DARE's 1/density rescale on both sides.
# One family per call so two evaluators can run side by side on disjoint systems.
VALBASE_GRID_ta="0.2 0.1 0.04 0.02"
VALBASE_GRID_dare="0.2 0.04 0.01"
VALBASE_GRID_darets="1.0 0.5 0.25 0.125"
family_system() {  # family_system FAMILY WEIGHT: merge one grid point, add it to SYSTEMS
  case $1 in
    ta) ta_system "$2" ;;
    dare) dare_system dare_linear "$2" ;;
    darets) dare_system dare_ties "$2" ;;
    *) echo "valbase: unknown family $1 (ta | dare | darets)" >&2; return 2 ;;
  esac
}
valbase_systems() {  # valbase_systems FAMILY: the family's whole grid
  local w grid="VALBASE_GRID_$1"
  SYSTEMS=()
  for w in ${!grid:-}; do family_system "$1" "$w"; done
  [ -n "${!grid:-}" ] || family_system "$1" 0
}
dare_system() {  # METHOD WEIGHT (density 0.5, the paper's)
  merge "$BUNDLES/r32/$1_w$2_d0.5" examples/adapters --method "$1" --density 0.5 \
    --weights $2 $2 $2 $2 $2
  SYSTEMS+=(--system "bundle=$BUNDLES/r32/$1_w$2_d0.5:$1 w=$2 d=0.5")
}
step_valbase() {  # step_valbase [FAMILY...] (default ta dare darets): one results dir per family
  local f
  for f in ${@:-ta dare darets}; do
    valbase_systems "$f"
    evaluate "$RES/ablation-val-$f" val "${SYSTEMS[@]}"
  done
}
# The best val row of each family on test, next to the paper's coefficients (Table 1 setting).
step_valbasetest() {  # step_valbasetest FAMILY=WEIGHT... e.g. ta=0.04 dare=0.01 darets=0.25
  local fw f w
  SYSTEMS=()
  for fw in "$@"; do
    f=${fw%=*} w=${fw#*=}
    family_system "$f" "$w"
  done
  evaluate "$RES/ablation-valbase-test" test "${SYSTEMS[@]}"
}

# Item 5's must-show: the val grid's best TIES (w = 1, d = 0.3; ablation-val-ties) on test next
# to the default M = 1 (heads x1.5) and the paper's TIES, all three from the cache but the first.
step_tiestest() {
  SYSTEMS=()
  ties_system 1.0 0.3
  ties_system 1.0 0.5
  merge "$BUNDLES/r32/hydraopt_mae_M1_hs1.5" examples/adapters --heads 1 --head-scale 1.5
  SYSTEMS+=(--system "bundle=$BUNDLES/r32/hydraopt_mae_M1_hs1.5:hydraopt M=1 (default, heads x1.5)")
  evaluate "$RES/ablation-ties-test" test "${SYSTEMS[@]}"
}

# Paper Table 5: the Table 1 rows at r = 8 and r = 16 (each once its five adapters exist).
step_rank() {  # step_rank [RANK...] (default 8 16)
  local r m
  for r in ${@:-8 16}; do
    if ! ls examples/adapters-r$r/*/adapter_model.safetensors 2>/dev/null | wc -l | grep -qx 5; then
      stamp "r=$r: adapters not finished, skipped"; continue
    fi
    SYSTEMS=(--system zero-shot --system "lora=examples/adapters-r$r:LoRA")
    for m in task_arithmetic ties dare_linear dare_ties; do
      merge "$BUNDLES/r$r/$m" "examples/adapters-r$r" --method "$m"
      SYSTEMS+=(--system "bundle=$BUNDLES/r$r/$m:$m")
    done
    for m in 1 2 5; do
      merge "$BUNDLES/r$r/hydraopt_mae_M$m" "examples/adapters-r$r" --heads "$m"
      SYSTEMS+=(--system "bundle=$BUNDLES/r$r/hydraopt_mae_M$m:hydraopt M=$m")
    done
    evaluate "$RES/ablation-rank-r$r" test "${SYSTEMS[@]}"
  done
}

# Paper Table 17: merge time and peak RSS of every registered method (examples + Llama-1B shape).
step_cost() {  # step_cost [SHAPE...] (default examples llama-3.2-1b); one results dir per shape
  local shape
  for shape in ${@:-examples llama-3.2-1b}; do
    [ -f "$RES/ablation-cost-$shape/cost.json" ] && { stamp "cost $shape done"; continue; }
    stamp "cost $shape"
    nice -n "$NICE" "$PY" benchmarks/ablations.py cost --shapes "$shape" --threads "$THREADS" \
      --out "$RES/ablation-cost-$shape"
  done
}
step_report() { "$PY" benchmarks/ablations.py report; }

step_all() {
  step_finetune
  step_valcore
  step_distance
  step_val
  step_aonly
  step_rank
  step_valtest
  step_cost
  step_report
}

step=${1:-all}
[ $# -gt 0 ] && shift
declare -F "step_$step" >/dev/null || { echo "unknown step: $step" >&2; exit 2; }
"step_$step" "$@"
