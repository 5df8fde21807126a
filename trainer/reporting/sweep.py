"""Hydra multirun sweeps in which every point is a real distributed job.

`python -m trainer.train -m model.num_experts=8,16,32 launcher.nproc=2` (or
`launch/sweep.sh`) runs Hydra's multirun in one parent process. Each of its jobs (one per
point, one after another with the basic launcher) does no training itself: it starts
`launch/torchrun.sh <this point's overrides> hydra.run.dir=<this point's output dir>`
as a subprocess (`launch/multinode.sh` when the job runs on several SLURM nodes, e.g.
under the submitit launcher) and waits, so every point runs exactly like a single
`make train` run. The job is recognised by Hydra's MULTIRUN mode and the absence of
torchrun's `RANK`; under torchrun, or in a single run, `trainer.train` trains as usual.

After each point, and once more from the `SweepReport` callback at the end of the
multirun, the sweep directory gets:

- `sweep_table.csv`, `sweep_table.md`: one row per point: the swept values, status,
  per-task test AUC / GAUC / NE, samples/s, mean and max distinct experts per instance
  (|U|), load CV, max/mean load, dead experts, run directory;
- `sweep_plot.png`: those figures against the swept value.

Each point also leaves `sweep_point.json` (its overrides, exit code, wall time) in its
own directory, beside the run's `summary.json`, so the report can be rebuilt from disk
at any time with `python -m trainer.reporting.sweep <sweep_dir>`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("trainer")

ROOT = Path(__file__).resolve().parents[2]
POINT_FILE = "sweep_point.json"
TABLE_CSV = "sweep_table.csv"
TABLE_MD = "sweep_table.md"
PLOT = "sweep_plot.png"


def is_sweep_parent() -> bool:
    """True in a Hydra multirun job that is not itself a torchrun worker."""
    if "RANK" in os.environ or not HydraConfig.initialized():
        return False
    return HydraConfig.get().mode == RunMode.MULTIRUN


def point_command(overrides: list[str], *, run_dir: Path, nproc: int, torchrun_args: str) -> tuple[list[str], dict]:
    """The launcher command and environment of one sweep point.

    Several SLURM nodes in this job step (e.g. the submitit launcher with `nodes>1`,
    `tasks_per_node=1`, which runs this job on every node) -> `launch/multinode.sh`,
    which takes its rendezvous from SLURM; otherwise `launch/torchrun.sh` on this node.
    """
    multinode = int(os.environ.get("SLURM_STEP_NUM_NODES", "1")) > 1
    script = "multinode.sh" if multinode else "torchrun.sh"
    env = {**os.environ, "NPROC": str(nproc), "PYTHON": sys.executable}
    if torchrun_args:
        env["TORCHRUN_ARGS"] = torchrun_args
    return ["bash", str(ROOT / "launch" / script), *overrides, f"hydra.run.dir={run_dir}"], env


def run_point(cfg: DictConfig) -> dict[str, Any] | None:
    """Run this multirun job's point as a distributed job; returns its summary.

    Raises:
        RuntimeError: the job failed (after the sweep report was updated, so the
            failed point shows in the table; Hydra still runs the remaining points).
    """
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    overrides = list(hc.overrides.task)
    launcher = cfg.get("launcher") or {}
    cmd, env = point_command(
        overrides,
        run_dir=run_dir,
        nproc=int(launcher.get("nproc", 2)),
        torchrun_args=str(launcher.get("torchrun_args") or ""),
    )
    log.info("sweep point %s: %s", hc.job.num, shlex.join(cmd))
    start = time.perf_counter()
    code = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    wall_s = time.perf_counter() - start
    lead_node = os.environ.get("SLURM_NODEID", "0") == "0"
    if lead_node:
        record = {"num": int(hc.job.num), "overrides": overrides, "returncode": code, "wall_s": wall_s}
        _write_atomic(run_dir / POINT_FILE, json.dumps(record, indent=2) + "\n")
        try:
            write_report(Path(hc.sweep.dir))
        except Exception as e:  # the table is rebuilt at the end; never lose the point over it
            log.warning("sweep report not updated: %s", e)
    if code != 0:
        raise RuntimeError(f"sweep point {hc.job.num} ({' '.join(overrides)}) failed with exit code {code}; "
                           f"see {run_dir}/train.log")  # fmt: skip
    summary = run_dir / "summary.json"
    return json.loads(summary.read_text()) if summary.exists() else None


class SweepReport(Callback):
    """Writes the sweep table and plot when a multirun ends (registered in conf/config.yaml)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if write_report(sweep_dir):
            print((sweep_dir / TABLE_MD).read_text(), flush=True)
        print(f"sweep_dir: {sweep_dir}", flush=True)


