#!/usr/bin/env bash
# Score a split or files with a trained run on NPROC processes (trainer/predict.py):
#
#   NPROC=2 bash launch/predict.sh run_dir=outputs/... [split=test | files=[a.csv]] [checkpoint=best|last|DIR]
#
# Env: NPROC (processes, default 2), PYTHON (default .venv/bin/python),
#      TORCHRUN_ARGS (extra torchrun flags). A user error ends as one `error: ...` line.
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-2}
PYTHON=${PYTHON:-.venv/bin/python}
source launch/common.sh
worker_env "$NPROC"
code=0
# shellcheck disable=SC2086
"$PYTHON" -m torch.distributed.run --standalone --nnodes=1 --nproc-per-node="$NPROC" \
  ${TORCHRUN_ARGS:-} -m trainer.predict "$@" || code=$?
report_error_and_exit "$code"
