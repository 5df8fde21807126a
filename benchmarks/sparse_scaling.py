"""Sparse scaling of the SMES core: training-step time as the expert pool grows.

Times one training step (forward, backward, Adam step) of the SMES core alone (no
embeddings), for every E in `--experts` and every routing mode in `--modes`, at fixed
T, K_s, K_a, and records the mean number of distinct experts run per instance
(mean |U|). DESIGN section 8: at fixed K_s, K_a, T the `progressive` step time should
stay nearly flat in E while `all` grows with E; `E / mean|U|` is the ceiling of the
all / progressive speed-up on expert FLOPs.

Setup (defaults): batch 4096, input width 256, experts one layer of 256 (ReLU),
T = 4, K_s = 2, K_a = 1, balance beta 0.01, one linear head + BCE per task on random
labels, Adam (fused CPU kernel: the optimizer touches all E experts, so its cost is
one of the few that grow with E), 2 threads. Timing: `--warmup` untimed steps, then the median of `--repeats`
timed steps (absolute times on shared CPUs are noise; compare ratios inside one run).
For `progressive` it also times the grouped expert matmul alone (forward + backward)
against one plain matmul with the same rows (`grouped_vs_ideal`).

    python -m benchmarks.sparse_scaling --out outputs/bench/sparse_scaling.json

Output JSON: `{"rows": [{"E", "mode", "step_ms", "step_ms_min", "mean_U", "max_U",
"flops_ratio_vs_all", ...}], "checks": {...}, "config": {...}}`.

Legend: B instances, D input width, E experts, T tasks, N routed pairs, H width.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import torch
from torch import nn

from model.smes import SMES, SMESConfig


def build(args: argparse.Namespace, *, num_experts: int, mode: str) -> tuple[SMES, nn.ModuleDict]:
    tasks = tuple(f"task{i}" for i in range(args.tasks))
    cfg = SMESConfig(
        num_experts=num_experts,
        shared_top_k=args.shared_top_k,
        adaptive_top_k=args.adaptive_top_k,
        routing=mode,
        expert_hidden=[args.hidden],
        grouped_backend=args.backend,
    )
    core = SMES(cfg, in_dim=args.in_dim, tasks=tasks)
    heads = nn.ModuleDict({t: nn.Linear(core.out_dim, 1) for t in tasks})
    return core, heads


def time_steps(args: argparse.Namespace, core: SMES, heads: nn.ModuleDict, x_BD, y_BT) -> dict:
    opt = torch.optim.Adam([*core.parameters(), *heads.parameters()], lr=1e-3, fused=True)
    times, active, peak = [], [], 0.0
    for i in range(args.warmup + args.repeats):
        t0 = time.perf_counter()
        out = core(x_BD)
        loss = sum(out.aux_losses.values(), torch.zeros(()))
        for j, t in enumerate(core.tasks):
            logit_B = heads[t](out.task_reprs[t]).squeeze(-1)
            loss = loss + nn.functional.binary_cross_entropy_with_logits(logit_B, y_BT[:, j])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        elapsed = time.perf_counter() - t0
        if i >= args.warmup:
            times.append(elapsed * 1e3)
        active.append(float(out.load.active_sum / out.load.num_instances))
        peak = max(peak, float(out.load.active_max))
    return {
        "step_ms": statistics.median(times),
        "step_ms_min": min(times),
        "mean_U": statistics.fmean(active),
        "max_U": peak,
    }


def grouped_vs_ideal(args: argparse.Namespace, core: SMES, x_BD: torch.Tensor) -> dict:
    """Grouped expert matmul (fwd + bwd) vs one `[N, D] @ [D, H]` matmul of the same rows."""
    layer = core.layer
    with torch.no_grad():
        plan = layer.router(x_BD)
        routed_x_ND = x_BD.index_select(0, plan.pair_instance_N)
    w_DH = torch.randn(args.in_dim, args.hidden, requires_grad=True)
    b_H = torch.zeros(args.hidden, requires_grad=True)
    x_req = routed_x_ND.clone().requires_grad_()

    def grouped() -> None:
        layer.experts(x_req, plan.counts_E).sum().backward()

    def ideal() -> None:
        torch.relu(torch.addmm(b_H, x_req, w_DH)).sum().backward()

    out: dict[str, float | int | str] = {}
    for name, fn in (("grouped_ms", grouped), ("ideal_ms", ideal)):
        samples = []
        for i in range(args.warmup + args.repeats):
            t0 = time.perf_counter()
            fn()
            if i >= args.warmup:
                samples.append((time.perf_counter() - t0) * 1e3)
        out[name] = statistics.median(samples)
    out["grouped_fraction_of_ideal"] = float(out["ideal_ms"]) / float(out["grouped_ms"])
    out["num_pairs"] = plan.num_pairs
    out["grouped_backend"] = "loop" if layer.experts.kernel_dtype(routed_x_ND) is None else "grouped_mm"
    return out


def ratio(rows: list[dict], a: tuple[int, str], b: tuple[int, str], *, key: str = "step_ms") -> float | None:
    pick = {(r["E"], r["mode"]): r[key] for r in rows}
    return pick[a] / pick[b] if a in pick and b in pick else None


def summarize(rows: list[dict]) -> dict:
    """Target ratios on the median step time, and the same on the fastest step."""
    lo, hi = min(r["E"] for r in rows), max(r["E"] for r in rows)
    checks: dict = {}
    for suffix, key in (("", "step_ms"), ("_min", "step_ms_min")):
        checks[f"progressive_step_Emax_over_Emin{suffix}"] = ratio(
            rows, (hi, "progressive"), (lo, "progressive"), key=key
        )
        checks[f"all_over_progressive_step_at_E64{suffix}"] = ratio(rows, (64, "all"), (64, "progressive"), key=key)
        checks[f"independent_over_progressive_step_at_Emax{suffix}"] = ratio(
            rows, (hi, "independent"), (hi, "progressive"), key=key
        )
    checks["targets"] = {"progressive_step_Emax_over_Emin": "<= 1.5", "all_over_progressive_step_at_E64": ">= 4"}
    return checks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--experts", default="8,16,32,64,128")
    p.add_argument("--modes", default="progressive,independent,all")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--in-dim", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--shared-top-k", type=int, default=2, help="K_s")
    p.add_argument("--adaptive-top-k", type=int, default=1, help="K_a")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--backend", default="auto", help="grouped execution backend: auto, grouped_mm, loop")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    x_BD = torch.randn(args.batch, args.in_dim, generator=gen)
    y_BT = (torch.rand(args.batch, args.tasks, generator=gen) < 0.2).float()
    rows = []
    for num_experts in [int(e) for e in args.experts.split(",")]:
        for mode in args.modes.split(","):
            torch.manual_seed(args.seed)
            core, heads = build(args, num_experts=num_experts, mode=mode)
            row = {"E": num_experts, "mode": mode, **time_steps(args, core, heads, x_BD, y_BT)}
            row["flops_ratio_vs_all"] = num_experts / row["mean_U"]
            if mode == "progressive":
                row.update(grouped_vs_ideal(args, core, x_BD))
            rows.append(row)
            print(json.dumps(row), flush=True)
    checks = summarize(rows)
    result = {
        "rows": rows,
        "checks": checks,
        "config": {**vars(args), "torch": torch.__version__, "num_threads": torch.get_num_threads()},
    }
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(checks, indent=2))


if __name__ == "__main__":
    main()
