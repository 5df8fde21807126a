"""Metric sinks, used from rank 0 only with globally reduced values.

Every run writes `metrics.jsonl` in its run directory (one JSON object per logged step);
`logger=wandb` (the default, offline so nothing needs a network) also logs to Weights &
Biases under `<run_dir>/wandb/`; `logger.mode=online` syncs live. `logger=none` keeps
only the JSONL file.

W&B gets the scalars, and each vector (a list of numbers, e.g. the per-expert selection
fractions, or a dict of them per task) as a histogram whose bin i holds element i, so
W&B's histogram panel shows it as a heatmap over steps. Beyond `MAX_HISTOGRAM_BINS`
elements the histogram is of the values instead. The JSONL file keeps the raw vectors.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from trainer.config import LoggerConfig

MAX_HISTOGRAM_BINS = 512  # W&B's limit on histogram bins


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _histogram(values: list[Any]) -> Any:
    import numpy as np
    import wandb

    arr = np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
    arr = np.nan_to_num(arr)
    if len(arr) <= MAX_HISTOGRAM_BINS:  # bin i = element i
        return wandb.Histogram(np_histogram=(arr, np.arange(len(arr) + 1)))
    return wandb.Histogram(arr.tolist(), num_bins=64)


def _for_wandb(metrics: dict[str, Any]) -> dict[str, Any]:
    """Scalars as they are, vectors (and dicts of vectors) as histograms."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if _is_number(v):
            out[k] = v
        elif isinstance(v, list) and v and all(_is_number(x) or x is None for x in v):
            out[k] = _histogram(v)
        elif isinstance(v, dict):
            for sub, vec in v.items():
                if isinstance(vec, list) and vec and all(_is_number(x) or x is None for x in vec):
                    out[f"{k}/{sub}"] = _histogram(vec)
    return out


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
        if self._wandb is not None:
            self._wandb.log(_for_wandb(clean), step=step)

    def log_images(self, images: dict[str, Path], *, step: int | None = None) -> None:
        """PNG files as W&B images (no-op without W&B)."""
        if self._wandb is not None:
            import wandb

            self._wandb.log({k: wandb.Image(str(p)) for k, p in images.items()}, step=step)

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
