"""Hydra entry point: `python -m trainer.train [overrides]`, or under torchrun.

Under torchrun every rank runs this with the same arguments; `launch/torchrun.sh`
passes one explicit `hydra.run.dir` so that all ranks share a run directory. Only rank 0
keeps Hydra's logging and `.hydra/` output; other ranks log warnings to stderr.

The last line rank 0 prints is `run_dir: <path>`.

In a Hydra multirun (`-m`) outside torchrun, each job launches its point as its own
torchrun job instead of training in this process (`trainer/sweep.py`).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from parallel.dist import init_distributed, shutdown
from trainer import sweep
from trainer.config import build_run_config
from trainer.loop import train

log = logging.getLogger("trainer")
RANK = int(os.environ.get("RANK", "0"))


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    if sweep.is_sweep_parent():
        sweep.run_point(cfg)  # one distributed job per multirun point
        return
    run = build_run_config(cfg)  # config errors surface before any process group or data work
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    info = init_distributed(device=run.trainer.device)
    if info.is_main:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    else:
        logging.getLogger().setLevel(logging.WARNING)
    train(run, run_dir, info=info)
    if info.is_main and os.environ.get("TRAINER_QUIET_RUN_DIR") != "1":
        print(f"run_dir: {run_dir}", flush=True)


def _rank_overrides() -> list[str]:
    """Ranks other than 0 write no `.hydra/` and configure no Hydra log file."""
    if RANK == 0:
        return []
    return ["hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none"]


if __name__ == "__main__":
    sys.argv += _rank_overrides()
    code = 0
    try:
        main()
    except SystemExit as e:  # hydra exits on config errors
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        logging.getLogger("trainer").exception("rank %d failed", RANK)
        code = 1
    shutdown(code)
