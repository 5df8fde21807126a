#!/usr/bin/env bash
# Multi-node launcher: one torchrun agent per node, joined by a c10d rendezvous.
# Run the same command on every node:
#
#   NNODES=2 NPROC=8 RDZV_ENDPOINT=node0:29500 RDZV_ID=exp42 \
#     bash launch/multinode.sh [hydra overrides...]
#
# Env:
#   NNODES         nodes (required; "MIN:MAX" for an elastic job)
#   NPROC          processes per node (default 1; one per GPU on GPU nodes)
#   RDZV_ENDPOINT  host:port of the rendezvous store, reachable from every node; the
#                  node whose address it is hosts the store (required)
#   RDZV_ID        job id, the same on every node and new for every job (required)
#   RUN_DIR        run directory, or hydra.run.dir=... among the overrides. It must be
#                  the same path on every node, on a filesystem they all mount (rank 0
#                  writes the logs and summary.json there, every rank its checkpoint
#                  shards). Default: outputs/multinode/$RDZV_ID (relative to this
#                  repository, so a shared checkout gives a shared run directory, and a
#                  restarted job with the same RDZV_ID resumes from its checkpoints).
#   PYTHON (default .venv/bin/python), TORCHRUN_ARGS (extra torchrun flags, e.g.
#   --max-restarts=3), RDZV_CONF (torchrun --rdzv-conf, e.g. join_timeout=900),
#   DRY_RUN=1 (print the torchrun command instead of running it).
#
# Inside a SLURM allocation (SLURM_JOB_ID set) NNODES, RDZV_ID and RDZV_ENDPOINT default
# to the step's node count, slurm-$SLURM_JOB_ID and <first node>:${RDZV_PORT:-29500};
# see launch/slurm.sbatch.
#
# Node ranks are assigned by the c10d rendezvous (torchrun ignores --node-rank with it),
# so global rank 0, the rank that writes summary.json, may be on any node.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
NPROC=${NPROC:-1}
if [[ -n "${SLURM_JOB_ID:-}" ]]; then
  NNODES=${NNODES:-${SLURM_STEP_NUM_NODES:-$SLURM_NNODES}}
  RDZV_ID=${RDZV_ID:-slurm-$SLURM_JOB_ID}
  if [[ -z "${RDZV_ENDPOINT:-}" ]]; then
    head_node=$(scontrol show hostnames "${SLURM_STEP_NODELIST:-$SLURM_JOB_NODELIST}" | head -n 1)
    RDZV_ENDPOINT="$head_node:${RDZV_PORT:-29500}"
  fi
fi
for var in NNODES RDZV_ENDPOINT RDZV_ID; do
  if [[ -z "${!var:-}" ]]; then
    echo "error: $var is not set (see the header of launch/multinode.sh)" >&2
    exit 2
  fi
done
source launch/common.sh
run_dir_from_args "$@"
RUN_DIR=${RUN_DIR:-outputs/multinode/$RDZV_ID}
worker_env "$NPROC"
cmd=("$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc-per-node="$NPROC"
  --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="$RDZV_ID")
if [[ -n "${RDZV_CONF:-}" ]]; then
  cmd+=(--rdzv-conf="$RDZV_CONF")
fi
# shellcheck disable=SC2206
cmd+=(${TORCHRUN_ARGS:-} -m trainer.train "$@" "hydra.run.dir=$RUN_DIR")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  echo
else
  code=0
  "${cmd[@]}" || code=$?
  report_error_and_exit "$code"
fi
echo "run_dir: $RUN_DIR"
