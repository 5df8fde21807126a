"""Expert parallelism on the simulated GPU over the NCCL-like group, 2 and 4 ranks.

Every collective is checked as NCCL needs it (device tensors, one dtype on every rank,
agreeing split sizes), every host read goes through `model.moe.host`. Per config, in
fp32 and under bf16 autocast, dropless and with a capacity factor, with every rank
routed to or with the experts of one rank starved (it receives no rows and returns an
empty output, in the same dtype as its peers):

- training: outputs, loss and gradients (experts after the expert-gradient sync, the
  router after a DDP-like mean) equal one CPU process on the global batch; the
  global-norm gradient clipping runs; the collectives of a forward are the count
  exchange, the row and output all-to-alls and the balance counts' all-reduce, and
  the rows travel in the compute dtype (bf16 under bf16 autocast);
- evaluation: the same outputs, and no all-reduce (no balance loss).

Legend: B global batch, D input width, E experts, T tasks.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from model.moe.router import selection_counts
from model.smes import SMESConfig, SMESLayer
from parallel import dist as pdist
from parallel.clip import clip_grad_norm_
from parallel.expert.dispatcher import apply_expert_parallel
from parallel.expert.grads import build_expert_grad_sync
from parallel.expert.mesh import build_mesh
from parallel.expert.params import expert_parameter_names, expert_parameters
from tests._dist import run_ranks
from tests.cuda_sim.sim import SIM_BACKEND, collective_log, plain, sim_module, simulate_cuda, to_sim

pytestmark = pytest.mark.cuda_sim

B, D, E, T = 32, 19, 8, 3
CONFIGS = [
    (precision, capacity, starve)
    for precision in ("fp32", "bf16")
    for capacity in (None, 1.0)
    for starve in (False, True)
]


class Core(nn.Module):
    def __init__(self, capacity: float | None) -> None:
        super().__init__()
        torch.manual_seed(0)
        cfg = SMESConfig(
            num_experts=E, expert_hidden=[12, 8], z_loss_coef=1e-3, bias_balance=True, capacity_factor=capacity
        )
        self.layer = SMESLayer(cfg, in_dim=D, num_tasks=T)

    def forward(self, x_BD: torch.Tensor):
        return self.layer(x_BD)


def build(starve: bool, capacity: float | None) -> Core:
    core = Core(capacity)
    if starve:  # column 0 of x is 1: experts E/2.. (the last rank's under ep = 2 or 4) never win
        with torch.no_grad():
            core.layer.router.gate.weight.view(T, E, D)[:, E // 2 :, 0] = -50.0
    return core


def data() -> torch.Tensor:
    torch.manual_seed(1)
    x_BD = torch.randn(B, D)
    x_BD[:, 0] = 1.0
    return x_BD


def run(core: Core, x_BD: torch.Tensor, precision: str, device: str, log: list | None = None) -> dict:
    """Forward (its collectives recorded into `log` under the simulation), then in
    training the loss and backward."""
    with torch.autocast(device, dtype=torch.bfloat16) if precision == "bf16" else warnings.catch_warnings():
        with collective_log() if log is not None else warnings.catch_warnings() as records:
            out_BTH, aux, _ = core(x_BD)
        if log is not None:
            log += records
    res: dict = {"out": out_BTH, "dtype": out_BTH.dtype}
    if core.training:
        loss = out_BTH.float().square().mean() + sum(aux.values())
        loss.backward()
        res["loss"] = loss.detach()
    return res


def reference(precision: str, capacity: float | None, starve: bool, world: int) -> dict:
    """One CPU process. Capacity is a decision of each source rank on its own batch, so
    every rank's slice is run apart, with the balance counts of the whole batch (what
    the ranks all-reduce), and the gradients averaged over the slices."""
    core = build(starve, capacity)
    x_BD = data()
    b = B // world
    slices = [x_BD[r * b : (r + 1) * b].clone() for r in range(world)]
    with torch.no_grad():
        counts_E = sum(selection_counts(core.layer.router(x).experts_BTK, E).sum(0) for x in slices)
    outs, losses = [], []
    for x in slices:
        part = copy.deepcopy(core)
        part.layer.count_reducer = lambda _local, counts_E=counts_E: counts_E.clone()
        res = run(part, x, precision, "cpu")
        outs.append(res["out"].detach().float())
        losses.append(res["loss"])
        for p, q in zip(core.parameters(), part.parameters(), strict=True):
            if q.grad is not None:
                p.grad = q.grad / world if p.grad is None else p.grad + q.grad / world
    core.eval()
    with torch.no_grad():
        eval_out = run(core, x_BD, precision, "cpu")["out"].float()
    return {
        "out": torch.cat(outs),
        "loss": torch.stack(losses).mean(),
        "grads": {n: p.grad for n, p in core.named_parameters() if p.grad is not None},
        "eval": eval_out,
    }


def _worker(rank: int, world: int, ep: int) -> list[dict]:
    results = []
    mesh = build_mesh(ep, device_type="cuda")
    x_all = data()
    b = B // world
    for precision, capacity, starve in CONFIGS:
        core = build(starve, capacity)
        apply_expert_parallel(core, mesh)  # on the host, as parallelize does before moving to the device
        with simulate_cuda(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sim_module(core)
            sync = build_expert_grad_sync(core, mesh)
            if sync is not None:
                sync.prepare()
            x_BD = to_sim(x_all[rank * b : (rank + 1) * b].clone())
            forward_log: list = []
            res = run(core, x_BD, precision, "cuda", forward_log)
            if sync is not None:
                sync.finish()
            experts = expert_parameters(core) if ep > 1 else []  # sharded: out of DDP
            replicated = [p for p in core.parameters() if all(p is not q for q in experts)]
            for p in replicated:  # what DDP does for the replicated parameters
                pdist.all_reduce_mean(p.grad)
            grads = {n: plain(p.grad).clone() for n, p in core.named_parameters() if p.grad is not None}
            norm = clip_grad_norm_(list(core.parameters()), 1e-3, sharded_experts=experts, mesh=mesh)
            loss = pdist.all_reduce_mean(res["loss"].clone())
            core.eval()
            eval_log: list = []
            with torch.no_grad():
                eval_out = run(core, to_sim(x_all[rank * b : (rank + 1) * b].clone()), precision, "cuda", eval_log)[
                    "out"
                ]
            results.append(
                {
                    "out": plain(res["out"]).float(),
                    "dtype": res["dtype"],
                    "loss": plain(loss),
                    "grads": grads,
                    "norm": plain(norm),
                    "eval": plain(eval_out).float(),
                    "forward_log": [(r.op, r.dtype) for r in forward_log],
                    "eval_log": [(r.op, r.dtype) for r in eval_log],
                    "received": received(core),
                }
            )
    return results


def received(core: Core) -> int:
    """How many of this rank's experts got a non-zero gradient (received rows)."""
    grad = core.layer.experts.weights[0].grad
    return 0 if grad is None else int((plain(grad).abs().sum((1, 2)) > 0).sum())


