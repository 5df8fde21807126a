"""The SMES core and the whole network training step on one GPU: step time, expert-GEMM
TFLOP/s and MFU, grouped GEMM vs one plain matmul, all / independent routing, host
syncs, peak memory, and the per-step costs (weight casts, dispatch bytes), as JSON.

    python -m benchmarks.gpu --out outputs/bench/gpu.json              # one GPU, < 4 min on an H200
    python -m benchmarks.gpu --device cpu --quick --out /tmp/gpu.json  # CI smoke test (seconds)

Runs with only torch and the standard library (no torchrec, fbgemm, hydra, wandb,
numpy): it imports just `model.smes`, `model.moe.*`, `model.mlp` and the trainer's
`trainer.loss` and `trainer.ema`, which are torch-only.

Setup (defaults, production-like): one `SMESLayer` alone (no embeddings), D = 512,
experts [512, 256] (Linear + ReLU each), T = 8, K_s = 2, K_a = 1, batch 16,384,
E = 8, 16, 32, 64, 128, 256; balance loss on (beta 0.01). A step is forward under
autocast (`--precision bf16`: bf16 autocast, fp32 weights, as `trainer.precision=bf16`),
loss = mean square of the task outputs + the balance term, backward to the weights
and to x (pooled embeddings need their gradient). No optimizer step: weights, hence
the routing plan, stay fixed over the timed steps. Timing: `--warmup` steps, then the
median of up to `--iters` steps (CUDA events on a GPU, perf_counter on CPU); the
iterations of a config are cut so that it takes about `--config-s` seconds, and
configs are skipped (with a note) once `--budget-s` is spent. On a shared CPU,
`--threads 1 --cpu-timer process` (process CPU time) gives the steadiest ratios.
`--backend` is `model.grouped_backend`.

FLOPs: the expert GEMMs only, counted from the plan's pair count N:
`2 * N * sum_i D_i * H_i` forward, 3x that forward + backward. MFU = those FLOPs per
second / a peak: `--peak-tflops` (default 989, H200 bf16 without structured sparsity, by spec) and the rate
of one `--matmul-size`^3 matmul in the run's dtype measured in the same run.

Whole network step (section `step`, every mode and E): what the trainer runs per step
after the embeddings, on one GPU: the SMES layer, one `TaskTower` per task (hidden
`--tower`), the trainer's loss (`trainer.loss.total_loss`: per-task BCE plus the aux
terms), backward, gradient clipping by the global norm, the trainer's default network
optimizer (`torch.optim.Adam`, lr 1e-3) and the weight average (`trainer.ema`,
decay 0.995): `full_step_ms` (median), `full_step_ms_min`, and per step
`weight_cast_bytes` (bytes of the experts' weights cast to the kernel dtype, forward
and the gradients cast back, counted in one step by a dispatch mode) and
`dispatch_row_bytes` (the pair rows as the dispatcher gathers them: in the compute
dtype, D padded to 16 bytes; what crosses the wire under expert parallelism, times
(ep - 1) / ep, and again for the gradients; null for `all` routing, which gathers
nothing).

JSON keys:

- `config`, `environment` (torch, device name, capability, python), `elapsed_s`,
  `notes` (configs skipped or failed, and why), `peak_tflops_spec`;
- `matmul`: `{size, dtype, ms, tflops}` of the reference matmul;
- `rows`: one per (E, mode), mode in `progressive`, `independent`, `all`:
  `E`, `mode`, `step_ms` (median), `step_ms_min`, `iters`, `num_pairs` (N),
  `mean_U` (N / B, distinct experts run per instance), `max_U`, `U_bound`
  (K_s + T*K_a, min(E, T*(K_s+K_a)) or E), `expert_tflop_per_step`,
  `expert_tflops` (on the step time), `mfu_vs_spec`, `mfu_vs_matmul`,
  `syncs_per_step` (CUDA: warnings of `torch.cuda.set_sync_debug_mode("warn")` in
  one step; null on CPU), `python_sync_points_per_step` (`benchmarks.host_syncs.count_host_syncs`
  in one step), `peak_mem_gb` (`torch.cuda.max_memory_allocated`; null on CPU);
  `progressive` rows add the expert part alone, forward + backward to x, measured
  round-robin: the plan's rows gathered as the dispatcher does and run through the
  experts (`grouped_ms`, `grouped_tflops`, `kernel_dtype`); the same N rows through one
  `[N, D] @ [D, H]` matmul per layer, the same FLOPs (`plain_matmul_ms`,
  `grouped_fraction_of_plain` = plain / grouped time); the per-expert loop backend
  (`loop_ms`, `grouped_speedup_over_loop` = loop / grouped time); and for an unaligned
  D the kernel on D rounded up to its alignment, which needs no padding (`aligned_ms`,
  `padding_cost` = grouped / aligned time; both null for an aligned D);
- `summary`: `progressive_step_Emax_over_Emin` (and
  `progressive_full_step_Emax_over_Emin`), `all_over_progressive_step` and
  `independent_over_progressive_step` per E, `max_syncs_per_step`,
  `max_python_sync_points_per_step`, `mfu_vs_spec_at_Emax`.

Legend: B instances, D input width, E experts, T tasks, N pairs, H width.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.host_syncs import count_host_syncs
from model.mlp import TaskTower
from model.moe.experts import GroupedExperts
from model.moe.router import max_union
from model.smes import SMESConfig, SMESLayer
from trainer.ema import WeightAverage
from trainer.loss import total_loss

MODES = ("progressive", "independent", "all")
QUICK = dict(batch=512, in_dim=37, hidden="32,16", tasks=3, experts="4,8", iters=3, warmup=1, matmul_size=128)


class Clock:
    """Step timer: CUDA events on a GPU (no sync inside the timed loop), perf_counter on CPU."""

    def __init__(self, device: torch.device, cpu_timer: str = "wall") -> None:
        self.cuda = device.type == "cuda"
        # process CPU time: less sensitive to other processes on a shared box (single thread)
        self.now = time.process_time if cpu_timer == "process" else time.perf_counter

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn: Callable[[], Any], iters: int) -> list[float]:
        """Milliseconds of `iters` calls of `fn`, one sample each."""
        if not self.cuda:
            out = []
            for _ in range(iters):
                t0 = self.now()
                fn()
                out.append((self.now() - t0) * 1e3)
            return out
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in events]


def autocast(args: argparse.Namespace, device: torch.device):
    if args.precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def expert_flop(num_rows: int, widths: list[int]) -> float:
    """Forward + backward FLOPs of the expert GEMMs over `num_rows` rows."""
    return 3 * 2 * num_rows * sum(a * b for a, b in zip(widths, widths[1:], strict=False))


def timed(args: argparse.Namespace, clock: Clock, fn: Callable[[], Any]) -> dict:
    """Warm up, size the iterations to `--config-s`, return median / min ms."""
    for _ in range(args.warmup):
        fn()
    clock.sync()
    first = clock.time(fn, 1)[0]
    iters = max(3, min(args.iters, int(args.config_s * 1e3 / max(first, 1e-3))))
    samples = clock.time(fn, iters)
    return {"step_ms": statistics.median(samples), "step_ms_min": min(samples), "iters": iters}


def timed_together(args: argparse.Namespace, clock: Clock, fns: dict[str, Callable[[], Any]]) -> dict[str, float]:
    """Median ms of each `fn`, measured round-robin (one call of each per round), so that
    their ratios see the same machine state (shared CPUs, clocks)."""
    for fn in fns.values():
        for _ in range(args.warmup):
            fn()
    clock.sync()
    first = sum(clock.time(fn, 1)[0] for fn in fns.values())
    rounds = max(3, min(args.iters, int(args.config_s * 1e3 / max(first, 1e-3))))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name] += clock.time(fn, 1)
    return {name: statistics.median(v) for name, v in samples.items()}


def count_syncs(clock: Clock, fn: Callable[[], Any]) -> tuple[int | None, int]:
    """(CUDA sync-debug warnings, Python-visible sync points) of one call of `fn`."""
    python_points = 0
    with count_host_syncs() as records:
        fn()
    python_points = len(records)
    if not clock.cuda:
        return None, python_points
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return sum("synchroniz" in str(w.message) for w in seen), python_points


def build_layer(args: argparse.Namespace, num_experts: int, mode: str, device: torch.device) -> SMESLayer:
    torch.manual_seed(args.seed)
    cfg = SMESConfig(
        num_experts=num_experts,
        shared_top_k=args.shared_top_k,
        adaptive_top_k=args.adaptive_top_k,
        routing=mode,
        expert_hidden=args.hidden_list,
        grouped_backend=args.backend,
    )
    return SMESLayer(cfg, in_dim=args.in_dim, num_tasks=args.tasks).to(device)


def step_fn(args: argparse.Namespace, layer: SMESLayer, x_BD: torch.Tensor, device: torch.device, keep: dict):
    def step() -> None:
        layer.zero_grad(set_to_none=True)
        x_BD.grad = None
        with autocast(args, device):
            out_BTH, aux, load = layer(x_BD)
            loss = out_BTH.float().square().mean() + sum(aux.values())
        loss.backward()
        keep["load"] = load

    return step


def measure_mode(args, clock: Clock, device: torch.device, num_experts: int, mode: str, peaks: dict) -> dict:
    if clock.cuda:
        torch.cuda.empty_cache()  # the previous config's blocks: free for this one (and for `all_fits`)
    layer = build_layer(args, num_experts, mode, device)
    x_BD = torch.randn(args.batch, args.in_dim, device=device, requires_grad=True)
    keep: dict = {}
    step = step_fn(args, layer, x_BD, device, keep)
    if clock.cuda:
        torch.cuda.reset_peak_memory_stats(device)
    row: dict[str, Any] = {"E": num_experts, "mode": mode, **timed(args, clock, step)}
    syncs, points = count_syncs(clock, step)
    load = keep["load"]
    num_pairs = int(load.active_sum)
    widths = [args.in_dim, *args.hidden_list]
    tflop = expert_flop(num_pairs, widths) / 1e12
    row.update(
        num_pairs=num_pairs,
        mean_U=num_pairs / args.batch,
        max_U=float(load.active_max),
        U_bound=max_union(
            mode,
            num_experts=num_experts,
            num_tasks=args.tasks,
            shared_top_k=args.shared_top_k,
            adaptive_top_k=args.adaptive_top_k,
        ),  # fmt: skip
        expert_tflop_per_step=tflop,
        expert_tflops=tflop / (row["step_ms"] / 1e3),
        syncs_per_step=syncs,
        python_sync_points_per_step=points,
        peak_mem_gb=torch.cuda.max_memory_allocated(device) / 2**30 if clock.cuda else None,
    )
    row["mfu_vs_spec"] = row["expert_tflops"] / peaks["spec"]
    row["mfu_vs_matmul"] = row["expert_tflops"] / peaks["matmul"]
    if mode == "progressive" and "gemm" in args.section_list:
        row.update(measure_gemm(args, clock, device, layer, x_BD))
    if "step" in args.section_list:
        row.update(measure_full_step(args, clock, device, layer, x_BD))
        row["full_step_over_core_step"] = row["full_step_ms"] / row["step_ms"]
    return row


class _WeightCasts(TorchDispatchMode):
    """Bytes written by dtype casts of tensors shaped like the experts' weights."""

    def __init__(self, shapes: list[torch.Size]) -> None:
        super().__init__()
        self.shapes, self.bytes = shapes, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and args[0].shape in self.shapes and "dtype" in (kwargs or {}):
            self.bytes += out.numel() * out.element_size()
        return out


