"""Expert parallelism on 2 gloo processes: ep=1 vs ep=2, all-to-all bytes, DeepSpeed peer.

    python -m benchmarks.expert_parallel --out bench_out/expert_parallel.json \
        [--experts 8 --in-dim 256 --hidden 256 --batch 2048 --steps 50 --warmup 10]

Every mode is its own 2-process gloo run (spawned here), on the same global batch
(`--batch`, split evenly over the ranks, the same seeded data in every mode) and a model
of the same size: `x_BD -> Linear(D, D) + ReLU -> MoE core -> per task Linear(., 1) +
BCE`, plus the core's balance loss (weight 0.01), Adam. Network parameters are
synchronised by DDP (`broadcast_buffers=False`, bucket views, as TorchRec's wrapper);
sharded expert parameters are kept out of DDP. `--threads` torch threads per rank.

- `ep1`: our SMES core (E experts of one `Linear(D, H)` + ReLU, progressive routing,
  T tasks, K_s shared, K_a adaptive per task), every expert on both ranks (pure data
  parallel: expert gradients all-reduced by DDP).
- `ep2`: the same, experts sharded by `parallel.expert.dispatcher.apply_expert_parallel`
  (E/2 per rank), pairs moved by `AllToAllDispatcher`, expert gradients by
  `parallel.expert.grads`.
- `deepspeed`: `deepspeed.moe.layer.MoE(hidden_size=D, expert=Linear(D, H) + ReLU,
  num_experts=E, ep_size=2, k=2)` with a torch optimizer (no DeepSpeed engine). Not the
  same model: one top-2 gate over the instance, no per-task routing, no task-shared
  subset; every instance runs exactly 2 experts while SMES runs |U| (between K_s + K_a
  and K_s + T*K_a; reported as `ep2_mean_active_per_instance`). The output feeds every
  task head. Default `drop_tokens=False` (dropless, like our default), 2nd expert by
  plain argmax (`top2_2nd_expert_sampling=False`), no random token selection;
  `--ds-capacity-factor` switches to DeepSpeed's dropping mode. DeepSpeed's experts
  are deep copies of one module; they are re-initialised per expert here.

All-to-all bytes (ep2). `AllToAllDispatcher.stats` counts what each rank puts on the
wire (rows for the rank itself excluded), summed over ranks and averaged per step. The
minimum implied by the routing plan: let R be the (instance, expert) pairs of all
ranks' deduplicated, capacity-kept plans whose expert lives on another rank (read from
the router's plan, not from the dispatcher). Each such pair must cross the wire four
times: its input row out (D values), its output row back (H), the output gradient out
(H) and the input gradient back (D), so

    a2a_min_bytes_per_step = R * (2 * D + 2 * H) * bytes_per_element   (per MoE layer)

`a2a_bytes_per_step` is the payload (`bytes_sent`) plus the per-step count exchange
(`meta_bytes_sent`: (P-1) * E/P int64 per rank and step); the payload alone is
`a2a_payload_bytes_per_step`. DeepSpeed's volume is derived from its `[E, C, D]` buffer
shapes (four equal-split all-to-alls, (P-1)/P of each buffer leaves the rank, C the
capacity it padded to), not counted on the wire.

Timing: `--warmup` untimed steps, then `--steps` timed steps; a step is forward, loss,
backward, expert-gradient sync, optimizer step. A step's time is the slower rank's;
samples/s = global batch / median step time. `dispatch_combine_share` (ep2): per step
and rank, (dispatch + combine seconds, forward and backward, from
`A2AStats(time_phases=True)`) / step seconds; the median over steps of the rank mean.
Dispatch = count exchange, row gather, all-to-all, sort into expert order; combine =
unsort and the return all-to-all; backward phases are bounded by autograd stamps.
Waiting for the other rank inside an all-to-all counts as dispatch / combine. Absolute
times on a shared 2-core machine are noise; compare the ratios inside one run.

Legend: B instances, D input width, H expert width, E experts, P ranks (= ep),
R remote pairs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from model.smes import SMES, SMESConfig
from parallel.dist import free_port, local_rank_env
from parallel.expert.dispatcher import a2a_stats, apply_expert_parallel
from parallel.expert.grads import build_expert_grad_sync
from parallel.expert.mesh import build_mesh

WORLD = 2
BALANCE_BETA = 0.01
PHASES = ("dispatch_fwd_s", "combine_fwd_s", "dispatch_bwd_s", "combine_bwd_s", "experts_fwd_s", "experts_bwd_s")


def task_names(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(f"task{i}" for i in range(args.tasks))


def heads_loss(heads: nn.ModuleDict, reprs: dict[str, torch.Tensor], y_BT: torch.Tensor) -> torch.Tensor:
    loss = torch.zeros(())
    for j, (t, head) in enumerate(heads.items()):
        loss = loss + nn.functional.binary_cross_entropy_with_logits(head(reprs[t]).squeeze(-1), y_BT[:, j])
    return loss


class SMESNet(nn.Module):
    """Bottom layer, SMES core, per-task heads; `forward -> loss` (last load kept)."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        cfg = SMESConfig(
            num_experts=args.experts,
            shared_top_k=args.shared_top_k,
            adaptive_top_k=args.adaptive_top_k,
            expert_hidden=[args.hidden],
            balance_beta=BALANCE_BETA,
            capacity_factor=args.capacity_factor,
        )
        self.bottom = nn.Linear(args.in_dim, args.in_dim)
        self.core = SMES(cfg, in_dim=args.in_dim, tasks=task_names(args))
        self.heads = nn.ModuleDict({t: nn.Linear(args.hidden, 1) for t in task_names(args)})
        self.last_load: Any = None

    def forward(self, x_BD: torch.Tensor, y_BT: torch.Tensor) -> torch.Tensor:
        out = self.core(torch.relu(self.bottom(x_BD)))
        self.last_load = out.load
        return heads_loss(self.heads, out.task_reprs, y_BT) + sum(out.aux_losses.values(), torch.zeros(()))


