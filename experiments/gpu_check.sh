#!/usr/bin/env bash
# The GPU issue's figures in one device call (one H100 or H200: gpu.txt and the results name the
# card; at most 10 minutes): the throughput benchmark without compilation (teacher and student
# img/s and TFLOP/s, the teacher cache's build rate, the cached-teacher student and its ratio to
# the CE student, Lion's kernels), the checkpoint writes beside training
# (benchmarks/checkpoint_write.py), then the GPU protocol (experiments/gpu_protocol.sh). The logs, a snapshot of the MLflow database (every minute and at the end), and what the protocol
# wrote in this call (its README section; its run logs, Optuna study and figures in one tar)
# land in $OUT, which the device tool brings back (at most 8 files: here 7), also when a step
# fails or runs out of time. Only a kill outright loses the last minute.
#
# Prepare here, once: python experiments/gpu_prepare.py ../shared/data/imagenette
# (the wheels the machine's image lacks in .whl/, the data as 147 px WebP in .gpu/, 61 of the
# transfer's 64 MiB together), then call with BUDGET_S 30 s under the call's real limit
# (timeout_s, or less where less device time is left):
#   run: BUDGET_S=570 bash experiments/gpu_check.sh        carry: .gpu, .whl   timeout_s: 600
# PART=scaling instead times the compile modes (minutes of compilation each) beside the plain
# CE step (BENCH_S: 300 s), then benchmarks/gpu_workers.py (trials per hour with 1, 2 and 4
# sweep workers on the one GPU). It does not fit beside the protocol, and a session's 15 minutes
# of device time hold one such call (a machine's start takes a minute or more): it is another
# session's call.
set -euo pipefail
PART=${PART:-protocol}
[[ $PART == protocol || $PART == scaling ]] ||
  { echo "PART must be protocol or scaling, not ${PART}" >&2; exit 2; }
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu}
WORK=${TMPDIR:-/tmp}/conkd-gpu
# A warm machine keeps /tmp: earlier measurements' studies and caches would skew these.
rm -rf "$WORK/bench" "$WORK/workers" "$WORK/data"
mkdir -p "$OUT" "$WORK"
# The store stays outside $OUT (its artifacts would not come back); a consistent copy of the
# database (SQLite's backup, while runs may still write) goes there every minute and at exit.
STORE=$WORK/mlflow.db
snapshot() {
  [ -f "$STORE" ] || return 0
  python3 - "$STORE" "$OUT/.mlflow.db" <<'EOF' && mv "$OUT/.mlflow.db" "$OUT/mlflow.db"
import sqlite3, sys
sqlite3.connect(sys.argv[1]).backup(sqlite3.connect(sys.argv[2]))
EOF
}
(while sleep 60; do snapshot || true; done) >/dev/null 2>&1 &
keeper=$!
trap 'kill "$keeper" 2>/dev/null; set +e; snapshot' EXIT
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$WORK/site" .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:$WORK/site"
fi
PY=${PY:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
# Fail in seconds, not minutes in, where a carried package is missing or clashes with the
# image's: import what a run, a sweep and the store load lazily, and create the store.
"$PY" -c "
import sys
import alembic, greenlet, sqlalchemy, lion_pytorch, mlflow.pytorch, optuna
import mlflow.store.tracking.sqlalchemy_store
import hydra_plugins.hydra_optuna_sweeper, hydra_plugins.conkd_optuna_sweeper.conkd_optuna_sweeper
import conkd.run
from conkd.tracking.store import prepare_store
prepare_store(sys.argv[1])
" "sqlite:///$STORE"
DATA=${1:-}
if [ -z "$DATA" ]; then
  archives=(.gpu/*.tar.gz)
  [ "${#archives[@]}" == 1 ] && [ -f "${archives[0]}" ] ||
    { echo "want one data archive in .gpu/, found: ${archives[*]}" >&2; exit 1; }
  mkdir -p "$WORK/data" && tar -xzf "${archives[0]}" -C "$WORK/data"
  DATA=$(find "$WORK/data" -mindepth 1 -maxdepth 1 -type d)
fi
[ -d "$DATA/train" ] || { echo "no train/ folder in the data: $DATA" >&2; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
# BUDGET_S is shared out such that whatever was measured comes back: each timed step prints its
# figures as it measures them, and `timed` says whether it stopped at its limit or failed.
BUDGET_S=${BUDGET_S:-570}
timed() {  # timed SECONDS LOG COMMAND...
  local limit=$1 log=$2 rc=0 start=$SECONDS
  shift 2
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT/$log" || rc=$?
  if [[ $rc == 124 || ($rc == 137 && $((SECONDS - start)) -ge $limit) ]]; then
    echo "[gpu_check] $log: stopped at its ${limit} s"
  elif [[ $rc != 0 ]]; then
    echo "[gpu_check] $log: failed (exit $rc)"
  fi
}
left() { local s=$((BUDGET_S - SECONDS - $1)); echo $((s > 0 ? s : 1)); }
BENCH=("$PY" benchmarks/gpu_throughput.py --data "$DATA" --image-size 128 --steps 30
       --workdir "$WORK/bench")
case $PART in
  protocol)  # the benchmark without compilation, the checkpoint writer, then the protocol (its
             # table gets a minute)
    timed "${BENCH_S:-120}" gpu_throughput.log "${BENCH[@]}" --compile false
    # Checkpoints written beside training: how long each writer holds the training thread, and
    # whether the background files hold what direct writes hold. Where that is not confirmed
    # for both networks, the protocol writes its checkpoints directly.
    timed "${CKPT_S:-60}" checkpoint_write.log "$PY" benchmarks/checkpoint_write.py \
      --device cuda --image-size 128 --batch-size 128 --steps 10 --epochs 2 --rounds 1
    WRITES=()
    [ "$(grep -sc 'holds what a direct write holds' "$OUT/checkpoint_write.log")" == 2 ] || {
      echo "[gpu_check] background checkpoints not confirmed: the protocol writes directly"
      WRITES=(--set trainer.checkpoint_background=false)
    }
    # Nothing logged as an artifact comes back from this machine: skip the model exports, and
    # the teacher's registration (an export too; the students name its checkpoint instead).
    RUN_S=$(left 60) KEEP="$OUT" TRACKING_URI="sqlite:///$STORE" PY="$PY" \
      bash experiments/gpu_protocol.sh "$DATA" --set mlflow.log_model=false \
      --set mlflow.log_checkpoint=false --set mlflow.register=null ${WRITES[@]+"${WRITES[@]}"} \
      2>&1 | tee "$OUT/gpu_protocol.log" ;;
  scaling)  # the compile modes beside the plain CE step, then 1, 2 and 4 sweep workers
    timed "${BENCH_S:-300}" gpu_throughput.log "${BENCH[@]}" --only-ce \
      --compile false,default,reduce-overhead
    timed "$(left 0)" gpu_workers.log "$PY" benchmarks/gpu_workers.py --data "$DATA" \
      --workers 1,2,4 --per-worker 3 --epochs 3 --workdir "$WORK/workers" ;;
esac
