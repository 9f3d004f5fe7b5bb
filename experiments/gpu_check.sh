#!/usr/bin/env bash
# The GPU issue's figures in one device call (one H200, at most 10 minutes): the throughput
# benchmark without compilation (teacher and student img/s and TFLOP/s, the teacher cache's
# build rate, the cached-teacher student and its ratio to the CE student, Lion's kernels), then
# the GPU protocol (experiments/gpu_protocol.sh). Logs, the MLflow database, the protocol's run
# logs and Optuna study (one tar) and the written README section land in $OUT (the device tool
# brings that folder back: at most 8 files), also when a step fails or runs out of time.
#
# Prepare here, once: python experiments/gpu_prepare.py ../shared/data/imagenette
# (the wheels the machine's image lacks in .whl/, the data as 147 px WebP in .gpu/, 61 of the
# transfer's 64 MiB together), then, with the call's timeout_s at 600:
#   run: BUDGET_S=570 bash experiments/gpu_check.sh        carry: .gpu, .whl
# PART=scaling instead (a second call: they do not fit beside the protocol) times the compile
# modes (minutes of compilation each) beside the plain step, then benchmarks/gpu_workers.py:
# trials per hour with 1, 2 and 4 sweep workers on the one GPU.
set -euo pipefail
PART=${PART:-protocol}
[[ $PART == protocol || $PART == scaling ]] ||
  { echo "PART must be protocol or scaling, not ${PART}" >&2; exit 2; }
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu}
WORK=${TMPDIR:-/tmp}/conkd-gpu
mkdir -p "$OUT" "$WORK/data"
# The store stays outside $OUT: its artifacts (checkpoints, models) would not come back.
STORE=$WORK/mlflow.db
bring_back() {
  [ -f "$STORE" ] && cp "$STORE" "$OUT/"
  awk '/<!-- protocol:gpu128:start -->/,/<!-- protocol:gpu128:end -->/' experiments/README.md \
    >"$OUT/gpu128_section.md"
  cp experiments/figures/gpu128_val_curves.png "$OUT/" 2>/dev/null || true
  find outputs/protocol/gpu128 experiments/figures \( -name '*.log' -o -name optuna.db \
    -o -name 'gpu128_*.png' \) 2>/dev/null | tar -czf "$OUT/protocol_files.tar.gz" -T - || true
}
trap bring_back EXIT
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
  for archive in .gpu/*.tar.gz; do tar -xzf "$archive" -C "$WORK/data"; done
  DATA=$(find "$WORK/data" -mindepth 1 -maxdepth 1 -type d | head -n 1)
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
# The device tool stops a command at its timeout_s (at most 600 s), so BUDGET_S (that less 30 s)
# is shared out such that whatever was measured comes back. Each timed step prints its figures
# as it measures them, and `timed` says whether a step stopped at its limit or failed.
BUDGET_S=${BUDGET_S:-570}
timed() {  # timed SECONDS LOG COMMAND...
  local limit=$1 log=$2 rc=0
  shift 2
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT/$log" || rc=$?
  if [[ $rc == 124 || $rc == 137 ]]; then
    echo "[gpu_check] $log: stopped at its ${limit} s"
  elif [[ $rc != 0 ]]; then
    echo "[gpu_check] $log: failed (exit $rc)"
  fi
}
left() { local s=$((BUDGET_S - SECONDS - $1)); echo $((s > 0 ? s : 1)); }
case $PART in
  protocol)  # the benchmark without compilation, then the protocol (its table gets a minute)
    timed "${BENCH_S:-120}" gpu_throughput.log "$PY" benchmarks/gpu_throughput.py --data "$DATA" \
      --image-size 128 --steps 30 --compile false --workdir "$WORK/bench"
    # Nothing logged as an artifact comes back from this machine: skip the model exports.
    RUN_S=$(left 60) TRACKING_URI="sqlite:///$STORE" PY="$PY" bash experiments/gpu_protocol.sh \
      "$DATA" --set mlflow.log_model=false --set mlflow.log_checkpoint=false 2>&1 |
      tee "$OUT/gpu_protocol.log" ;;
  scaling)  # the compile modes beside the plain step, then 1, 2 and 4 sweep workers on the GPU
    timed "${BENCH_S:-300}" gpu_throughput.log "$PY" benchmarks/gpu_throughput.py --data "$DATA" \
      --image-size 128 --steps 30 --compile false,default,reduce-overhead --workdir "$WORK/bench"
    timed "$(left 0)" gpu_workers.log "$PY" benchmarks/gpu_workers.py --data "$DATA" \
      --workers 1,2,4 --per-worker 3 --epochs 3 --workdir "$WORK/workers" ;;
esac
