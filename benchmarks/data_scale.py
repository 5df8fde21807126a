"""Data at scale: streaming loader rows/s, training peak RSS and evaluation memory vs N.

    nice .venv/bin/python -m benchmarks.data_scale --out outputs/bench/data_scale.json \
        [--rows 1000000,10000000,50000000] [--data-root outputs/data/scale] [--steps 200] \
        [--batch-size 4096] [--eval-rows 10000000] [--quick]

For every N in `--rows` (training rows; validation and test are `--split-rows` each at
every N, so only the training data grows):

1. Data: `python -m data.generate --rows N --out DATA_ROOT/rows_N` (KuaiRand-shaped
   Parquet, `--files` files of `--row-group-size` row groups, vocabulary and dense
   statistics), written once: a folder whose `meta.json` has the same arguments is
   reused, one with other arguments is an error (remove it or pick another root).
2. Loader: `python -m benchmarks.stream_loader` (conf/data/parquet_stream.yaml on that folder,
   no prefetch thread) as rank r of 2, r = 0 and 1 at once (two processes, as the
   two training ranks read side by side):
   `--loader-batches` batches of `--batch-size / 2` rows (default about 6 shuffle
   windows of `data.shuffle_buffer` rows, so the first window's read does not
   dominate); `loader_rows_per_s` is the mean over the ranks of rows built per second
   of build time, `loader_peak_rss_mb` the larger process peak.
3. Training: `NPROC=2 bash launch/torchrun.sh data=parquet_stream ... model=smes model.num_experts=16`
   (SMES defaults with the pool of the measured runs, global batch `--batch-size`, `--steps` steps, validation only at
   the end, no checkpoint, no logger; the same config at every N but the paths).
   `trainer_samples_per_s`, `trainer_loader_samples_per_s` and `step_time_ms` come
   from its summary.json. Peak RSS per rank: this process polls `/proc/<pid>/status`
   of the two torchrun workers (found as descendants of the launcher carrying `RANK`
   in their environment) every `POLL_S` seconds and keeps each one's last `VmHWM`
   (the kernel's high-water mark of the process RSS, so a peak between polls is not
   missed; only growth in the last `POLL_S` before exit could be). As a cross-check
   `peak_rss_mb_wait4` is `ru_maxrss` of the launcher from `os.wait4`: the largest
   peak of any process of the job (ranks, torchrun agent), measured by the kernel at
   exit. `rss_timeline_mb` keeps `[seconds, VmRSS of rank 0, rank 1]` samples.
4. Evaluation (once, `--eval-rows` rows, 2 ranks, `--eval-tasks` tasks):
   `benchmarks.eval_scale.measure`, exact vs distributed (fresh processes per mode).

Targets (`targets` in the JSON, each with its figures and `met`):

- `peak_rss_flat`: the training run's peak RSS (max over ranks) at the largest N is at
  most 1.2x that at the smallest (and the max / min over all N is reported).
- `loader_5x_trainer`: at every N the loader's rows/s per rank is at least 5x the
  trainer's samples/s per rank (`train_samples_per_s / 2`).
- `eval_peak_per_rank`: the distributed path's peak RSS per rank is at most the exact
  path's / W plus a constant C, C = the distributed ranks' RSS just before evaluation
  (the process baseline: interpreter, torch, the rank's own predictions); the stricter
  `eval_extra_per_rank` compares what evaluation added (peak minus that baseline).

Absolute times on a shared machine are noise; the ratios within one run are the point.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from benchmarks.eval_scale import measure

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
POLL_S = 0.2
TIMELINE_S = 2.0
RSS_FLAT_LIMIT, LOADER_OVER_TRAINER = 1.2, 5.0
FULL = {
    "rows": "1000000,10000000,50000000", "data_root": "outputs/data/scale", "split_rows": 100_000,
    "files": 8, "row_group_size": 65_536, "users": 100_000, "videos": 50_000, "steps": 200,
    "batch_size": 4096, "loader_batches": 1000, "eval_rows": 10_000_000, "eval_users": 100_000,
}  # fmt: skip
QUICK = {
    "rows": "20000,40000", "data_root": "outputs/data/scale_quick", "split_rows": 2000,
    "files": 2, "row_group_size": 1000, "users": 500, "videos": 300, "steps": 3,
    "batch_size": 256, "loader_batches": 5, "eval_rows": 20_000, "eval_users": 500,
}  # fmt: skip
TRAIN_OVERRIDES = (
    "model=smes", "model.num_experts=16", "trainer.eval_every=0", "trainer.log_every=50",
    "trainer.checkpoint.at_end=false", "logger=none", "trainer.progress=false",
)  # fmt: skip


# ------------------------------------------------------------------------------- data


def _gen_args(a: argparse.Namespace, rows: int) -> dict[str, int]:
    return {
        "rows": rows, "files": a.files, "row_group_size": a.row_group_size, "val_rows": a.split_rows,
        "test_rows": a.split_rows, "seed": a.seed, "users": a.users, "videos": a.videos,
    }  # fmt: skip


def _gen_command(args: dict[str, int], out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "data.generate", "--out", str(out)]
    for key, value in args.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    return cmd


def ensure_dataset(a: argparse.Namespace, rows: int) -> dict[str, Any]:
    """DATA_ROOT/rows_N, generated unless it already holds a data set of these arguments."""
    out = Path(a.data_root) / f"rows_{rows}"
    want = _gen_args(a, rows)
    cmd = _gen_command(want, out)
    info: dict[str, Any] = {"rows": rows, "path": str(out), "command": " ".join(cmd[1:])}
    meta_path = out / "meta.json"
    if out.exists():
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        have = {k: meta.get("args", {}).get(k) for k in want}
        if have != want:
            raise ValueError(
                f"--data-root: {out} exists but was not generated with {want} (its meta.json: {have}); "
                "remove it or use another --data-root"
            )
        info.update(generated=False, generate_s=None)
    else:
        partial = out.with_name(out.name + ".partial")  # ours: an interrupted earlier generation
        shutil.rmtree(partial, ignore_errors=True)
        t0 = time.perf_counter()
        subprocess.run(_gen_command(want, partial), cwd=ROOT, check=True, capture_output=True)
        partial.rename(out)
        info.update(generated=True, generate_s=round(time.perf_counter() - t0, 1))
    train_files = sorted((out / "train").glob("*.parquet"))
    info["train_files"] = len(train_files)
    footers = [pq.ParquetFile(f).metadata for f in train_files]
    if sum(m.num_rows for m in footers) != rows:
        raise ValueError(f"--data-root: {out}/train holds {sum(m.num_rows for m in footers)} rows, not {rows}")
    info["row_groups"] = sum(m.num_row_groups for m in footers)
    info["disk_mb"] = round(sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20, 1)
    info["vocab_rows"] = pq.ParquetFile(out / "vocab.parquet").metadata.num_rows
    return info


def data_overrides(path: str, prefix: str) -> list[str]:
    """The parquet_stream keys that point at one generated folder (`prefix` "data." for Hydra)."""
    return [
        f"{prefix}train=[{path}/train/*.parquet]",
        f"{prefix}val=[{path}/val/*.parquet]",
        f"{prefix}test=[{path}/test/*.parquet]",
        f"{prefix}vocab_file={path}/vocab.parquet",
        f"{prefix}stats_file={path}/stats.json",
    ]


# ----------------------------------------------------------------------------- loader


def loader_bench(path: str, a: argparse.Namespace) -> dict[str, Any]:
    """Rows/s and peak RSS of the streaming loader: ranks 0 and 1 of 2 at once, as in training."""
    cmds = [
        [
            sys.executable, "-m", "benchmarks.stream_loader", "--config", "conf/data/parquet_stream.yaml",
            "--batch-size", str(a.batch_size // WORLD), "--world-size", str(WORLD), "--rank", str(rank),
            "--batches", str(a.loader_batches), *data_overrides(path, ""),
        ]
        for rank in range(WORLD)
    ]  # fmt: skip
    procs = [subprocess.Popen(c, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
    ranks = []
    for proc in procs:
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"loader bench on {path} failed ({proc.returncode}):\n{stderr[-3000:]}")
        ranks.append(json.loads(stdout.strip().splitlines()[-1]))
    return {
        "rows_per_s": sum(r["build_rows_per_s"] for r in ranks) / WORLD,
        "rows_per_s_per_rank": [r["build_rows_per_s"] for r in ranks],
        "wall_rows_per_s_per_rank": [r["wall_rows_per_s"] for r in ranks],
        "peak_rss_mb": max(r["peak_rss_mib"] for r in ranks),
        "peak_held_rows": max(r["peak_held_rows"] for r in ranks),
        "setup_s": max(r["setup_s"] for r in ranks),
        "command": " ".join(cmds[0][1:]),
    }


# ---------------------------------------------------------------------------- training


def _proc_status_kb(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _children_of() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            out.setdefault(ppid, []).append(int(entry.name))
    return out


def _rank_of(pid: int) -> int | None:
    """torchrun's RANK of a worker process (None: not a worker, or gone)."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if b"trainer.train" not in cmdline:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


