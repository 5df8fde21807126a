"""Expert-load plots of one run, drawn from its `metrics.jsonl`.

Rank 0 calls `write_plots(run_dir)` once training ends (after `summary.json`); it reads
the per-window selection fractions that the loop logs for sparse MoE cores
(`experts/selection_fraction`, globally reduced over ranks, and
`experts/selection_fraction_per_task`) and writes into the run directory:

- `expert_load_heatmap.png`: experts x logged steps, one panel for all tasks pooled and
  one per task. Colour is the load relative to a uniform router (E x fraction: 1 =
  balanced, 0 = dead, red = overloaded);
- `expert_load_hist.png`: each expert's share over the whole run (bars, pooled and per
  task) and the histogram of relative loads in the first and last window and over the run.

With W&B active the same PNGs are logged as images. Cores without routing (no expert records)
produce nothing. Plotting never fails a run: errors become a warning.

Legend: S logged windows, E experts.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("trainer")

HEATMAP = "expert_load_heatmap.png"
HISTOGRAM = "expert_load_hist.png"
MAX_COLUMNS = 400  # windows beyond this are averaged into MAX_COLUMNS heatmap columns


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON records of a metrics.jsonl file (a torn last line is skipped)."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def expert_history(records: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]] | None:
    """Steps `[S]`, pooled fractions `[S, E]` and per-task fractions `{task: [S, E]}`.

    None when no record holds expert fractions (cores without routing).
    """
    rows = [r for r in records if isinstance(r.get("experts/selection_fraction"), list)]
    if not rows:
        return None
    num_experts = len(rows[-1]["experts/selection_fraction"])
    rows = [r for r in rows if len(r["experts/selection_fraction"]) == num_experts]
    steps_S = np.array([r["step"] for r in rows])
    pooled_SE = np.array([r["experts/selection_fraction"] for r in rows], dtype=np.float64)
    tasks = list(rows[-1].get("experts/selection_fraction_per_task") or {})
    per_task = {
        t: np.array(
            [r.get("experts/selection_fraction_per_task", {}).get(t, [np.nan] * num_experts) for r in rows],
            dtype=np.float64,
        )
        for t in tasks
    }
    return steps_S, pooled_SE, per_task


def _downsample(steps_S: np.ndarray, frac_SE: np.ndarray, max_columns: int) -> tuple[np.ndarray, np.ndarray]:
    """At most `max_columns` windows: consecutive windows averaged, ending steps kept."""
    num_windows = len(steps_S)
    if num_windows <= max_columns:
        return steps_S, frac_SE
    bounds = np.linspace(0, num_windows, max_columns + 1).astype(int)
    steps = np.array([steps_S[b - 1] for b in bounds[1:]])
    frac = np.stack([frac_SE[a:b].mean(0) for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
    return steps, frac


def plot_heatmap(steps_S: np.ndarray, pooled_SE: np.ndarray, per_task: dict[str, np.ndarray], path: Path) -> None:
    """Experts (rows) x logged windows (columns), pooled then per task."""
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    num_experts = pooled_SE.shape[1]
    panels = [("all tasks pooled", pooled_SE)] + [(f"task {t}", f) for t, f in per_task.items()]
    rel = [num_experts * np.nan_to_num(f) for _, f in panels]
    vmax = max(2.0, max(float(r.max()) for r in rel))
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=vmax)
    panel_h = float(np.clip(0.12 * num_experts + 1.2, 2.0, 7.0))
    fig = Figure(figsize=(10, panel_h * len(panels) + 0.6), layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    mesh = None
    for ax, (title, _), rel_SE in zip(axes, panels, rel, strict=True):
        steps, shown_SE = _downsample(steps_S, rel_SE, MAX_COLUMNS)
        x_edges = np.concatenate([[0], steps]).astype(float)
        y_edges = np.arange(num_experts + 1) - 0.5
        mesh = ax.pcolormesh(x_edges, y_edges, shown_SE.T, cmap="RdBu_r", norm=norm, shading="flat")
        ax.set_ylabel("expert")
        ax.set_title(title, fontsize=10, loc="left")
        if num_experts <= 32:
            ax.set_yticks(range(num_experts))
            ax.tick_params(axis="y", labelsize=7 if num_experts > 16 else 9)
    axes[-1].set_xlabel("step")
    assert mesh is not None
    fig.colorbar(mesh, ax=list(axes), label="load / uniform  (E x selection fraction)", shrink=0.9)
    fig.suptitle(f"expert load over training (E={num_experts}, {len(steps_S)} windows)", fontsize=11)
    _save(fig, path)


def plot_histogram(pooled_SE: np.ndarray, per_task: dict[str, np.ndarray], path: Path) -> None:
    """Per-expert share over the run (bars) and the distribution of relative loads."""
    from matplotlib.figure import Figure

    num_experts = pooled_SE.shape[1]
    fig = Figure(figsize=(12, 4), layout="constrained")
    ax_bar, ax_hist = fig.subplots(1, 2, width_ratios=[3, 2])
    experts = np.arange(num_experts)
    ax_bar.bar(experts, pooled_SE.mean(0), width=0.9, color="0.65", label="pooled")
    for t, f in per_task.items():
        ax_bar.stairs(np.nanmean(f, 0), np.arange(num_experts + 1) - 0.5, baseline=None, label=t, linewidth=1.2)
    ax_bar.axhline(1.0 / num_experts, color="k", linestyle="--", linewidth=0.8, label="uniform 1/E")
    ax_bar.set_xlabel("expert")
    if num_experts <= 32:
        ax_bar.set_xticks(experts)
    ax_bar.set_ylabel("selection fraction (mean over windows)")
    ax_bar.set_title("per-expert share of selections", fontsize=10)
    ax_bar.legend(fontsize=8)
    rel = {
        "first window": num_experts * pooled_SE[0],
        "last window": num_experts * pooled_SE[-1],
        "whole run": num_experts * pooled_SE.mean(0),
    }
    top = max(2.0, max(float(v.max()) for v in rel.values()))
    bins = np.linspace(0.0, top, min(40, max(10, num_experts)) + 1)
    for label, values in rel.items():
        ax_hist.hist(values, bins=bins, histtype="step", linewidth=1.5, label=label)
    ax_hist.axvline(1.0, color="k", linestyle="--", linewidth=0.8)
    ax_hist.set_xlabel("load / uniform  (E x selection fraction)")
    ax_hist.set_ylabel("experts")
    ax_hist.set_title("distribution of expert loads", fontsize=10)
    ax_hist.legend(fontsize=8)
    _save(fig, path)


def _save(fig: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def write_plots(run_dir: Path, *, logger: Any = None, step: int | None = None) -> list[Path]:
    """Draw the expert-load plots of `run_dir`; log them to W&B through `logger` if given.

    Returns:
        The PNGs written (empty for cores without routing, or when plotting failed with a warning).
    """
    try:
        history = expert_history(read_records(run_dir / "metrics.jsonl"))
        if history is None:
            return []
        steps_S, pooled_SE, per_task = history
        paths = [run_dir / HEATMAP, run_dir / HISTOGRAM]
        plot_heatmap(steps_S, pooled_SE, per_task, paths[0])
        plot_histogram(pooled_SE, per_task, paths[1])
    except Exception as e:  # a plot must never fail a finished run
        log.warning("expert-load plots not written: %s: %s", type(e).__name__, e)
        return []
    if logger is not None:
        logger.log_images({f"plots/{p.stem}": p for p in paths}, step=step)
    return paths


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m trainer.reporting.monitor <run_dir>")
    written = write_plots(Path(sys.argv[1]))
    print("\n".join(map(str, written)) or "no expert-load records in metrics.jsonl")
