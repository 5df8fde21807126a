"""Rendering of `benchmarks/incremental.py`'s results: the markdown tables, the two plots
(quality and training time per day; expert load per warm day and its drift) and the
benchmark's offline W&B run. Inputs are the aggregated rows, load table and paired
comparisons that `benchmarks.incremental` computes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import accuracy

ARMS = ("warm", "retrain")
METRICS = ("auc", "gauc")


def _md_day(day: int | None) -> str:
    return "-" if day is None else f"{str(day)[4:6]}-{str(day)[6:]}"


def _ms(s: dict[str, Any], fmt: str = "{:.4f}") -> str:
    if s["mean"] is None:
        return "-"
    return f"{fmt.format(s['mean'])} +- {fmt.format(s['std'])}" if s["n"] > 1 else fmt.format(s["mean"])


def render_markdown(rows: list[dict], load: dict[str, Any] | None, paired: list[dict], *, title: str) -> str:
    """The per-day table (both arms), per-task AUC / GAUC tables and the paired differences."""
    drift = {} if load is None else dict(zip(load["indices"], load["mean_drift"], strict=True))
    head = ["train day(s) -> test", "arm", "seeds", "mean AUC", "mean GAUC", "train rows", "train_s", "wall_s",
            "best step", "new ids", "first seen", "new ids (init_from)", "load drift (TV)"]  # fmt: skip
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        span = "base" if r["index"] == 0 else ("1 day" if r["arm"] == "warm" else "all")
        d = drift.get(r["index"]) if r["arm"] == "warm" else None
        cells = [f"{_md_day(r['day'])} ({span}) -> {_md_day(r['test_day'])}", r["arm"],
                 str(len(r["seeds"])) + (f" ({r['failed']} failed)" if r["failed"] else ""),
                 _ms(r["mean_auc"]), _ms(r["mean_gauc"]), _ms(r["train_rows"], "{:,.0f}"),
                 _ms(r["train_s"], "{:.1f}"), _ms(r["wall_s"], "{:.1f}"), _ms(r["best_step"], "{:.0f}"),
                 _ms(r["new_ids"], "{:,.0f}"), _ms(r["first_seen"], "{:,.0f}"),
                 _ms(r["init_from_new_ids"], "{:,.0f}"), "-" if d is None else f"{d:.3f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    tasks = list(dict.fromkeys(t for r in rows for t in r["tasks"]))
    for metric in METRICS:
        head = ["test day", "arm", *(f"{t} {metric.upper()}" for t in tasks)]
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            cells = [_md_day(r["test_day"]), r["arm"],
                     *(_ms(r["tasks"].get(t, {}).get(metric, {"mean": None})) for t in tasks)]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Test split = the next day; the reported model (base and retrain: the best validation step; "
              "warm: the last step, see the module doc); mean +- sample std over seeds. Index 0 is the base run "
              "(both arms). new ids: vocabulary values absent from the previous "
              "run of the arm; first seen: absent from every earlier run of the arm; init_from: the rows the "
              "warm start initialised afresh; load drift: total-variation distance between consecutive days' "
              "training expert loads (warm chain, mean over seeds)."]  # fmt: skip
    if paired:
        lines += ["", "#### Warm - retrain, paired per day", "", accuracy.render_comparisons(paired).rstrip()]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, *, title: str) -> None:
    """Mean test AUC, mean test GAUC and training seconds per day: warm and retrain."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.0), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, (key, name) in zip(axes, (("mean_auc", "mean test AUC"), ("mean_gauc", "mean test GAUC"),
                                      ("train_s", "training seconds")), strict=True):  # fmt: skip
        for arm, style in zip(ARMS, ("o-", "s--"), strict=True):
            pts = [(r["test_day"], r[key]) for r in rows if r["arm"] == arm and r[key]["mean"] is not None]
            if not pts:
                continue
            x = [_md_day(p[0]) for p in pts]
            ax.errorbar(x, [p[1]["mean"] for p in pts], yerr=[p[1]["std"] or 0.0 for p in pts], fmt=style,
                        capsize=3, label=arm)  # fmt: skip
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("test day (trained up to the day before)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=100)


def plot_load(load: dict[str, Any], path: Path, *, title: str) -> bool:
    """Heatmap days x experts of the first seed's load shares and the drift per day (each
    seed and their mean); False (nothing written) when no day has loads."""
    from matplotlib.figure import Figure

    seed = next((s for s in load["seeds"] if any(x is not None for x in load["shares"][s])), None)
    if seed is None:
        return False
    loads = load["shares"][seed]
    width = max(len(x) for x in loads if x is not None)
    grid = np.full((len(loads), width), np.nan)
    for k, x in enumerate(loads):
        if x is not None:
            grid[k, : len(x)] = x
    labels = [_md_day(d) for d in load["days"]]
    fig = Figure(figsize=(13, 4.2), layout="constrained")
    ax, ax2 = fig.subplots(1, 2, width_ratios=[3, 1])
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("expert")
    ax.set_ylabel("train day (first: base run)")
    ax.set_title(f"{load['arm']}: share of routed selections per expert (seed {seed}; uniform = {1 / width:.3f})",
                 fontsize=10)  # fmt: skip
    fig.colorbar(im, ax=ax, fraction=0.03)
    for s in load["seeds"]:
        ax2.plot(labels, [np.nan if v is None else v for v in load["drift"][s]], alpha=0.4, marker=".",
                 label=f"seed {s}")  # fmt: skip
    ax2.plot(labels, [np.nan if v is None else v for v in load["mean_drift"]], "k-o", label="mean")
    ax2.set_title("drift: TV distance to the day before", fontsize=10)
    ax2.tick_params(axis="x", rotation=45)
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=100)
    return True


