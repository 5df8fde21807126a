#!/usr/bin/env bash
# Single-node launcher: resolves the run directory once and hands the same
# hydra.run.dir to every rank (Hydra's ${now:} would otherwise give each rank its own).
#
#   NPROC=2 bash launch/torchrun.sh [hydra overrides...]
#
# Env: NPROC (processes, default 2), PYTHON (default .venv/bin/python),
#      RUN_DIR (default outputs/<date>/<time>), TORCHRUN_ARGS (extra torchrun flags).
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-2}
PYTHON=${PYTHON:-.venv/bin/python}
source launch/common.sh
run_dir_from_args "$@"
if [[ -z "$RUN_DIR" ]]; then
  RUN_DIR="outputs/$(date +%Y-%m-%d)/$(date +%H-%M-%S)"
fi
worker_env "$NPROC"
code=0
# shellcheck disable=SC2086
"$PYTHON" -m torch.distributed.run --standalone --nnodes=1 --nproc-per-node="$NPROC" \
  ${TORCHRUN_ARGS:-} -m trainer.train "$@" "hydra.run.dir=$RUN_DIR" || code=$?
report_error_and_exit "$code"
echo "run_dir: $RUN_DIR"
