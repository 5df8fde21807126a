# Shared by launch/torchrun.sh and launch/multinode.sh (sourced, not run).

# run_dir_from_args ARGS...: RUN_DIR from a hydra.run.dir=... override among ARGS (else
# the RUN_DIR environment variable, else empty); `-m` is refused (sweeps: launch/sweep.sh).
run_dir_from_args() {
  RUN_DIR=${RUN_DIR:-}
  local arg
  for arg in "$@"; do
    case "$arg" in
      hydra.run.dir=*) RUN_DIR=${arg#hydra.run.dir=} ;;
      -m|--multirun) echo "error: use launch/sweep.sh for multirun" >&2; exit 2 ;;
    esac
  done
}

# worker_env NPROC: environment of the NPROC workers on this node: the cores split among
# them, and the run directory printed once by the launcher rather than by every rank.
worker_env() {
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / $1 > 0 ? $(nproc) / $1 : 1 ))}
  export TRAINER_QUIET_RUN_DIR=1
  TRAINER_ERROR_DIR=$(mktemp -d "${TMPDIR:-/tmp}/trainer-error.XXXXXX")
  export TRAINER_ERROR_DIR
}

# report_error_and_exit CODE: after torchrun, a failed job's one-line error (each rank
# of trainer/train.py writes it to $TRAINER_ERROR_DIR/rank<N>; the first is rank 0's)
# is printed last, then exit CODE.
report_error_and_exit() {
  local code=$1 first
  first=$(find "$TRAINER_ERROR_DIR" -type f -name 'rank*' 2>/dev/null | sort | head -n 1)
  if [[ -n "$first" ]]; then
    cat "$first" >&2
  fi
  rm -rf "$TRAINER_ERROR_DIR"
  if [[ "$code" != 0 ]]; then
    exit "$code"
  fi
}