def measure_full_step(args, clock: Clock, device: torch.device, layer: SMESLayer, x_BD: torch.Tensor) -> dict:
    """The whole network training step (module doc), and its per-step costs."""
    torch.manual_seed(args.seed)
    tasks = tuple(f"task{t}" for t in range(args.tasks))
    towers = nn.ModuleDict({t: TaskTower(layer.out_dim, args.tower_list) for t in tasks}).to(device)
    params = [*layer.parameters(), *towers.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    average = WeightAverage({str(i): p for i, p in enumerate(params)}, decay=0.995)
    batch = SimpleNamespace(
        dense=x_BD,
        labels={t: torch.randint(0, 2, (args.batch,), device=device).float() for t in tasks},
        weights=torch.ones(args.batch, device=device),
    )

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        x_BD.grad = None
        with autocast(args, device):
            out_BTH, aux, _ = layer(x_BD)
            logits = {t: towers[t](out_BTH[:, i]) for i, t in enumerate(tasks)}
        out = SimpleNamespace(logits=logits, aux_losses=aux)
        loss, _ = total_loss(out, batch, {t: 1.0 for t in tasks})  # type: ignore[arg-type]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        optimizer.step()
        average.update()

    timing = timed(args, clock, step)
    counter = _WeightCasts([w.shape for w in layer.experts.weights])
    with counter:
        step()
    with torch.no_grad(), autocast(args, device):
        plan = layer.router(x_BD)
        rows = layer.experts.input_rows(x_BD, plan.pair_instance_N)
    return {
        "full_step_ms": timing["step_ms"],
        "full_step_ms_min": timing["step_ms_min"],
        "weight_cast_bytes": counter.bytes,
        "dispatch_row_bytes": None if plan.all_experts else rows.numel() * rows.element_size(),
    }


def measure_gemm(args, clock: Clock, device: torch.device, layer: SMESLayer, x_BD: torch.Tensor) -> dict:
    """The expert MLP alone on the plan's rows: grouped kernel, one plain matmul, loop, aligned D."""
    with torch.no_grad():
        plan = layer.router(x_BD)
    rows_N, counts_E, N = plan.pair_instance_N, plan.counts_E, plan.num_pairs
    experts = layer.experts
    widths = [args.in_dim, *args.hidden_list]

    def run(module: Callable[[torch.Tensor], torch.Tensor], src_BD: torch.Tensor) -> Callable[[], None]:
        """`module(src_BD)` (which gathers the plan's rows), forward + backward to `src_BD`."""
        src_BD = src_BD.detach().requires_grad_()

        def fn() -> None:
            src_BD.grad = None
            with autocast(args, device):
                y = module(src_BD)
            y.float().sum().backward()

        return fn

    def on_rows(experts: GroupedExperts) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda src_BD: experts(experts.input_rows(src_BD, rows_N), counts_E)  # as the dispatcher

    pairs = list(zip(widths, widths[1:], strict=False))
    plain_w = [(torch.randn(a, b, device=device) / a**0.5).requires_grad_() for a, b in pairs]
    plain_b = [torch.zeros(b, device=device, requires_grad=True) for b in widths[1:]]

    def plain_mlp(x: torch.Tensor) -> torch.Tensor:
        for w, b in zip(plain_w, plain_b, strict=True):
            x = torch.relu(F.linear(x, w.t(), b))
        return x

    loop = GroupedExperts.from_stacked(
        [w.detach() for w in experts.weights], [b.detach() for b in experts.biases], backend="loop"
    )
    fns = {
        "grouped_ms": run(on_rows(experts), x_BD),
        "plain_matmul_ms": run(lambda src_BD: plain_mlp(src_BD.index_select(0, rows_N)), x_BD),
        "loop_ms": run(on_rows(loop), x_BD),
    }
    align = 16 // (2 if args.precision == "bf16" else 4)
    if args.in_dim % align:  # the padding copy's cost: the same kernel on D rounded up
        D_pad = -(-args.in_dim // align) * align
        torch.manual_seed(args.seed)
        wide = GroupedExperts(experts.num_experts, D_pad, args.hidden_list).to(device)
        fns["aligned_ms"] = run(on_rows(wide), F.pad(x_BD.detach(), (0, D_pad - args.in_dim)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the loop backend is asked for here
        out: dict[str, Any] = {"aligned_ms": None, **timed_together(args, clock, fns)}
    with autocast(args, device):
        kernel_dtype = experts.kernel_dtype(x_BD)
    out["kernel_dtype"] = str(kernel_dtype).replace("torch.", "") if kernel_dtype else "loop"
    out["grouped_tflops"] = expert_flop(N, widths) / 1e12 / (out["grouped_ms"] / 1e3)
    out["grouped_fraction_of_plain"] = out["plain_matmul_ms"] / out["grouped_ms"]
    out["grouped_speedup_over_loop"] = out["loop_ms"] / out["grouped_ms"]
    out["padding_cost"] = None if out["aligned_ms"] is None else out["grouped_ms"] / out["aligned_ms"]
    return out


def measure_matmul(args: argparse.Namespace, clock: Clock, device: torch.device) -> dict:
    n = args.matmul_size
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    ms = timed(args, clock, lambda: torch.mm(a, b))["step_ms"]
    return {"size": n, "dtype": str(dtype).replace("torch.", ""), "ms": ms, "tflops": 2 * n**3 / (ms / 1e3) / 1e12}


def all_fits(args: argparse.Namespace, device: torch.device, num_experts: int) -> str | None:
    """Why `all` routing at this E would not fit (memory), else None."""
    if device.type != "cuda":
        return None
    bytes_el = 2 if args.precision == "bf16" else 4
    need = args.batch * num_experts * sum(args.hidden_list) * bytes_el * 8  # outputs, ReLU, grads, mixing copy
    free, _ = torch.cuda.mem_get_info(device)
    if need > 0.7 * free:
        return f"all routing at E={num_experts}: needs ~{need / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free"
    return None


def summarize(rows: list[dict]) -> dict:
    prog = {r["E"]: r for r in rows if r["mode"] == "progressive"}
    out: dict[str, Any] = {"progressive_step_Emax_over_Emin": None, "mfu_vs_spec_at_Emax": None}
    if prog:
        lo, hi = min(prog), max(prog)
        out["progressive_step_Emax_over_Emin"] = prog[hi]["step_ms"] / prog[lo]["step_ms"]
        out["mfu_vs_spec_at_Emax"] = prog[hi]["mfu_vs_spec"]
        if "full_step_ms" in prog[hi]:
            out["progressive_full_step_Emax_over_Emin"] = prog[hi]["full_step_ms"] / prog[lo]["full_step_ms"]
    for mode in ("all", "independent"):
        out[f"{mode}_over_progressive_step"] = {
            str(r["E"]): r["step_ms"] / prog[r["E"]]["step_ms"] for r in rows if r["mode"] == mode and r["E"] in prog
        }
    syncs = [r["syncs_per_step"] for r in rows if r["syncs_per_step"] is not None]
    out["max_syncs_per_step"] = max(syncs) if syncs else None
    out["max_python_sync_points_per_step"] = max(r["python_sync_points_per_step"] for r in rows) if rows else None
    return out


def environment(device: torch.device) -> dict:
    env: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(), "device": device.type}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["capability"] = list(torch.cuda.get_device_capability(device))
        env["cuda"] = torch.version.cuda
    else:
        env["device_name"], env["num_threads"] = platform.processor() or "cpu", torch.get_num_threads()
    return env


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke test)")
    p.add_argument("--experts", default="8,16,32,64,128,256")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument(
        "--sections", default="gemm,step", help="extra measurements: gemm (the expert MLP alone), step (the whole "
        "network step: towers, loss, backward, clipping, optimizer, weight average), or none"
    )  # fmt: skip
    p.add_argument("--tower", default="64", help="task tower hidden widths (section step)")
    p.add_argument("--batch", type=int, default=16384)
    p.add_argument("--in-dim", type=int, default=512)
    p.add_argument("--hidden", default="512,256")
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--shared-top-k", type=int, default=2, help="K_s")
    p.add_argument("--adaptive-top-k", type=int, default=1, help="K_a")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--backend", choices=("auto", "grouped_mm", "loop"), default="auto", help="model.grouped_backend")
    p.add_argument(
        "--peak-tflops", type=float, default=989.0, help="chip's peak without structured sparsity, in the run's dtype"
    )
    p.add_argument("--matmul-size", type=int, default=8192)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--config-s", type=float, default=4.0, help="time per measurement, roughly")
    p.add_argument("--budget-s", type=float, default=200.0, help="skip what is left after this many seconds")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    p.add_argument("--cpu-timer", choices=("wall", "process"), default="wall", help="CPU step clock")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if p.get_default(key) == getattr(args, key):
                setattr(args, key, value)
    args.hidden_list = [int(h) for h in str(args.hidden).split(",")]
    args.tower_list = [int(h) for h in str(args.tower).split(",")]
    args.section_list = [s for s in args.sections.split(",") if s and s != "none"]
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = Clock(device, args.cpu_timer)
    matmul = measure_matmul(args, clock, device)
    peaks = {"spec": args.peak_tflops, "matmul": matmul["tflops"]}
    rows, notes = [], []
    for num_experts in [int(e) for e in args.experts.split(",")]:
        for mode in args.modes.split(","):
            why = all_fits(args, device, num_experts) if mode == "all" else None
            if why is None and time.perf_counter() - start > args.budget_s:
                why = f"{mode} at E={num_experts}: time budget of {args.budget_s:.0f} s spent"
            if why is not None:
                notes.append(why)
                continue
            try:
                rows.append(measure_mode(args, clock, device, num_experts, mode, peaks))
            except (RuntimeError, ValueError) as err:  # e.g. out of memory: keep the other configs
                notes.append(f"{mode} at E={num_experts} failed: {type(err).__name__}: {str(err)[:300]}")
                continue
            print(json.dumps(rows[-1]), flush=True)
    config = {k: v for k, v in vars(args).items() if k not in ("hidden_list", "section_list", "tower_list")}
    result = {
        "config": config,
        "environment": environment(device),
        "peak_tflops_spec": args.peak_tflops,
        "matmul": matmul,
        "rows": rows,
        "summary": summarize(rows),
        "notes": notes,
        "elapsed_s": time.perf_counter() - start,
    }
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["summary"], indent=2))
    return result


if __name__ == "__main__":
    main()
