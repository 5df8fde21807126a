"""Serving latency of the SMES core: progressive vs all routing vs MMoE (DESIGN section 8).

One process, evaluation mode, no grad. For every E in `--experts` and batch size in
`--batches` it times three cores on the same random inputs `x_BD`:

- `smes_progressive`: the SMES layer (`model/smes.py`), progressive routing;
- `smes_all`: the same layer with the same weights, `routing=all`: every expert on
  every instance (equal capacity, the paper's comparison);
- `mmoe_equal_active`: MMoE (`model/baselines.py`) with round(mean |U|) experts of
  the same widths, mean |U| being the progressive layer's distinct experts per
  instance on these inputs (equal activated expert compute).

`--impl eager` (default) runs the cores as the trainer evaluates them (their
`forward`, auxiliary statistics included); `--impl exported` runs the cores' torch.export
programs as the inference artifact holds them (`trainer/export.py`: SMES through its
evaluation-mode formulation, MMoE as is). The cores only: no embeddings, no towers
(the same for all three). The routers are at their initialisation, so mean |U| is near
its bound K_s + T*K_a (a trained router shares more experts across tasks).

Defaults (realistic widths): input D = 512, experts [512, 256] (Linear-ReLU each),
T = 6 tasks, K_s = 2, K_a = 1, E in {16, 64, 256}, batch in {1, 64, 512, 4096}.
A configuration whose expert GFLOPs per forward exceed `--max-gflop` is skipped
(`all` routing at E = 256 and batch 4096 is 1.6 TFLOP per call), recorded as skipped.
Timing: `--warmup` untimed calls, then calls until `--min-time` seconds and
`--min-iters` calls (at most `--max-iters`); p50 / p99 over the calls, samples/s =
rows / mean time. On CUDA every call is synchronised. Absolute times on shared CPUs
are noise: compare the ratios within a run.

    python -m benchmarks.inference --out outputs/bench/inference.json
    python -m benchmarks.inference --quick --out /tmp/inference.json   # seconds

JSON: `config`, `environment`, `mean_active` (E -> mean |U|), `rows` (one per model, E
and batch: `p50_ms`, `p99_ms`, `mean_ms`, `samples_per_s`, `iters`, `gflop`, or
`skipped`), `ratios` (per E and batch: `progressive_over_all` and
`progressive_over_mmoe` of p50 and p99), and the markdown table (`table`, also printed).

Legend: B instances, D input width, E experts, T tasks, U distinct experts per instance.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from model.baselines import MMoE, MMoEConfig
from model.core import CoreOutput
from model.smes import SMES, SMESConfig

MODELS = ("smes_progressive", "smes_all", "mmoe_equal_active")


class CoreProgram(nn.Module):
    """A core as one tensor function: `x_BD -> [B, T, H]` (what `--impl exported` traces)."""

    def __init__(self, core: nn.Module) -> None:
        super().__init__()
        from trainer.export import SMESInference  # the artifact's SMES formulation

        self.tasks: tuple[str, ...] = tuple(core.tasks)  # type: ignore[arg-type]
        self.core = SMESInference(core) if isinstance(core, SMES) else core

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        out: CoreOutput = self.core(x_BD)
        return torch.stack([out.task_reprs[t] for t in self.tasks], dim=1)


def build_cores(args: argparse.Namespace, num_experts: int, x_BD: torch.Tensor) -> tuple[dict[str, nn.Module], float]:
    """The three cores at `num_experts` (module doc) and the progressive mean |U|."""
    tasks = tuple(f"task{i}" for i in range(args.tasks))
    common = {"num_experts": num_experts, "shared_top_k": args.shared_top_k, "adaptive_top_k": args.adaptive_top_k,
              "expert_hidden": list(args.hidden)}  # fmt: skip
    torch.manual_seed(args.seed)
    progressive = SMES(SMESConfig(**common, routing="progressive"), in_dim=args.in_dim, tasks=tasks).eval()
    every = SMES(SMESConfig(**common, routing="all"), in_dim=args.in_dim, tasks=tasks).eval()
    every.load_state_dict(progressive.state_dict())  # the same layer, only the routing differs
    with torch.no_grad():
        load = progressive(x_BD).load
    assert load is not None
    mean_u = float(load.active_sum / load.num_instances)
    mmoe_cfg = MMoEConfig(num_experts=max(1, round(mean_u)), expert_hidden=list(args.hidden))
    mmoe = MMoE(mmoe_cfg, in_dim=args.in_dim, tasks=tasks).eval()
    cores = {"smes_progressive": progressive, "smes_all": every, "mmoe_equal_active": mmoe}
    return {k: v.to(args.device) for k, v in cores.items()}, mean_u


def expert_gflop(args: argparse.Namespace, model: str, *, num_experts: int, mean_u: float, batch: int) -> float:
    """Expert matmul GFLOPs of one forward (2 * MACs)."""
    dims = [args.in_dim, *args.hidden]
    per_expert = sum(a * b for a, b in zip(dims, dims[1:], strict=False)) * 2
    experts = {"smes_progressive": mean_u, "smes_all": num_experts, "mmoe_equal_active": round(mean_u)}[model]
    return batch * experts * per_expert / 1e9


def callable_for(args: argparse.Namespace, core: nn.Module, x_BD: torch.Tensor) -> Any:
    if args.impl == "eager":
        return core
    program = CoreProgram(core).eval()
    dim = torch.export.Dim("batch", min=1, max=1 << 24)
    with torch.no_grad():
        exported = torch.export.export(program, (x_BD[:8].clone(),), dynamic_shapes=({0: dim},), strict=False)
    return exported.module()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_calls(args: argparse.Namespace, fn: Any, x_BD: torch.Tensor) -> list[float]:
    """Milliseconds per call (module doc: warmup, then min time / min and max calls)."""
    device = x_BD.device
    for _ in range(args.warmup):
        fn(x_BD)
    sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < args.max_iters and (len(times) < args.min_iters or time.perf_counter() - start < args.min_time):
        t0 = time.perf_counter()
        fn(x_BD)
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def measure(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(args.seed)
    x_all = torch.randn(max(args.batches), args.in_dim, generator=gen).to(device)
    rows, mean_active = [], {}
    for E in args.experts:
        cores, mean_u = build_cores(args, E, x_all)
        mean_active[str(E)] = mean_u
        for name in MODELS:
            fn = callable_for(args, cores[name], x_all)
            for B in args.batches:
                gflop = expert_gflop(args, name, num_experts=E, mean_u=mean_u, batch=B)
                row: dict[str, Any] = {"model": name, "E": E, "batch": B, "gflop": gflop}
                if name == "mmoe_equal_active":
                    row["mmoe_experts"] = max(1, round(mean_u))
                if gflop > args.max_gflop:
                    row["skipped"] = f"{gflop:.0f} GFLOP per call > --max-gflop {args.max_gflop:g}"
                else:
                    times = time_calls(args, fn, x_all[:B])
                    row.update(
                        p50_ms=float(np.percentile(times, 50)),
                        p99_ms=float(np.percentile(times, 99)),
                        mean_ms=statistics.fmean(times),
                        samples_per_s=B * 1e3 / statistics.fmean(times),
                        iters=len(times),
                    )
                rows.append(row)
                print(_row_line(row), flush=True)
            del fn
        del cores
    return {"rows": rows, "mean_active": mean_active, "ratios": ratios(rows)}


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (E, batch): progressive / all and progressive / MMoE, p50 and p99."""
    by = {(r["model"], r["E"], r["batch"]): r for r in rows if "p50_ms" in r}
    out = []
    for (model, E, B), prog in by.items():
        if model != "smes_progressive":
            continue
        entry: dict[str, Any] = {"E": E, "batch": B}
        for other, key in (("smes_all", "progressive_over_all"), ("mmoe_equal_active", "progressive_over_mmoe")):
            ref = by.get((other, E, B))
            for q in ("p50", "p99"):
                entry[f"{key}_{q}"] = None if ref is None else prog[f"{q}_ms"] / ref[f"{q}_ms"]
        out.append(entry)
    return out