def wandb_steps(rows: list[dict], load: dict[str, Any] | None) -> list[tuple[int, dict[str, Any]]]:
    """(step = day index, metrics) for W&B: per arm mean AUC / GAUC, train_s, wall_s, new ids;
    the warm load drift; warm - retrain mean AUC / GAUC."""
    drift = {} if load is None else dict(zip(load["indices"], load["mean_drift"], strict=True))
    out = []
    for index in sorted({r["index"] for r in rows}):
        metrics: dict[str, Any] = {}
        by_arm = {r["arm"]: r for r in rows if r["index"] == index}
        for arm, r in by_arm.items():
            metrics[f"{arm}/day"] = r["day"]
            for key in ("mean_auc", "mean_gauc", "train_s", "wall_s", "new_ids", "first_seen", "init_from_new_ids"):
                if r[key]["mean"] is not None:
                    metrics[f"{arm}/{key}"] = r[key]["mean"]
        if drift.get(index) is not None:
            metrics["warm/load_drift"] = drift[index]
        if {"warm", "retrain"} <= set(by_arm):
            for key in ("mean_auc", "mean_gauc"):
                a, b = by_arm["warm"][key]["mean"], by_arm["retrain"][key]["mean"]
                if a is not None and b is not None:
                    metrics[f"warm_minus_retrain/{key}"] = a - b
        out.append((index, metrics))
    return out


def log_wandb(steps: list[tuple[int, dict]], images: dict[str, Path], *, wandb_dir: Path, config: dict) -> str | None:
    """One offline W&B run for the benchmark, through the trainer's `MetricLogger` (the
    same settings; `<wandb_dir>/metrics.jsonl` too); its directory."""
    from trainer.config import LoggerConfig
    from trainer.reporting.logger import MetricLogger

    wandb_dir.mkdir(parents=True, exist_ok=True)
    cfg = LoggerConfig(name="wandb", mode="offline", group="incremental", tags=["benchmark", "incremental"])
    logger = MetricLogger(cfg, run_dir=wandb_dir, run_config=config, name=wandb_dir.parent.name)
    try:
        for step, metrics in steps:
            logger.log(step, metrics)
        if images:
            logger.log_images(images, step=steps[-1][0] if steps else None)
        if steps:
            logger.summary(steps[-1][1])
        return logger.wandb_dir
    finally:
        logger.close()


# -------------------------------------------------------------------------- main
