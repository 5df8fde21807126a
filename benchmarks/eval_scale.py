"""Evaluation at scale: wall time and peak RSS per rank of `exact` vs `distributed` metrics.

    python -m benchmarks.eval_scale --rows 2000000 --users 100000 --out bench_out/eval_scale.json \
        [--world 2 --tasks 1 --modes exact,distributed --batch 8192]

Every mode is its own `--world`-process gloo run (spawned here, fresh processes, so one
mode's allocations do not lower the other's peak). Each rank builds its shard of
`--rows / --world` rows (seeded by rank, the same in every mode): user ids uniform over
`--users`, labels Bernoulli(0.3), logits `label + N(0, 1)` in float32, one tie group of
1% of the rows at logit 0; fills `trainer.evaluation.metrics.Predictions` in `--batch`-row batches
as the evaluation loop does; then all ranks meet, the peak-RSS counter is reset
(`/proc/self/clear_refs` = 5) and `compute_metrics(preds, tasks, mode=...)` runs.

Per mode: `eval_s` (the slowest rank's wall time of `compute_metrics`),
`eval_peak_rss_mb` (the largest rank's VmHWM during it: the whole process, predictions
and interpreter included), `eval_extra_rss_mb` (that peak minus the rank's RSS just
before: what evaluation itself added), and the metrics of rank 0. `agree` is true when
both modes give the same AUC (bit for bit) and GAUC / NE within 1e-12.

`measure(rows=..., users=..., ...)` returns the same dict for other benchmarks (e.g.
`benchmarks/data_scale.py`). Absolute times on a shared machine are noise; compare the
modes inside one run.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import time
import traceback
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from parallel.dist import barrier, free_port, local_rank_env
from trainer.evaluation.metrics import Predictions, compute_metrics


def _status_kb(field: str) -> int:
    text = pathlib.Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1))  # type: ignore[union-attr]


def _reset_peak_rss() -> bool:
    try:
        pathlib.Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _fill(rank: int, world: int, args: dict) -> Predictions:
    rng = np.random.default_rng(args["seed"] + rank)
    n = args["rows"] // world + (rank < args["rows"] % world)
    tasks = tuple(f"task{i}" for i in range(args["tasks"]))
    preds = Predictions(tasks)
    users = rng.integers(0, args["users"], n)
    labels = {t: (rng.random(n) < 0.3).astype(np.float32) for t in tasks}
    logits = {t: (labels[t] + rng.standard_normal(n)).astype(np.float32) for t in tasks}
    for t in tasks:
        logits[t][rng.random(n) < 0.01] = 0.0  # a tie group spread over every rank
    for lo in range(0, n, args["batch"]):
        hi = min(n, lo + args["batch"])
        preds.add(
            {t: torch.from_numpy(logits[t][lo:hi]) for t in tasks},
            {t: torch.from_numpy(labels[t][lo:hi]) for t in tasks},
            torch.ones(hi - lo),
            torch.from_numpy(users[lo:hi]),
        )
    return preds


def _worker(rank: int, world: int, mode: str, args: dict) -> dict:
    preds = _fill(rank, world, args)
    barrier()
    reset = _reset_peak_rss()
    before_kb = _status_kb("VmRSS")
    start = time.perf_counter()
    metrics = compute_metrics(preds, preds.tasks, mode=mode)
    seconds = time.perf_counter() - start
    return {
        "eval_s": seconds,
        "peak_rss_mb": _status_kb("VmHWM") / 1024,
        "extra_rss_mb": (_status_kb("VmHWM") - before_kb) / 1024,
        "peak_reset": reset,
        "metrics": metrics,
    }


def _entry(rank: int, world: int, port: int, mode: str, args: dict, queue: Any) -> None:
    os.environ.update(local_rank_env(rank, world, port), OMP_NUM_THREADS=str(args["threads"]))
    try:
        torch.set_num_threads(args["threads"])
        dist.init_process_group("gloo", rank=rank, world_size=world)
        queue.put((rank, "ok", _worker(rank, world, mode, args)))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _spawn(mode: str, world: int, args: dict, timeout_s: float = 3600.0) -> list[dict]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, mode, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, dict] = {}
    try:
        for _ in range(world):
            rank, status, value = queue.get(timeout=timeout_s)
            if status == "error":
                raise RuntimeError(f"rank {rank} ({mode}) failed:\n{value}")
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]


def _agree(a: dict, b: dict) -> bool:
    for t in a:
        if a[t]["auc"] != b[t]["auc"] or a[t]["gauc_users"] != b[t]["gauc_users"]:
            return False
        for key in ("gauc", "ne"):
            if (a[t][key] is None) != (b[t][key] is None) or (
                a[t][key] is not None and abs(a[t][key] - b[t][key]) > 1e-12
            ):
                return False
    return True


def measure(
    *,
    rows: int,
    users: int,
    world: int = 2,
    tasks: int = 1,
    modes: tuple[str, ...] = ("exact", "distributed"),
    batch: int = 8192,
    threads: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Time and peak RSS of `compute_metrics` per mode (module doc); JSON-ready dict."""
    args = {"rows": rows, "users": users, "tasks": tasks, "batch": batch, "threads": threads, "seed": seed}
    per_mode = {mode: _spawn(mode, world, args) for mode in modes}
    out: dict[str, Any] = {"rows": rows, "users": users, "world": world, "tasks": tasks, "batch": batch}
    out["eval_s"] = {m: max(r["eval_s"] for r in ranks) for m, ranks in per_mode.items()}
    out["eval_peak_rss_mb"] = {m: max(r["peak_rss_mb"] for r in ranks) for m, ranks in per_mode.items()}
    out["eval_extra_rss_mb"] = {m: max(r["extra_rss_mb"] for r in ranks) for m, ranks in per_mode.items()}
    keys = ("eval_s", "peak_rss_mb", "extra_rss_mb")
    out["per_rank"] = {m: [{k: r[k] for k in keys} for r in ranks] for m, ranks in per_mode.items()}
    out["peak_reset"] = all(r["peak_reset"] for ranks in per_mode.values() for r in ranks)
    out["metrics"] = {m: ranks[0]["metrics"] for m, ranks in per_mode.items()}
    if {"exact", "distributed"} <= set(per_mode):
        out["agree"] = _agree(out["metrics"]["exact"], out["metrics"]["distributed"])
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=2_000_000, help="evaluation rows in all")
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--tasks", type=int, default=1)
    p.add_argument("--modes", default="exact,distributed")
    p.add_argument("--batch", type=int, default=8192, help="rows per evaluation batch")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=pathlib.Path, default=None, help="write the JSON here")
    a = p.parse_args(argv)
    result = measure(
        rows=a.rows,
        users=a.users,
        world=a.world,
        tasks=a.tasks,
        modes=tuple(a.modes.split(",")),
        batch=a.batch,
        threads=a.threads,
        seed=a.seed,
    )
    text = json.dumps(result, indent=2)
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
