"""Metric sinks, used from rank 0 only with globally reduced values.

Every run writes `metrics.jsonl` in its run directory (one JSON object per logged step);
`logger=wandb` (the default, offline so nothing needs a network) also logs to Weights &
Biases under `<run_dir>/wandb/`; `logger.mode=online` syncs live. `logger=none` keeps
only the JSONL file.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from trainer.config import LoggerConfig


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricLogger:
    """JSONL file sink plus optional W&B run."""

    def __init__(self, cfg: LoggerConfig, *, run_dir: Path, run_config: dict[str, Any], name: str) -> None:
        self.cfg = cfg
        self.path = run_dir / "metrics.jsonl"
        self._file = self.path.open("a", buffering=1)
        self._wandb: Any = None
        if cfg.name == "wandb" and cfg.mode != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            self._wandb = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                group=cfg.group,
                tags=list(cfg.tags),
                mode=cfg.mode,
                dir=str(run_dir),
                name=name,
                config=run_config,
                settings=wandb.Settings(console="off", x_disable_stats=True),
            )

    @property
    def wandb_dir(self) -> str | None:
        return None if self._wandb is None else str(Path(self._wandb.dir).parent)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        clean = {k: _clean(v) for k, v in metrics.items()}
        self._file.write(json.dumps({"step": step, **clean}) + "\n")
        if self._wandb is not None:  # scalars only; vectors stay in the JSONL file
            scalars = {k: v for k, v in clean.items() if isinstance(v, int | float) and not isinstance(v, bool)}
            self._wandb.log(scalars, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self._wandb is not None:
            for k, v in values.items():
                if v is not None:
                    self._wandb.summary[k] = v

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