def _row_line(row: dict[str, Any]) -> str:
    head = f"{row['model']:>18} E={row['E']:<4} B={row['batch']:<5}"
    if "skipped" in row:
        return f"{head} skipped: {row['skipped']}"
    return (f"{head} p50 {row['p50_ms']:9.3f} ms  p99 {row['p99_ms']:9.3f} ms  "
            f"{row['samples_per_s']:11.1f} samples/s  ({row['iters']} calls)")  # fmt: skip


def table(result: dict[str, Any]) -> str:
    """Markdown: one line per (E, batch), p50 / p99 of each model and the ratios."""
    by = {(r["model"], r["E"], r["batch"]): r for r in result["rows"]}
    rat = {(r["E"], r["batch"]): r for r in result["ratios"]}
    lines = [
        "| E | mean U | batch | progressive p50 / p99 ms | all p50 / p99 ms | MMoE(U) p50 / p99 ms "
        "| progressive / all p50 | progressive / MMoE p50 | progressive samples/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(r: dict[str, Any] | None) -> str:
        if r is None or "p50_ms" not in r:
            return "skipped"
        return f"{r['p50_ms']:.3g} / {r['p99_ms']:.3g}"

    def ratio(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    for E in sorted({r["E"] for r in result["rows"]}):
        for B in sorted({r["batch"] for r in result["rows"]}):
            prog = by.get(("smes_progressive", E, B))
            r = rat.get((E, B), {})
            rate = f"{prog['samples_per_s']:.0f}" if prog and "samples_per_s" in prog else "-"
            lines.append(
                f"| {E} | {result['mean_active'][str(E)]:.2f} | {B} | {cell(prog)} | "
                f"{cell(by.get(('smes_all', E, B)))} | {cell(by.get(('mmoe_equal_active', E, B)))} | "
                f"{ratio(r.get('progressive_over_all_p50'))} | {ratio(r.get('progressive_over_mmoe_p50'))} | {rate} |"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.inference", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, help="JSON result file")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--impl", choices=("eager", "exported"), default="eager")
    p.add_argument("--experts", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64, 512, 4096])
    p.add_argument("--in-dim", type=int, default=512)
    p.add_argument("--hidden", type=int, nargs="+", default=[512, 256])
    p.add_argument("--tasks", type=int, default=6)
    p.add_argument("--shared-top-k", type=int, default=2, help="K_s")
    p.add_argument("--adaptive-top-k", type=int, default=1, help="K_a")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--min-iters", type=int, default=5)
    p.add_argument("--max-iters", type=int, default=200)
    p.add_argument("--min-time", type=float, default=1.0, help="seconds of timed calls per configuration")
    p.add_argument("--max-gflop", type=float, default=600.0, help="skip configurations above this (expert GFLOP/call)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a small subset in seconds (CI smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.experts, args.batches, args.in_dim, args.hidden = [16], [1, 64], 64, [64, 32]
        args.warmup, args.min_iters, args.max_iters, args.min_time = 1, 3, 20, 0.05
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure(args)
    result["table"] = table(result)
    result["config"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    result["environment"] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "device": str(
            torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else "cpu"
        ),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    print(result["table"])
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
