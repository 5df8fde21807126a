#!/usr/bin/env bash
# Hydra multirun sweep: every point runs as its own distributed job (launch/torchrun.sh
# with NPROC processes), one after another; sweep_table.csv, sweep_table.md and
# sweep_plot.png are then written into the sweep directory (trainer/reporting/sweep.py).
#
#   NPROC=2 bash launch/sweep.sh model=smes model.num_experts=4,8,16 trainer.steps=300
#
# Env: NPROC (processes per point, default 2), PYTHON (default .venv/bin/python),
#      SWEEP_DIR (default multirun/<date>/<time>), TORCHRUN_ARGS (extra torchrun flags).
# The last line printed is `sweep_dir: <path>`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
args=("launcher.nproc=${NPROC:-2}")
if [[ -n "${SWEEP_DIR:-}" ]]; then
  args+=("hydra.sweep.dir=$SWEEP_DIR")
fi
exec "$PYTHON" -m trainer.train -m "${args[@]}" "$@"
