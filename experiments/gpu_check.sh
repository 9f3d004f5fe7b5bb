#!/usr/bin/env bash
# The GPU issue's figures in one device call (one H200, under 10 minutes): the throughput
# benchmark (img/s and TFLOP/s per network, compile modes, Lion kernels, the cached-teacher
# student), then the GPU protocol (experiments/gpu_protocol.sh). Logs, the MLflow store and the
# written README section land in $OUT (the device tool brings that folder back).
#
# Prepare here, once: python experiments/gpu_prepare.py ../shared/data/imagenette
# (the wheels the machine's image lacks in .whl/, the data as 147 px WebP in .gpu/, 61 of the
# transfer's 64 MiB together), then
#   run: bash experiments/gpu_check.sh        carry: .gpu, .whl
# Not in this call (it would not fit the 10 minutes): benchmarks/gpu_workers.py, trials per hour
# with 1, 2 and 4 sweep workers on the one GPU, several minutes on its own.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
PY=${PY:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
# Fail in seconds, not minutes in, where a carried package is missing or broken.
"$PY" -c "import conkd.run, mlflow, optuna, lion_pytorch, hydra_plugins.conkd_optuna_sweeper"
DATA=${1:-}
if [ -z "$DATA" ]; then
  tar -xzf .gpu/imagenette.tar.gz -C /tmp
  DATA=/tmp/imagenette
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
# The device tool stops a command at 10 minutes, so BUDGET_S is shared out such that whatever
# was measured comes back: the benchmark gets BENCH_S (it prints each figure when measured, the
# compile modes last), the protocol's rows what is left but a minute for the table.
BUDGET_S=${BUDGET_S:-570}
BENCH_S=${BENCH_S:-120}
timeout -s INT -k 15 "$BENCH_S" "$PY" benchmarks/gpu_throughput.py --data "$DATA" \
  --image-size 128 --steps 30 --workdir /tmp/conkd-gpu-bench 2>&1 |
  tee "$OUT/gpu_throughput.log" || echo "[gpu_check] benchmark stopped at ${BENCH_S} s"
RUN_S=$((BUDGET_S - SECONDS - 60))
[ "$RUN_S" -gt 0 ] || RUN_S=1
RUN_S=$RUN_S TRACKING_URI="sqlite:///$(realpath "$OUT")/mlflow.db" PY="$PY" \
  bash experiments/gpu_protocol.sh "$DATA" 2>&1 | tee "$OUT/gpu_protocol.log"
awk '/<!-- protocol:gpu128:start -->/,/<!-- protocol:gpu128:end -->/' experiments/README.md \
  > "$OUT/gpu128_section.md"
cp experiments/figures/gpu128_val_curves.png "$OUT/" 2>/dev/null || true