def local_slice(ep: int, rank: int) -> slice:
    """The experts a rank holds under `ep`."""
    L = E // ep
    return slice((rank % ep) * L, (rank % ep + 1) * L)


@pytest.mark.parametrize(("world", "ep"), [(2, 1), (2, 2), (4, 2), (4, 4)])
def test_expert_parallel_on_the_simulated_gpu(world: int, ep: int) -> None:
    ranks = run_ranks(_worker, world, ep, backend=SIM_BACKEND)
    experts = expert_parameter_names(Core(None))
    for i, (precision, capacity, starve) in enumerate(CONFIGS):
        ref = reference(precision, capacity, starve, world)
        tol = 3e-2 if precision == "bf16" else 1e-5
        rows = [r[i] for r in ranks]
        want = torch.bfloat16 if precision == "bf16" else torch.float32
        assert all(r["dtype"] == want for r in rows)
        torch.testing.assert_close(torch.cat([r["out"] for r in rows]), ref["out"], rtol=tol, atol=tol)
        torch.testing.assert_close(rows[0]["loss"], ref["loss"], rtol=tol, atol=tol)
        torch.testing.assert_close(torch.cat([r["eval"] for r in rows]), ref["eval"], rtol=tol, atol=tol)
        for rank, r in enumerate(rows):
            for name, g in r["grads"].items():
                want_g = ref["grads"][name]
                if name in experts and ep > 1:
                    want_g = want_g[local_slice(ep, rank)]
                torch.testing.assert_close(g, want_g, rtol=tol, atol=tol, msg=f"{precision} {capacity} {name}")
            ops = [op for op, _ in r["forward_log"]]
            evals = [op for op, _ in r["eval_log"]]
            assert "allreduce_" in ops and "allreduce_" not in evals  # balance counts: training only
            if ep > 1:
                assert ops.count("alltoall_base_") == 3 and evals.count("alltoall_base_") == 3
                rows_dtype = [dt for op, dt in r["forward_log"] if op == "alltoall_base_"][1]
                assert rows_dtype == ("bfloat16" if precision == "bf16" else "float32")
            else:
                assert evals == []
        if starve and ep > 1:  # the starved rank received no rows, the others did
            assert rows[ep - 1]["received"] == 0 and rows[0]["received"] > 0