class DeepSpeedNet(nn.Module):
    """Bottom layer, DeepSpeed MoE (top-2), per-task heads on its one output."""

    def __init__(self, args: argparse.Namespace, *, rank: int) -> None:
        super().__init__()
        from deepspeed.moe.layer import MoE

        dropless = args.ds_capacity_factor is None
        self.bottom = nn.Linear(args.in_dim, args.in_dim)
        self.moe = MoE(
            hidden_size=args.in_dim,
            expert=nn.Sequential(nn.Linear(args.in_dim, args.hidden), nn.ReLU()),
            num_experts=args.experts,
            ep_size=WORLD,
            k=2,
            capacity_factor=1.0 if dropless else args.ds_capacity_factor,
            drop_tokens=not dropless,
            use_rts=False,
            top2_2nd_expert_sampling=False,
        )
        gen = torch.Generator().manual_seed(args.seed + 1000 * (rank + 1))
        for expert in self.moe.deepspeed_moe.experts.deepspeed_experts:
            for p in expert.parameters():  # distinct experts, nn.Linear's default bounds
                bound = 1.0 / math.sqrt(args.in_dim)
                p.data.uniform_(-bound, bound, generator=gen)
        self.heads = nn.ModuleDict({t: nn.Linear(args.hidden, 1) for t in task_names(args)})
        self.last_counts_E: torch.Tensor | None = None

    def forward(self, x_BD: torch.Tensor, y_BT: torch.Tensor) -> torch.Tensor:
        y_BD, l_aux, counts_E = self.moe(torch.relu(self.bottom(x_BD)))
        self.last_counts_E = counts_E
        reprs = dict.fromkeys(self.heads, y_BD)
        return heads_loss(self.heads, reprs, y_BT) + BALANCE_BETA * l_aux