class RssWatcher(threading.Thread):
    """Polls the workers under `root` (see the module doc): last VmHWM per rank, timeline."""

    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root, self.done = root, threading.Event()
        self.workers: dict[int, int] = {}  # pid -> rank
        self.hwm_kb: dict[int, int] = {}  # rank -> last VmHWM seen
        self.timeline: list[list[float | None]] = []

    def _find(self) -> None:
        children, todo = _children_of(), [self.root]
        while todo:
            pid = todo.pop()
            for child in children.get(pid, []):
                rank = _rank_of(child)
                if rank is not None:
                    self.workers[child] = rank
                todo.append(child)

    def run(self) -> None:
        t0 = next_sample = time.perf_counter()
        while not self.done.is_set():
            if len(self.workers) < WORLD:
                self._find()
            rss = {}
            for pid, rank in self.workers.items():
                hwm = _proc_status_kb(pid, "VmHWM")
                if hwm is not None:
                    self.hwm_kb[rank] = max(self.hwm_kb.get(rank, 0), hwm)
                    rss[rank] = round((_proc_status_kb(pid, "VmRSS") or 0) / 1024, 1)
            now = time.perf_counter()
            if rss and now >= next_sample:
                self.timeline.append([round(now - t0, 1), *(rss.get(r) for r in range(WORLD))])
                next_sample = now + TIMELINE_S
            self.done.wait(POLL_S)


