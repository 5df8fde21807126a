"""What a run reports: log records, console lines and `summary.json` (DESIGN section 6).

The summary keys are a contract (benchmarks, sweeps and users read them; the README
lists them): add freely, never rename or drop.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Protocol

from data.columns import Dataset
from data.spec import DatasetSpec
from parallel.dist import DistInfo
from parallel.parallelize import ParallelModel
from trainer.checkpoint import TrainState
from trainer.config import RunConfig, TrainerConfig
from trainer.evaluation.experts import ExpertLoadMeter
from trainer.reporting import monitor
from trainer.reporting.logger import MetricLogger
from trainer.selection import ModelSelector
from trainer.timer import StepTimer

log = logging.getLogger("trainer")
Metrics = dict[str, dict[str, float | None]]
MAX_EXPERT_KEYS = 64


class FinishedRun(Protocol):
    """What the report reads from a run at its end (`trainer.trainer.Trainer` is one):
    a structural type, so that reporting does not import the loop that calls it."""

    run: RunConfig
    cfg: TrainerConfig
    info: DistInfo
    run_dir: Path
    dataset: Dataset
    spec: DatasetSpec
    pm: ParallelModel
    state: TrainState
    selector: ModelSelector
    timer: StepTimer
    run_meter: ExpertLoadMeter
    cluster_nmi: dict[str, float | None]
    logger: MetricLogger | None
    num_network_params: int
    start_step: int
    resumed_from: Path | None
    init_from: dict[str, Any] | None
    last_val: Metrics | None
    wall_start: float
    setup_s: float
    train_s: float
    eval_s: float
    ckpt_s: float


RECORD_KEYS = ("auc", "gauc", "ne", "num_rows", "positive_rate", "gauc_users")


def flat(prefix: str, metrics: Metrics) -> dict[str, float | None]:
    """`{prefix/task/key: value}`: AUC, GAUC, NE and the split's row count, positive
    rate and users counted by GAUC."""
    return {f"{prefix}/{t}/{k}": v for t, m in metrics.items() for k, v in m.items() if k in RECORD_KEYS}


def fmt(metrics: Metrics) -> str:
    parts = []
    for task, m in metrics.items():
        vals = " ".join(f"{k}={m[k]:.4f}" for k in ("auc", "gauc", "ne") if m.get(k) is not None)
        parts.append(f"{task}: {vals}")
    return "; ".join(parts)


def expert_log(figures: dict[str, Any], max_keys: int = MAX_EXPERT_KEYS) -> dict[str, Any]:
    """Scalar load figures (`experts/<key>` for every scalar of `load_figures`: load CV,
    dead experts, |U|, `task_expert_nmi`, ...), per-expert keys (only up to `max_keys`
    experts, so large E does not flood the dashboard), and the full vectors (pooled and
    per task) as lists, which go to metrics.jsonl only (the expert-load heatmap is drawn
    from them)."""
    out: dict[str, Any] = {f"experts/{k}": v for k, v in figures.items() if not isinstance(v, list | dict)}
    frac = figures["selection_fraction"]
    if len(frac) <= max_keys:
        out.update({f"experts/fraction/e{e:03d}": v for e, v in enumerate(frac)})
    out["experts/selection_fraction"] = frac
    out["experts/selection_fraction_per_task"] = figures["selection_fraction_per_task"]
    return out


def _experts_view(figures: dict[str, Any] | None, cluster_nmi: dict[str, float | None]) -> dict[str, Any] | None:
    """The run's load figures without the per-task vectors (none when it trained no
    step), and the reported model's cluster-expert NMI on val / test
    (`cluster_expert_nmi`, only for data with clusters); None when neither exists."""
    out = {k: v for k, v in (figures or {}).items() if k != "selection_fraction_per_task"}
    if any(v is not None for v in cluster_nmi.values()):
        out["cluster_expert_nmi"] = dict(cluster_nmi)
    return out or None


def _task_view(metrics: Metrics | None) -> dict[str, dict[str, float | None]]:
    return {task: {k: m[k] for k in RECORD_KEYS if k in m} for task, m in (metrics or {}).items()}


def _skips(tr: FinishedRun, streamed: list[dict[str, int]]) -> tuple[int, dict[str, int]]:
    """Rows dropped by `data.on_bad_row=skip`: at load time (in-memory splits) plus what
    every rank's streaming loader dropped so far."""
    by_reason = dict((tr.dataset.info.get("skipped") or {}).get("by_reason", {}))  # type: ignore[union-attr,attr-defined]
    total = tr.dataset.skipped_rows
    for rank_skips in streamed:
        for reason, n in rank_skips.items():
            by_reason[reason] = by_reason.get(reason, 0) + n
            total += n
    return total, by_reason


