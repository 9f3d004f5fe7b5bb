#!/usr/bin/env bash
# The Imagenette protocol at GPU scale on one GPU: the ResNet-101 teacher with the teacher
# preset's recipe (experiment=teacher), then ResNet-18 students (CE, KD, LS-KD, the mission's
# method), 2 seeds each, a 16-trial hparams_search=conkd_lion sweep with pruning and its best
# setting, at 128 px; then their rows (the GPU model in the device column) written into
# experiments/README.md as the section "gpu128". Re-running continues or skips finished rows.
# Epochs: the teacher 30 (1.1 min on an H200 before the sync-free loop), students 16 (about
# 0.3 min each): about 9 minutes of training in all, more than the 6 or so that gpu_check.sh's
# one device call leaves, so there the later passes (second seeds, the sweep) may be cut.
#
#   bash experiments/gpu_protocol.sh [DATA [protocol.py options]]   # DATA: class folders
#   TRACKING_URI=sqlite:////abs/mlflow.db ...    # another MLflow store
#   RUN_S=300 ...                                # stop the rows after 300 s, then the table
#   KEEP=/some/dir ...                           # copy what this call wrote there (on exit too)
set -euo pipefail
# RUN_S: seconds the rows may take in all (unset or 0: no limit), counted from here. The table
# is written from the runs that finished, however far they got, so the passes go by priority:
# every row's first seed, then the second seeds, then the sweep and its best setting.
RUN_S=${RUN_S:-0}
deadline=$((RUN_S > 0 ? SECONDS + RUN_S : 0))
cd "$(dirname "$0")/.."
NAME=gpu128
PY=${PY:-.venv/bin/python}
DATA=${1:-../shared/data/imagenette}
ARGS=(--name "$NAME" --data "$DATA" --image-size 128 --teacher-epochs 30 --student-epochs 16
      --seeds 0,1 --trials 16 --set trainer.device=cuda --set dataset.batch_size=256
      --set dataset.eval_batch_size=512 --set dataset.num_workers=8 "${@:2}")
[ -n "${TRACKING_URI:-}" ] && ARGS+=(--tracking-uri "$TRACKING_URI")
started=$(mktemp)
# KEEP gets only what this call wrote (a section or figure from an earlier run would pass for a
# new one): the section (written there by the table step), and one tar of the run logs, the
# Optuna study and the figures.
keep() {
  set +e
  [ -n "${KEEP:-}" ] || return 0
  local files
  files=$(find "outputs/protocol/$NAME" experiments/figures -newer "$started" \
    \( -name '*.log' -o -name optuna.db -o -name "${NAME}_*.png" \) 2>/dev/null)
  [ -z "$files" ] || printf '%s\n' "$files" | tar -czf "$KEEP/${NAME}_files.tar.gz" -T -
}
trap 'keep; rm -f "$started"' EXIT
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device here')"
rows() {
  local left=0 rc=0
  if [ "$deadline" -gt 0 ]; then
    left=$((deadline - SECONDS))
    [ "$left" -gt 0 ] || { echo "[gpu_protocol] no time left for: $*"; return 0; }
  fi
  # TERM to the whole process group (train.py too): a killed run stays unfinished in MLflow.
  timeout -k 10 "$left" "$PY" experiments/protocol.py run "${ARGS[@]}" "$@" || rc=$?
  if [[ $rc == 124 || $rc == 137 ]]; then
    echo "[gpu_protocol] $*: stopped at the time limit; the table shows the runs that finished"
  elif [[ $rc != 0 ]]; then
    echo "[gpu_protocol] $*: failed (exit $rc); see the row's log named above"
  fi
}
rows --rows teacher,ce,kd,lsd,conkd_lion --seeds 0
rows --rows ce,kd,lsd,conkd_lion
rows --rows sweep,sweep_best
"$PY" experiments/protocol.py table "${ARGS[@]}" ${KEEP:+--section-out "$KEEP/${NAME}_section.md"}