def train_run(path: str, run_dir: Path, a: argparse.Namespace) -> dict[str, Any]:
    """One 2-rank training run on the folder `path`; summary figures and peak RSS per rank."""
    overrides = [
        "data=parquet_stream", *data_overrides(path, "data."), *TRAIN_OVERRIDES,
        f"trainer.steps={a.steps}", f"trainer.batch_size={a.batch_size}", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    env = {**os.environ, "NPROC": str(WORLD), "PYTHON": sys.executable}
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "launch.log", "w") as log:
        proc = subprocess.Popen(["bash", "launch/torchrun.sh", *overrides], cwd=ROOT, env=env, stdout=log, stderr=log)
        watcher = RssWatcher(proc.pid)
        watcher.start()
        _, status, usage = os.wait4(proc.pid, 0)  # usage: the job's largest process peak
        proc.returncode = os.waitstatus_to_exitcode(status)
        watcher.done.set()
        watcher.join()
    if proc.returncode != 0:
        tail = (run_dir / "launch.log").read_text()[-3000:]
        raise RuntimeError(f"training run on {path} failed ({proc.returncode}):\n{tail}")
    if sorted(watcher.hwm_kb) != list(range(WORLD)):
        raise RuntimeError(f"found the VmHWM of ranks {sorted(watcher.hwm_kb)} only (run dir {run_dir})")
    s = json.loads((run_dir / "summary.json").read_text())
    per_rank = [watcher.hwm_kb[r] / 1024 for r in range(WORLD)]
    return {
        "peak_rss_mb": max(per_rank),
        "peak_rss_mb_per_rank": per_rank,
        "peak_rss_mb_wait4": usage.ru_maxrss / 1024,
        "rss_timeline_mb": watcher.timeline,
        "train_samples_per_s": s["train_samples_per_s"],
        "loader_samples_per_s": s["loader_samples_per_s"],
        "step_time_ms": s["step_time_ms"],
        "setup_s": s["setup_s"],
        "train_s": s["train_s"],
        "wall_s": s["wall_s"],
        "run_dir": str(run_dir),
        "command": f"NPROC={WORLD} bash launch/torchrun.sh " + " ".join(overrides),
    }


