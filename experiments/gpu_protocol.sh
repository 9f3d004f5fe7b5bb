#!/usr/bin/env bash
# The Imagenette protocol at GPU scale (one GPU, sized for one device call of under 10 minutes on
# an H200): the ResNet-101 teacher with the teacher preset's recipe (experiment=teacher), then
# ResNet-18 students (CE, KD, LS-KD, the mission's method), 2 seeds each, a 16-trial
# hparams_search=conkd_lion sweep with pruning and its best setting, at 128 px; then their rows
# (the GPU model in the device column) written into experiments/README.md as the section
# "gpu128". Re-running continues or skips finished rows. Epochs: the teacher 30 (1.1 min on an
# H200 before the sync-free loop), students 16 (about 0.3 min each).
#
#   bash experiments/gpu_protocol.sh [DATA]      # DATA: a class-folder Imagenette (train/, val/)
#   TRACKING_URI=sqlite:////abs/mlflow.db ...    # another MLflow store (gpu_check.sh: in $OUT)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${1:-../shared/data/imagenette}
ARGS=(--name gpu128 --data "$DATA" --image-size 128 --teacher-epochs 30 --student-epochs 16
      --seeds 0,1 --trials 16 --set trainer.device=cuda --set dataset.batch_size=256
      --set dataset.eval_batch_size=512 --set dataset.num_workers=8)
[ -n "${TRACKING_URI:-}" ] && ARGS+=(--tracking-uri "$TRACKING_URI")
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device here')"
"$PY" experiments/protocol.py run --rows teacher,ce,kd,lsd,conkd_lion,sweep,sweep_best "${ARGS[@]}"
"$PY" experiments/protocol.py table "${ARGS[@]}"
