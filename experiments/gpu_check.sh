#!/usr/bin/env bash
# The GPU issue's figures in one device call (one H200, under 10 minutes): the throughput
# benchmark (img/s and TFLOP/s per network, compile modes, Lion kernels, the cached-teacher
# student), then the GPU protocol (experiments/gpu_protocol.sh). Logs, the MLflow store and the
# written README section land in $OUT (the device tool brings that folder back).
#
# Prepare here, once:  python experiments/pack_gpu_data.py ../shared/data/imagenette .gpu/imagenette.tar
# (and the wheels of the packages the machine lacks in .whl/, see the device tool's notes), then
#   run: bash experiments/gpu_check.sh        carry: .gpu, .whl
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
DATA=${1:-}
if [ -z "$DATA" ]; then
  tar -xf .gpu/imagenette.tar -C /tmp
  DATA=/tmp/imagenette
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PY" benchmarks/gpu_throughput.py --data "$DATA" --image-size 128 --steps 30 \
  --workdir /tmp/conkd-gpu-bench 2>&1 | tee "$OUT/gpu_throughput.log"
TRACKING_URI="sqlite:///$(realpath "$OUT")/mlflow.db" PY="$PY" \
  bash experiments/gpu_protocol.sh "$DATA" 2>&1 | tee "$OUT/gpu_protocol.log"
awk '/<!-- protocol:gpu128:start -->/,/<!-- protocol:gpu128:end -->/' experiments/README.md \
  > "$OUT/gpu128_section.md"
cp experiments/figures/gpu128_val_curves.png "$OUT/" 2>/dev/null || true
