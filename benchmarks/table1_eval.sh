# Sourced by benchmarks/ablations.sh and benchmarks/shared_basis_quality.sh: the Table 1
# evaluation setting (five English tasks, 150 examples per split, batch 16, the committed
# generation cache) and the niced CLI runner, so both drivers decode under one definition.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" OMP_WAIT_POLICY=PASSIVE \
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PY:-/work/main/.venv/bin/python}
THREADS=${THREADS:-1}
NICE=${NICE:-19}  # NICE=5 when the job must get its share of a busy box
TASKS_ROOT=${TASKS_ROOT:-../shared/tasks}
CACHE=benchmarks/results/eval-cache
EN=(en-gc en-sr en-ts en-ta en-qa)
RES=benchmarks/results
hydra() { nice -n "$NICE" "$PY" -m hydraopt.cli.main "$@"; }
stamp() { echo "[$(date -u +%H:%M:%S)] $*"; }
evaluate() {  # evaluate OUT SPLIT [--system ...]
  local out=$1 split=$2; shift 2
  stamp "evaluate -> $out ($split)"
  hydra evaluate --tasks "${EN[@]}" --split "$split" --limit 150 --batch-size 16 \
    --threads "$THREADS" --tasks-root "$TASKS_ROOT" --out "$out" --cache "$CACHE" --quiet "$@"
}