def local_data(args: argparse.Namespace, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(args.seed)
    x_BD = torch.randn(args.batch, args.in_dim, generator=gen)
    y_BT = (torch.rand(args.batch, args.tasks, generator=gen) < 0.2).float()
    b = args.batch // WORLD
    return x_BD[rank * b : (rank + 1) * b], y_BT[rank * b : (rank + 1) * b]


def wrap(net: nn.Module, ignore: list[str]) -> DistributedDataParallel:
    if ignore:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(net, ignore)
    return DistributedDataParallel(net, broadcast_buffers=False, gradient_as_bucket_view=True)


def run_steps(
    args: argparse.Namespace,
    ddp: DistributedDataParallel,
    data: tuple[torch.Tensor, torch.Tensor],
    *,
    after_backward: Callable[[], None],
    on_step: Callable[[bool], None],
) -> list[float]:
    """Warm-up then timed steps; `on_step(timed)` runs after each step, outside the clock."""
    opt = torch.optim.Adam(ddp.parameters(), lr=1e-3, fused=True)
    times = []
    for i in range(args.warmup + args.steps):
        timed = i >= args.warmup
        if i == args.warmup:
            dist.barrier()
        t0 = time.perf_counter()
        loss = ddp(*data)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        after_backward()
        opt.step()
        elapsed = time.perf_counter() - t0
        if timed:
            times.append(elapsed)
        on_step(timed)
    return times


def smes_worker(rank: int, args: argparse.Namespace, ep: int) -> dict:
    torch.manual_seed(args.seed)
    net = SMESNet(args)
    mesh = build_mesh(ep)
    ignore = apply_expert_parallel(net, mesh)
    grad_sync = build_expert_grad_sync(net, mesh) if ignore else None
    ddp = wrap(net, ignore)
    stats = a2a_stats(net)
    for s in stats:
        s.time_phases = True
    L = args.experts // ep
    remote_pairs = [0]

    def count_remote(_module: nn.Module, _inputs: Any, plan: Any) -> None:
        remote_pairs[0] += int((plan.pair_expert_N // L != mesh.ep_rank).sum())

    net.core.layer.router.register_forward_hook(count_remote)
    rec: dict[str, list] = {"bytes": [], "meta_bytes": [], "remote_pairs": [], "phases": [], "active": []}

    def on_step(timed: bool) -> None:
        if timed:
            load = net.last_load
            rec["active"].append(float(load.active_sum / load.num_instances))
            rec["remote_pairs"].append(remote_pairs[0])
            rec["bytes"].append(sum(s.bytes_sent for s in stats))
            rec["meta_bytes"].append(sum(s.meta_bytes_sent for s in stats))
            rec["phases"].append({k: sum(s.extra.get(k, 0.0) for s in stats) for k in PHASES})
        remote_pairs[0] = 0
        for s in stats:
            s.reset()

    times = run_steps(
        args, ddp, local_data(args, rank), after_backward=grad_sync.finish if grad_sync else lambda: None,
        on_step=on_step,
    )  # fmt: skip
    return {"step_s": times, **rec}


def deepspeed_worker(rank: int, args: argparse.Namespace) -> dict:
    import logging

    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="gloo")  # wraps the existing process group
    torch.manual_seed(args.seed)
    net = DeepSpeedNet(args, rank=rank)
    net.moe.set_deepspeed_parallelism()
    names = [n for n, p in net.named_parameters() if not getattr(p, "allreduce", True)]
    experts = [p for n, p in net.named_parameters() if n in names]
    ddp = wrap(net, names)
    capacity: list[int] = []

    def after_backward() -> None:
        for p in experts:  # ep = world: no expert replica to reduce with; mean-loss scale as ours
            if p.grad is not None:
                p.grad.div_(WORLD)

    def on_step(timed: bool) -> None:
        if timed and net.last_counts_E is not None:
            capacity.append(int(net.last_counts_E.max()))

    times = run_steps(args, ddp, local_data(args, rank), after_backward=after_backward, on_step=on_step)
    return {"step_s": times, "max_expert_count": capacity}


# ---- process management --------------------------------------------------------------


def _entry(rank: int, port: int, out_dir: str, mode: str, args: argparse.Namespace) -> None:
    os.environ.update(local_rank_env(rank, WORLD, port))
    code = 0
    # known per-step deprecation notices (DDP's broadcast_buffers, autograd all_to_all_single)
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*(broadcast_buffers|all_to_all_single).*")
    try:
        torch.set_num_threads(args.threads)
        dist.init_process_group("gloo", rank=rank, world_size=WORLD)
        result = deepspeed_worker(rank, args) if mode == "deepspeed" else smes_worker(rank, args, ep=int(mode[2:]))
        pathlib.Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
        dist.destroy_process_group()
    except BaseException:
        pathlib.Path(out_dir, f"rank{rank}.err").write_text(traceback.format_exc())
        code = 1
    # ranks were seen to abort at interpreter exit (gloo teardown): leave hard
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def spawn(mode: str, args: argparse.Namespace) -> list[dict]:
    """One 2-process gloo run of `mode`; the per-rank results, by rank."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        procs = [ctx.Process(target=_entry, args=(r, port, tmp, mode, args)) for r in range(WORLD)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + args.timeout
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        errors = [pathlib.Path(tmp, f"rank{r}.err") for r in range(WORLD)]
        for r, err in enumerate(errors):
            if err.exists():
                raise RuntimeError(f"{mode}: rank {r} failed:\n{err.read_text()}")
        if any(p.exitcode != 0 for p in procs):
            raise RuntimeError(f"{mode}: exit codes {[p.exitcode for p in procs]} (timeout {args.timeout}s?)")
        return [json.loads(pathlib.Path(tmp, f"rank{r}.json").read_text()) for r in range(WORLD)]


# ---- summaries -----------------------------------------------------------------------


def step_summary(args: argparse.Namespace, ranks: list[dict]) -> dict:
    steps = [max(ts) for ts in zip(*(r["step_s"] for r in ranks), strict=True)]  # the slower rank
    median = statistics.median(steps)
    return {
        "step_ms_median": median * 1e3,
        "step_ms_min": min(steps) * 1e3,
        "step_ms_max": max(steps) * 1e3,
        "samples_per_s": args.batch / median,
        "step_ms_per_step": [round(s * 1e3, 3) for s in steps],
    }


def ep2_traffic(args: argparse.Namespace, ranks: list[dict]) -> dict:
    elem = 4  # fp32 activations and gradients
    per_pair = (2 * args.in_dim + 2 * args.hidden) * elem
    payload = [sum(v) for v in zip(*(r["bytes"] for r in ranks), strict=True)]
    meta = [sum(v) for v in zip(*(r["meta_bytes"] for r in ranks), strict=True)]
    minimum = [sum(v) * per_pair for v in zip(*(r["remote_pairs"] for r in ranks), strict=True)]
    total = [p + m for p, m in zip(payload, meta, strict=True)]
    return {
        "a2a_bytes_per_step": statistics.fmean(total),
        "a2a_payload_bytes_per_step": statistics.fmean(payload),
        "a2a_meta_bytes_per_step": statistics.fmean(meta),
        "a2a_min_bytes_per_step": statistics.fmean(minimum),
        "a2a_bytes_over_min": statistics.fmean(total) / max(statistics.fmean(minimum), 1e-12),
        "a2a_payload_equals_min_every_step": payload == minimum,
        "remote_pairs_per_step": statistics.fmean(minimum) / per_pair,
        "a2a_min_formula": "R * (2*D + 2*H) * 4 bytes; R = pairs (all ranks, dedup + capacity-kept) "
        "whose expert lives on another rank; D out + H back forward, H out + D back backward",
    }


def ep2_phases(ranks: list[dict]) -> dict:
    comm = ("dispatch_fwd_s", "combine_fwd_s", "dispatch_bwd_s", "combine_bwd_s")
    shares, expert_shares = [], []
    for step in range(len(ranks[0]["step_s"])):
        per_rank = [(r["phases"][step], r["step_s"][step]) for r in ranks]
        shares.append(statistics.fmean(sum(ph[k] for k in comm) / t for ph, t in per_rank))
        expert_shares.append(statistics.fmean((ph["experts_fwd_s"] + ph["experts_bwd_s"]) / t for ph, t in per_rank))
    medians = {}
    for k in PHASES:
        rank_means = [statistics.fmean(r["phases"][i][k] for r in ranks) for i in range(len(ranks[0]["step_s"]))]
        medians[f"{k[:-2]}_ms_median"] = statistics.median(rank_means) * 1e3
    return {
        "dispatch_combine_share": statistics.median(shares),
        "experts_share": statistics.median(expert_shares),
        "phase_ms_median_rank_mean": medians,
    }


def deepspeed_traffic(args: argparse.Namespace, ranks: list[dict]) -> dict:
    """Bytes implied by DeepSpeed's [E, C, D] buffers (C = the capacity it padded to)."""
    S = args.batch // WORLD
    if args.ds_capacity_factor is None:  # dropless: C = max expert count over the EP group
        caps = [max(v) for v in zip(*(r["max_expert_count"] for r in ranks), strict=True)]
    else:
        caps = [max(math.ceil(S / args.experts * 2 * args.ds_capacity_factor), 4)] * args.steps
    C = statistics.fmean(caps)
    per_rank = 2 * args.experts * C * (args.in_dim + args.hidden) * 4 * (WORLD - 1) / WORLD
    return {"deepspeed_capacity_mean": C, "deepspeed_a2a_bytes_per_step_derived": per_rank * WORLD}


def environment(args: argparse.Namespace) -> dict:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "machine": platform.machine(),
        "processes": WORLD,
        "threads_per_rank": args.threads,
        "backend": "gloo",
    }
    try:
        import deepspeed

        env["deepspeed"] = deepspeed.__version__
    except ImportError:
        env["deepspeed"] = None
    return env


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--modes", default="ep1,ep2,deepspeed", help="subset of ep1,ep2,deepspeed")
    p.add_argument("--experts", type=int, default=8, help="E")
    p.add_argument("--in-dim", type=int, default=256, help="D (MoE input width)")
    p.add_argument("--hidden", type=int, default=256, help="H (expert width); DeepSpeed needs H == D")
    p.add_argument("--batch", type=int, default=2048, help="global batch, split over the 2 ranks")
    p.add_argument("--tasks", type=int, default=2)
    p.add_argument("--shared-top-k", type=int, default=1, help="K_s")
    p.add_argument("--adaptive-top-k", type=int, default=1, help="K_a")
    p.add_argument("--capacity-factor", type=float, default=None, help="ours (model.capacity_factor); default dropless")
    p.add_argument("--ds-capacity-factor", type=float, default=None, help="DeepSpeed; default dropless")
    p.add_argument("--steps", type=int, default=50, help="timed steps")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per mode")
    args = p.parse_args(argv)
    if args.batch % WORLD or args.experts % WORLD:
        p.error("--batch and --experts must be divisible by 2")
    if "deepspeed" in args.modes and args.hidden != args.in_dim:
        p.error("DeepSpeed's MoE maps D -> D: --hidden must equal --in-dim")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    modes = args.modes.split(",")
    result: dict[str, Any] = {"config": {k: v for k, v in vars(args).items() if k != "out"}}
    result["environment"] = environment(args)
    for mode in modes:
        t0 = time.perf_counter()
        ranks = spawn(mode, args)
        row = {**step_summary(args, ranks), "wall_s": time.perf_counter() - t0}
        if mode == "ep2":
            row.update(ep2_traffic(args, ranks))
            row.update(ep2_phases(ranks))
        if mode.startswith("ep"):
            row["mean_active_per_instance"] = statistics.fmean(a for r in ranks for a in r["active"])
        if mode == "deepspeed":
            row.update(deepspeed_traffic(args, ranks))
        result[mode] = row
        print(json.dumps({mode: {k: v for k, v in row.items() if k != "step_ms_per_step"}}), flush=True)
    flat = {
        "ep1_samples_per_s": result.get("ep1", {}).get("samples_per_s"),
        "ep2_samples_per_s": result.get("ep2", {}).get("samples_per_s"),
        "deepspeed_moe_samples_per_s": result.get("deepspeed", {}).get("samples_per_s"),
    }
    for key in ("a2a_bytes_per_step", "a2a_min_bytes_per_step", "a2a_bytes_over_min", "dispatch_combine_share"):
        flat[key] = result.get("ep2", {}).get(key)
    flat["ep2_mean_active_per_instance"] = result.get("ep2", {}).get("mean_active_per_instance")
    flat["deepspeed_active_per_instance"] = 2
    if flat["ep1_samples_per_s"] and flat["ep2_samples_per_s"]:
        flat["ep2_over_ep1"] = flat["ep2_samples_per_s"] / flat["ep1_samples_per_s"]
    if flat["ep2_samples_per_s"] and flat["deepspeed_moe_samples_per_s"]:
        flat["ours_over_deepspeed"] = flat["ep2_samples_per_s"] / flat["deepspeed_moe_samples_per_s"]
        # expert rows executed per second: SMES runs |U| experts per instance, top-2 runs 2
        flat["ours_over_deepspeed_per_expert_row"] = (
            flat["ours_over_deepspeed"] * flat["ep2_mean_active_per_instance"] / 2
        )
    result = {**flat, **result}
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(flat, indent=2))
    return result


if __name__ == "__main__":
    main()
