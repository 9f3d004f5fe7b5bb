#!/usr/bin/env bash
# The Imagenette protocol at GPU scale (one GPU: 5.6 minutes on an H200, measured): a ResNet-101
# teacher (CE), a ResNet-18 CE baseline and the mission's student (experiment=conkd_lion) at
# 128 px, one seed, then their rows (with the GPU model in the device column) written into
# experiments/README.md as the section "gpu128". Re-running continues or skips finished rows.
#
#   bash experiments/gpu_protocol.sh [DATA]      # DATA: a class-folder Imagenette (train/, val/)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${1:-../shared/data/imagenette}
ARGS=(--name gpu128 --data "$DATA" --image-size 128 --teacher-epochs 30 --student-epochs 20
      --seeds 0 --set trainer.device=cuda --set dataset.batch_size=256
      --set dataset.eval_batch_size=512 --set dataset.num_workers=8)
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device here')"
"$PY" experiments/protocol.py run --rows teacher,ce,conkd_lion "${ARGS[@]}"
"$PY" experiments/protocol.py table "${ARGS[@]}"
