"""Model selection: the best validation step, early stopping, and what a run reports.

Every `trainer.eval_every` steps (and at the last step) the trainer evaluates the
validation split; `trainer.early_stopping.metric` names the figure that selects the
model:

- `val/<task>/<auc|gauc|ne>`: one task's metric, e.g. `val/income/auc`;
- `val/mean/<auc|gauc|ne>`: the mean over the tasks where the metric is defined.

`mode` is `max` or `min` (`auto`: `min` for NE, `max` for AUC / GAUC). A step is a new
best when it beats the best so far by more than `min_delta`; the trainer then writes
the best checkpoint (`checkpoints/best_step_<N>/`, same DCP layout and `COMPLETE`
marker as the periodic ones; the previous best is deleted once the new one is
complete). After `patience` evaluations in a row without a new best, training stops
(`null` = never stop early). The test metrics reported in `summary.json["eval"]` are
those of the best step's model; `eval_last` holds the last step's. With `metric: null`
the last step is reported, as without model selection.

The selector's state (best step, value, checkpoint folder, evaluations since the best)
is saved in every periodic checkpoint, so a resumed run keeps its best so far.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

METRICS = ("auc", "gauc", "ne")
MODES = ("auto", "max", "min")


@dataclass(kw_only=True)
class EarlyStoppingConfig:
    """`trainer.early_stopping`, see the module doc.

    Attributes:
        metric: `val/<task or mean>/<auc|gauc|ne>`, or null to report the last step.
        mode: auto | max | min.
        patience: evaluations without a new best before stopping (null = never).
        min_delta: improvement a new best needs.
    """

    metric: str | None = "val/mean/auc"
    mode: str = "auto"
    patience: int | None = None
    min_delta: float = 0.0


def parse_metric(metric: str, *, key: str = "trainer.early_stopping.metric") -> tuple[str, str]:
    """`(task or "mean", metric name)`; ValueError naming `key` when malformed."""
    parts = metric.split("/")
    if len(parts) != 3 or parts[0] != "val" or parts[2] not in METRICS or not parts[1]:
        raise ValueError(
            f"{key}={metric!r}: expected val/<task>/<metric> or val/mean/<metric> with metric one of {METRICS}"
        )
    return parts[1], parts[2]


def check_config(cfg: EarlyStoppingConfig, *, tasks: tuple[str, ...] | None = None) -> None:
    """Start-up checks (ValueError naming the key); `tasks` when known."""
    if cfg.mode not in MODES:
        raise ValueError(f"trainer.early_stopping.mode={cfg.mode!r}; choose one of {MODES}")
    if cfg.patience is not None and cfg.patience < 1:
        raise ValueError(f"trainer.early_stopping.patience must be >= 1 or null, got {cfg.patience}")
    if cfg.min_delta < 0:
        raise ValueError(f"trainer.early_stopping.min_delta must be >= 0, got {cfg.min_delta}")
    if cfg.metric is None:
        if cfg.patience is not None:
            raise ValueError("trainer.early_stopping.patience needs trainer.early_stopping.metric")
        return
    task, _ = parse_metric(cfg.metric)
    if tasks is not None and task != "mean" and task not in tasks:
        raise ValueError(
            f"trainer.early_stopping.metric={cfg.metric!r} names an unknown task {task!r}; tasks: {list(tasks)}"
        )


def metric_value(metric: str, val: dict[str, dict[str, float | None]]) -> float | None:
    """The value of `metric` in validation metrics `{task: {auc, gauc, ne, ...}}`."""
    task, name = parse_metric(metric)
    if task != "mean":
        value = val[task].get(name)
        return None if value is None or not math.isfinite(value) else float(value)
    values = [m[name] for m in val.values() if m.get(name) is not None and math.isfinite(m[name])]  # type: ignore[arg-type]
    return sum(values) / len(values) if values else None  # type: ignore[arg-type]


class ModelSelector:
    """Tracks the best validation step; see the module doc."""

    def __init__(self, cfg: EarlyStoppingConfig) -> None:
        self.cfg = cfg
        self.maximize = cfg.mode == "max" or (cfg.mode == "auto" and not (cfg.metric or "").endswith("/ne"))
        self.best_step: int | None = None
        self.best_value: float | None = None
        self.best_dir: str | None = None  # folder name under the checkpoint root
        self.best_val: dict[str, dict[str, float | None]] | None = None  # validation metrics at the best step
        self.evals_since_best = 0

    @property
    def enabled(self) -> bool:
        return self.cfg.metric is not None

    def update(self, step: int, val: dict[str, dict[str, float | None]]) -> bool:
        """Record an evaluation at `step`; True when it is a new best."""
        if self.cfg.metric is None:
            return False
        value = metric_value(self.cfg.metric, val)
        better = value is not None and (
            self.best_value is None
            or (
                value > self.best_value + self.cfg.min_delta
                if self.maximize
                else value < self.best_value - self.cfg.min_delta
            )
        )
        if better:
            self.best_step, self.best_value, self.evals_since_best = step, value, 0
            self.best_val, self.best_dir = val, None  # the trainer sets best_dir once it is written
        else:
            self.evals_since_best += 1
        return better

    def should_stop(self) -> bool:
        return self.cfg.patience is not None and self.evals_since_best >= self.cfg.patience

    def state_dict(self) -> dict[str, Any]:
        return {
            "best_step": self.best_step,
            "best_value": self.best_value,
            "best_dir": self.best_dir,
            "best_val": self.best_val,
            "evals_since_best": self.evals_since_best,
            "metric": self.cfg.metric,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("metric") != self.cfg.metric:  # another selection metric: start over
            return
        self.best_step, self.best_value = state["best_step"], state["best_value"]
        self.best_dir, self.evals_since_best = state["best_dir"], int(state["evals_since_best"])
        self.best_val = state.get("best_val")
