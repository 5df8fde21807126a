"""Hydra entry point: `python -m trainer.train [overrides]`, or under torchrun.

Under torchrun every rank runs this with the same arguments; `launch/torchrun.sh`
passes one explicit `hydra.run.dir` so that all ranks share a run directory. Only rank 0
keeps Hydra's logging and `.hydra/` output; other ranks log warnings to stderr.

The last line rank 0 prints is `run_dir: <path>`.

Errors a user fixes (a config value, a data file, a diverging lr: `ValueError`,
`FileNotFoundError`, `FloatingPointError`) are raised alike on every rank; they are
reported once, as one `error: <message>` line (the traceback goes to `train.log`), and
every rank exits with code 2. Hydra's own composition errors (unknown keys) are shown
once too: until the task function starts, every rank holds its stderr back. Without a
launcher rank 0 prints the line; under the launchers (`TRAINER_ERROR_DIR` set) each rank
writes it to a file there and the launcher prints one (rank 0's) after torchrun's own
report, so it is the last thing on the screen. Anything else is a bug: every rank logs
its traceback.

In a Hydra multirun (`-m`) outside torchrun, each job launches its point as its own
torchrun job instead of training in this process (`trainer/reporting/sweep.py`).
"""

from __future__ import annotations

import io
import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from parallel.dist import init_distributed, shutdown
from trainer.config import build_run_config, resolve_num_experts, saved_config_yaml
from trainer.reporting import sweep
from trainer.trainer import train

log = logging.getLogger("trainer")
RANK = int(os.environ.get("RANK", "0"))


USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError)
USER_ERROR_CODE = 2
_user_error: str | None = None
_held_stderr: io.StringIO | None = None


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    global _user_error
    _release_stderr()  # composition succeeded
    if sweep.is_sweep_parent():
        sweep.run_point(cfg)  # one distributed job per multirun point
        return
    try:
        auto_pool = cfg.model.get("num_experts") == "auto"
        cfg = resolve_num_experts(cfg)  # once: build_run_config and config.yaml take the resolved pool
        run = build_run_config(cfg)  # config errors surface before any process group or data work
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        info = init_distributed(device=run.trainer.device)
        if info.is_main:
            (run_dir / "config.yaml").write_text(saved_config_yaml(cfg))
            if auto_pool:
                log.info(
                    "model.num_experts=auto: %d experts, the smallest power of two holding every expert one "
                    "instance runs (set model.num_experts for another pool)", run.model.core.num_experts,
                )  # fmt: skip
        else:
            logging.getLogger().setLevel(logging.WARNING)
            logging.getLogger("data").setLevel(logging.ERROR)  # every rank loads the same data: rank 0 warns
        train(run, run_dir, info=info)
    except USER_ERRORS as e:
        _user_error = f"{type(e).__name__}: {e}" if isinstance(e, FloatingPointError) else str(e)
        _log_traceback_to_files(e)
        raise SystemExit(USER_ERROR_CODE) from None
    if info.is_main and os.environ.get("TRAINER_QUIET_RUN_DIR") != "1":
        print(f"run_dir: {run_dir}", flush=True)


def _rank_overrides() -> list[str]:
    """Ranks other than 0 write no `.hydra/` and configure no Hydra log file."""
    if RANK == 0:
        return []
    return ["hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none"]


def _hold_stderr() -> None:
    global _held_stderr
    _held_stderr = io.StringIO()
    sys.stderr = _held_stderr


def _release_stderr() -> None:
    """Back to the real stderr; rank 0 shows what composition printed (warnings)."""
    global _held_stderr
    if _held_stderr is not None:
        sys.stderr = sys.__stderr__
        if RANK == 0:
            sys.stderr.write(_held_stderr.getvalue())
        _held_stderr = None


def _log_traceback_to_files(e: BaseException) -> None:
    """The traceback of a user error goes to the log files only (train.log)."""
    record = logging.LogRecord("trainer", logging.ERROR, __file__, 0, "rank %d failed", (RANK,), None)
    record.exc_info = (type(e), e, e.__traceback__)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def report_error(message: str) -> None:
    """The job's one error line. Under the launchers (`TRAINER_ERROR_DIR` set) every rank
    writes its own file there and the launcher prints one of them, rank 0's if it
    exists (torchrun may kill rank 0 before it writes when another rank exits first);
    without them rank 0 prints it on stderr."""
    line = f"error: {message.strip()}\n"
    folder = os.environ.get("TRAINER_ERROR_DIR")
    if folder:
        Path(folder, f"rank{RANK:06d}").write_text(line)
    elif RANK == 0:
        sys.stderr.write(line)
        sys.stderr.flush()


if __name__ == "__main__":
    sys.argv += _rank_overrides()
    _hold_stderr()
    code = 0
    try:
        main()
    except SystemExit as e:  # hydra exits on composition errors, main on user errors
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        _release_stderr()
        logging.getLogger("trainer").exception("rank %d failed", RANK)
        code = 1
    if _held_stderr is not None:  # composition failed: rank 0 reports Hydra's message, others drop it
        sys.stderr = sys.__stderr__
        held = [ln for ln in _held_stderr.getvalue().strip().splitlines() if "HYDRA_FULL_ERROR" not in ln]
        if held:
            report_error("\n".join(held))
    if _user_error is not None:
        report_error(_user_error)
    shutdown(code)