# ---------------------------------------------------------------------------- report


@dataclass(frozen=True, slots=True)
class Column:
    """One table column: CSV name, Markdown header, value from a point row, format."""

    name: str
    header: str
    get: Callable[[dict[str, Any]], Any]
    fmt: str = "{}"


def _parse_overrides(overrides: list[str]) -> dict[str, str]:
    out = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep:
            out[key.lstrip("+~")] = value
    return out


def load_points(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every finished point under `sweep_dir`, by job number, with its summary (or None)."""
    points = []
    for path in sweep_dir.rglob(POINT_FILE):
        record = json.loads(path.read_text())
        summary_path = path.parent / "summary.json"
        record["summary"] = json.loads(summary_path.read_text()) if summary_path.exists() else None
        record["run_dir"] = str(path.parent.resolve())
        record["values"] = _parse_overrides(record["overrides"])
        points.append(record)
    return sorted(points, key=lambda p: p["num"])


def swept_keys(sweep_dir: Path, points: list[dict[str, Any]]) -> list[str]:
    """Keys given several values: from the multirun's own overrides (`multirun.yaml`,
    saved by Hydra's sweeper), else the override keys whose values differ across points."""
    keys: list[str] = []
    multirun = sweep_dir / "multirun.yaml"
    if multirun.exists():
        from hydra.core.override_parser.overrides_parser import OverridesParser

        hydra_cfg = OmegaConf.load(multirun).hydra
        args = [str(a) for a in hydra_cfg.overrides.task]
        params = hydra_cfg.get("sweeper", {}).get("params") or {}
        args += [f"{k}={v}" for k, v in params.items()]
        for override in OverridesParser.create().parse_overrides(args):
            if override.is_sweep_override() and override.key_or_group not in keys:
                keys.append(override.key_or_group)
    if not keys:
        seen = [k for p in points for k in p["values"]]
        for k in dict.fromkeys(seen):
            if len({p["values"].get(k) for p in points}) > 1:
                keys.append(k)
    return keys


def _get(*path: str) -> Callable[[dict[str, Any]], Any]:
    def get(point: dict[str, Any]) -> Any:
        node: Any = point["summary"]
        for key in path:
            if not isinstance(node, dict):
                return None
            node = node.get(key)
        return node

    return get


def _value(key: str) -> Callable[[dict[str, Any]], Any]:
    return lambda point: point["values"].get(key)


def table_columns(points: list[dict[str, Any]], keys: list[str]) -> list[Column]:
    tasks = list(dict.fromkeys(t for p in points if p["summary"] for t in p["summary"].get("eval", {})))
    cols = [Column("point", "point", lambda p: p["num"])]
    cols += [Column(k, k, _value(k)) for k in keys]
    cols.append(Column("status", "status", lambda p: "ok" if p["returncode"] == 0 else f"failed ({p['returncode']})"))
    for t in tasks:
        cols.append(Column(f"{t}/auc", f"{t} AUC", _get("eval", t, "auc"), "{:.4f}"))
        cols.append(Column(f"{t}/gauc", f"{t} GAUC", _get("eval", t, "gauc"), "{:.4f}"))
    cols += [
        Column("train_samples_per_s", "samples/s", _get("train_samples_per_s"), "{:.0f}"),
        Column("mean_active_per_instance", "mean abs(U)", _get("experts", "mean_active_per_instance"), "{:.2f}"),
        Column("load_cv", "load CV", _get("experts", "load_cv"), "{:.3f}"),
        Column("max_active_per_instance", "max abs(U)", _get("experts", "max_active_per_instance"), "{:g}"),
        Column("max_over_mean_load", "max/mean load", _get("experts", "max_over_mean_load"), "{:.2f}"),
        Column("dead_experts", "dead experts", _get("experts", "dead_experts")),
    ]
    cols += [Column(f"{t}/ne", f"{t} NE", _get("eval", t, "ne"), "{:.4f}") for t in tasks]
    cols += [
        Column("steps", "steps", _get("steps")),
        Column("world_size", "world", _get("world_size")),
        Column("wall_s", "wall s", lambda p: p.get("wall_s"), "{:.0f}"),
        Column("run_dir", "run dir", lambda p: p["run_dir"]),
    ]
    return cols


def _fmt(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def render_csv(points: list[dict[str, Any]], cols: list[Column]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([c.name for c in cols])
    for p in points:
        writer.writerow(["" if (v := c.get(p)) is None else v for c in cols])
    return buf.getvalue()


def render_markdown(points: list[dict[str, Any]], cols: list[Column], *, sweep_dir: Path) -> str:
    # abs(U) in the header: a literal |U| would break the Markdown table
    header = [c.header.replace("abs(U)", "\\|U\\|") for c in cols]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for p in points:
        cells = []
        for c in cols:
            value = c.get(p)
            if c.name == "run_dir":
                value = os.path.relpath(value, sweep_dir)
            cells.append(_fmt(value, c.fmt).replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(sweep_dir: Path) -> dict[str, Path]:
    """(Re)write the sweep table and plot from the points found under `sweep_dir`.

    Returns:
        name -> path of the files written; empty when no point has finished yet.
    """
    points = load_points(sweep_dir)
    if not points:
        return {}
    keys = swept_keys(sweep_dir, points)
    cols = table_columns(points, keys)
    out = {"csv": sweep_dir / TABLE_CSV, "md": sweep_dir / TABLE_MD, "png": sweep_dir / PLOT}
    _write_atomic(out["csv"], render_csv(points, cols))
    _write_atomic(out["md"], render_markdown(points, cols, sweep_dir=sweep_dir))
    plot_sweep(points, keys, out["png"])
    return out


def _x_axis(points: list[dict[str, Any]], keys: list[str]) -> tuple[list[float], list[str], str, bool]:
    """x positions, tick labels, axis label, and whether x is the numeric swept value."""
    labels = [",".join(str(p["values"].get(k)) for k in keys) or str(p["num"]) for p in points]
    name = ", ".join(keys) or "point"
    if len(keys) == 1:
        try:
            return [float(p["values"][keys[0]]) for p in points], labels, name, True
        except (KeyError, TypeError, ValueError):
            pass
    return [float(i) for i in range(len(points))], labels, name, False


def plot_sweep(points: list[dict[str, Any]], keys: list[str], path: Path) -> None:
    """Per-task AUC and GAUC, samples/s, mean |U| and load CV against the swept value."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    x, labels, xname, numeric = _x_axis(points, keys)
    tasks = list(dict.fromkeys(t for p in points if p["summary"] for t in p["summary"].get("eval", {})))
    panels: list[tuple[str, dict[str, Callable[[dict[str, Any]], Any]]]] = [
        ("test AUC", {t: _get("eval", t, "auc") for t in tasks}),
        ("test GAUC", {t: _get("eval", t, "gauc") for t in tasks}),
        ("train samples/s", {"global": _get("train_samples_per_s")}),
        ("mean |U| (distinct experts / instance)", {"mean": _get("experts", "mean_active_per_instance")}),
        ("expert load CV", {"pooled": _get("experts", "load_cv")}),
    ]
    # a panel only when some point has a value (GAUC needs user ids, |U| and CV a sparse MoE)
    panels = [
        (title, series) for title, series in panels if any(g(p) is not None for g in series.values() for p in points)
    ]
    fig = Figure(figsize=(4.2 * max(1, len(panels)), 3.6), layout="constrained")
    axes = fig.subplots(1, max(1, len(panels)), squeeze=False)[0]
    for ax, (title, series) in zip(axes, panels, strict=False):
        for label, get in series.items():
            y = [math.nan if get(p) is None else float(get(p)) for p in points]
            ax.plot(x, y, marker="o", label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xname)
        ax.grid(alpha=0.3)
        if numeric and min(x) > 0 and max(x) / min(x) >= 4:
            ax.set_xscale("log", base=2)
        ax.set_xticks(x, labels, rotation=30 if not numeric else 0)
        ax.minorticks_off()
        if len(series) > 1:
            ax.legend(fontsize=8)
    if not panels:
        axes[0].text(0.5, 0.5, "no finished point", ha="center", va="center")
    fig.suptitle(f"sweep over {xname} ({len(points)} points)", fontsize=11)
    fig.savefig(path.with_name(f".{path.name}.tmp.png"), dpi=110)
    os.replace(path.with_name(f".{path.name}.tmp.png"), path)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m trainer.reporting.sweep <sweep_dir>")
    written = write_report(Path(sys.argv[1]))
    if not written:
        sys.exit(f"no finished sweep points ({POINT_FILE}) under {sys.argv[1]}")
    print(written["md"].read_text(), end="")
