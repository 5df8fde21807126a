"""Harness for multi-process tests: spawn N gloo ranks on CPU, collect their results.

Each rank runs `fn(rank, world_size, *args)` in a fresh process and returns a picklable
value; the harness returns the list of values by rank and re-raises the first failure
with the rank's traceback.
"""

from __future__ import annotations

import io
import os
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from parallel.dist import free_port, local_rank_env


def _entry(
    rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple, queue: Any, backend: str
) -> None:
    os.environ.update(local_rank_env(rank, world_size, port), OMP_NUM_THREADS="1")
    try:
        torch.set_num_threads(1)
        if backend != "gloo":  # the CUDA simulation's NCCL-like backend (tests/cuda_sim/sim.py)
            from tests.cuda_sim.sim import register_backend

            register_backend()
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        buf = io.BytesIO()  # tensors by value: shared-memory handles die with the rank
        torch.save(result, buf)
        queue.put((rank, "ok", buf.getvalue()))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 300.0, backend: str = "gloo"
) -> list[Any]:
    """Run `fn` on `world_size` ranks of a `backend` (gloo, or the CUDA simulation's
    "simnccl") default group; return each rank's result, by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(r, world_size, port, fn, args, queue, backend), daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        for _ in range(world_size):
            rank, status, value = queue.get(timeout=timeout_s)
            if status == "error":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            results[rank] = torch.load(io.BytesIO(value), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world_size)]