def summary(
    tr: FinishedRun,
    *,
    test: Metrics,
    test_last: Metrics,
    val: Metrics | None,
    loader_samples_per_s: float,
    streamed_skips: list[dict[str, int]],
) -> dict[str, Any]:
    """The `summary.json` dict (identical on every rank). `test` / `val`: the reported
    (best) model's metrics; `test_last`: the last step's; `streamed_skips`: every rank's
    streaming-loader skip counts by reason."""
    run, t, info, state = tr.run, tr.cfg, tr.info, tr.state
    skipped_rows, skipped_by_reason = _skips(tr, streamed_skips)
    experts = tr.run_meter.compute(tr.spec.tasks)
    run_steps = state.step - tr.start_step
    done_steps = state.step - state.skipped_steps
    return {
        "model": run.model.name,
        "dataset": tr.spec.name,
        "world_size": info.world_size,
        "ep_size": run.parallel.ep,
        "engine": t.engine,
        "zero_stage": t.deepspeed.zero_stage if t.engine == "deepspeed" else None,
        "pipeline": t.pipeline,
        "precision": t.precision,
        "steps": done_steps,
        "samples": done_steps * t.batch_size,
        "train_samples_per_s": run_steps * t.batch_size / max(1e-9, tr.train_s) if run_steps else None,
        "loader_samples_per_s": loader_samples_per_s,
        "eval": _task_view(test),
        "val": _task_view(val),
        "eval_last": _task_view(test_last),
        "val_last": _task_view(tr.last_val),
        "best_step": tr.selector.best_step if tr.selector.best_dir is not None else state.step,
        "best_metric": tr.selector.best_value,
        "selection_metric": tr.cfg.early_stopping.metric,
        "stopped_early": state.stopped_early,
        "ema_decay": t.ema.decay,
        "experts": _experts_view(experts, tr.cluster_nmi),
        "restarts": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
        "skipped_rows": skipped_rows,
        "skipped_rows_by_reason": skipped_by_reason,
        "skipped_steps": state.skipped_steps,
        "label_stats": tr.dataset.info.get("label_stats"),
        "resumed_from": None if tr.resumed_from is None else str(tr.resumed_from),
        "init_from": tr.init_from,
        "resumed_at_step": tr.start_step,
        "batch_size": t.batch_size,
        "dense_parameters": tr.num_network_params,  # the older name of network_parameters, kept
        "network_parameters": tr.num_network_params,
        "step_time_ms": tr.timer.mean_ms(run_steps),
        "checkpoint_s": tr.ckpt_s,
        "setup_s": tr.setup_s,
        "train_s": tr.train_s,
        "eval_s": tr.eval_s,
        "wall_s": time.perf_counter() - tr.wall_start,
        "embedding_plan": tr.pm.plan,
        "backend": info.backend,
        "device": str(info.device),
    }


def write(tr: FinishedRun, summary_: dict[str, Any], test: Metrics) -> None:
    """Rank 0: test metrics to the logger, `summary.json`, expert-load plots."""
    logger = tr.logger
    assert logger is not None
    t = tr.cfg
    logger.log(t.steps, flat("test", test))
    logger.summary(flat("test", test))
    summary_["wandb_dir"] = logger.wandb_dir
    (tr.run_dir / "summary.json").write_text(json.dumps(summary_, indent=2) + "\n")
    monitor.write_plots(tr.run_dir, logger=logger, step=t.steps)  # warns, never raises
    log.info("test %s", fmt(test))
    logger.close()