# ----------------------------------------------------------------------------- report


def evaluation(a: argparse.Namespace) -> dict[str, Any]:
    res = measure(rows=a.eval_rows, users=a.eval_users, world=WORLD, tasks=a.eval_tasks)
    res["eval_baseline_rss_mb"] = {
        mode: max(r["peak_rss_mb"] - r["extra_rss_mb"] for r in ranks) for mode, ranks in res["per_rank"].items()
    }
    res["command"] = (
        f"benchmarks.eval_scale.measure(rows={a.eval_rows}, users={a.eval_users}, world={WORLD}, "
        f"tasks={a.eval_tasks}, modes=('exact', 'distributed'))"
    )
    return res


def targets(out: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(ratios, targets) from the figures (module doc)."""
    peak = out["peak_rss_mb"]
    per_rank_trainer = [t / WORLD for t in out["trainer_samples_per_s"]]
    over = [lo / tr for lo, tr in zip(out["loader_rows_per_s"], per_rank_trainer, strict=True)]
    in_run = [lo / tr for lo, tr in zip(out["trainer_loader_samples_per_s"], out["trainer_samples_per_s"], strict=True)]
    peak_e, peak_d = out["eval_peak_rss_mb"]["exact"], out["eval_peak_rss_mb"]["distributed"]
    extra_e, extra_d = out["eval_extra_rss_mb"]["exact"], out["eval_extra_rss_mb"]["distributed"]
    const = out["eval"]["eval_baseline_rss_mb"]["distributed"]
    ratios = {
        "peak_rss_last_over_first": peak[-1] / peak[0],
        "peak_rss_max_over_min": max(peak) / min(peak),
        "loader_over_trainer_per_rank": over,
        "loader_over_trainer_in_run": in_run,
        "eval_peak_distributed_over_exact": peak_d / peak_e,
        "eval_extra_distributed_over_exact": extra_d / extra_e,
        "eval_s_distributed_over_exact": out["eval_s"]["distributed"] / out["eval_s"]["exact"],
    }
    goals = {
        "peak_rss_flat": {
            "limit": RSS_FLAT_LIMIT, "value": ratios["peak_rss_last_over_first"],
            "met": ratios["peak_rss_last_over_first"] <= RSS_FLAT_LIMIT,
        },
        "loader_5x_trainer": {
            "limit": LOADER_OVER_TRAINER, "value": min(over), "met": min(over) >= LOADER_OVER_TRAINER,
        },
        "eval_peak_per_rank": {
            "bound_mb": peak_e / WORLD + const, "constant_mb": const, "value_mb": peak_d,
            "met": peak_d <= peak_e / WORLD + const,
        },
        "eval_extra_per_rank": {"bound_mb": extra_e / WORLD, "value_mb": extra_d, "met": extra_d <= extra_e / WORLD},
    }  # fmt: skip
    return ratios, goals


def run(a: argparse.Namespace) -> dict[str, Any]:
    sizes = [int(x) for x in a.rows.split(",")]
    out: dict[str, Any] = {"benchmark": "data_scale", "quick": a.quick, "rows": sizes, "world_size": WORLD}
    data, loaders, trains = [], [], []
    for n in sizes:
        data.append(ensure_dataset(a, n))
        print(f"data_scale: N={n}: data {data[-1]}", file=sys.stderr, flush=True)
        loaders.append(loader_bench(data[-1]["path"], a))
        print(f"data_scale: N={n}: loader {loaders[-1]['rows_per_s']:.0f} rows/s", file=sys.stderr, flush=True)
        trains.append(train_run(data[-1]["path"], Path(a.run_root) / f"rows_{n}", a))
        print(f"data_scale: N={n}: train peak {trains[-1]['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
    out["data"] = data
    out["loader_rows_per_s"] = [x["rows_per_s"] for x in loaders]
    out["loader_peak_rss_mb"] = [x["peak_rss_mb"] for x in loaders]
    out["peak_rss_mb"] = [x["peak_rss_mb"] for x in trains]
    out["peak_rss_mb_per_rank"] = [x["peak_rss_mb_per_rank"] for x in trains]
    out["peak_rss_mb_wait4"] = [x["peak_rss_mb_wait4"] for x in trains]
    out["trainer_samples_per_s"] = [x["train_samples_per_s"] for x in trains]
    out["trainer_loader_samples_per_s"] = [x["loader_samples_per_s"] for x in trains]
    out["loader"], out["train"] = loaders, trains
    ev = out["eval"] = evaluation(a)
    out["eval_rows"] = a.eval_rows
    for key in ("eval_s", "eval_peak_rss_mb", "eval_extra_rss_mb"):
        out[key] = ev[key]
    out["ratios"], out["targets"] = targets(out)
    out["commands"] = {
        "generate": [d["command"] for d in data],
        "loader": [x["command"] for x in loaders],
        "train": [x["command"] for x in trains],
        "eval": ev["command"],
    }
    out["config"] = {k: v for k, v in vars(a).items() if k != "out"}
    out["env"] = {"cpu_count": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine()}
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test); defaults below change")
    p.add_argument("--rows", help=f"training rows per size, comma-separated (default {FULL['rows']})")
    p.add_argument("--data-root", help=f"generated data sets, one folder per size (default {FULL['data_root']})")
    p.add_argument("--run-root", help="training run directories (default: beside --out)")
    p.add_argument("--steps", type=int, help=f"training steps per run (default {FULL['steps']})")
    p.add_argument("--batch-size", type=int, help=f"global batch, 2 ranks (default {FULL['batch_size']})")
    p.add_argument("--loader-batches", type=int, help="batches per rank in the loader bench")
    p.add_argument("--eval-rows", type=int, help=f"evaluation rows (default {FULL['eval_rows']})")
    p.add_argument("--eval-users", type=int)
    p.add_argument("--eval-tasks", type=int, default=6, help="tasks in the evaluation (the data's 6)")
    for key in ("split_rows", "files", "row_group_size", "users", "videos"):
        p.add_argument(f"--{key.replace('_', '-')}", type=int, help=f"python -m data.generate (default {FULL[key]})")
    p.add_argument("--seed", type=int, default=0, help="python -m data.generate seed")
    a = p.parse_args(argv)
    for key, value in (QUICK if a.quick else FULL).items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.run_root is None:
        a.run_root = str(a.out.parent / (a.out.stem + "_runs"))
    a.data_root, a.run_root = str(Path(a.data_root).resolve()), str(Path(a.run_root).resolve())
    if a.batch_size % WORLD:
        p.error(f"--batch-size must be divisible by {WORLD}")
    return a


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    result = run(a)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("rows", "peak_rss_mb", "loader_rows_per_s", "targets")}, indent=2))
    return result


if __name__ == "__main__":
    main()
