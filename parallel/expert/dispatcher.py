"""Expert parallelism: experts sharded over ranks, pair rows moved by all-to-all.

`apply_expert_parallel(model, mesh)` gives every SMES layer of a plain model its slice
of the experts (the E/ep experts its rank owns in the expert-parallel group, see
`parallel.expert.mesh`) behind an `AllToAllDispatcher`, in place of `LocalDispatcher`, and makes
its balance counts global (all-reduced over the data-parallel ranks). It returns the
names of the sharded expert parameters (`parallel.expert.params`), which `parallelize`
keeps out of DDP; their gradients are reduced by `parallel.expert.grads`.

Dispatch (`AllToAllDispatcher`): the routing plan's deduplicated pairs are already
expert-contiguous, hence sorted by owner. Per step: exchange per-expert pair counts (one
small all-to-all, as the router's size reader `plan_sizes`), read the send and receive
split sizes on the host in one copy (the step's one host sync per layer; N, the rows of
the plan, is their send sum), send the pair rows with an uneven `all_to_all_single`
(gathered by `GroupedExperts.input_rows` in the experts' compute dtype and aligned
width: bf16 rows under bf16 autocast, every rank alike, so no copy is left for the
receiver but the reordering gather), reorder the received rows to expert-contiguous
order, run the local experts as one grouped matmul, undo the reordering, send the
outputs back with the reverse all-to-all. Both all-to-alls are the autograd versions
(`torch.distributed.nn.functional.all_to_all_single`, through `parallel.dist`), so
gradients flow back through them to the source ranks. Every collective takes device
tensors and explicit split sizes, as NCCL requires.

Each dispatcher counts its traffic and, with `time_phases` on, its phase times in an
`A2AStats` (`parallel.expert.stats`); `a2a_stats(model)` collects them. Capacity
(`model.capacity_factor`, see `model.smes`) is decided by each source rank's router before
dispatch; the dispatcher moves whatever pairs the plan holds.

Legend: B local batch, D input width, H expert output width, E experts, L = E/ep
local experts, N pairs sent by this rank, M pairs received, P = ep.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from model.moe.dispatch import LocalDispatcher
from model.moe.experts import GroupedExperts
from model.moe.host import host_ints
from model.moe.router import PlanSizes, RoutingPlan
from parallel import dist as pdist
from parallel.expert.mesh import ExpertMesh, check_ep
from parallel.expert.params import expert_modules, named_expert_parameters, smes_layers
from parallel.expert.stats import A2AStats, count_backward_bytes, stamp


@dataclass(frozen=True, slots=True)
class _Splits:
    """Host split sizes of one step's all-to-all (`plan_sizes`), and the received
    per-(source rank, local expert) counts, still on the device."""

    send: list[int]
    recv: list[int]
    recv_counts_PL: torch.Tensor


class AllToAllDispatcher(nn.Module):
    """`dispatcher(x_BD, plan) -> y_NH` with this rank's L experts and all-to-all moves.

    Args:
        experts: the local experts (`L = E / ep` of them, global ids
            `[ep_rank*L, (ep_rank+1)*L)`).
        mesh: the process groups.
        num_experts: E.
    """

    def __init__(self, experts: GroupedExperts, mesh: ExpertMesh, num_experts: int) -> None:
        super().__init__()
        self.experts = experts
        self.mesh = mesh
        self.num_experts = num_experts
        self.num_local = num_experts // mesh.ep
        self.stats = A2AStats()

    def _stamp(self, x: torch.Tensor, on: bool, *marks: tuple[str, int]) -> torch.Tensor:
        return stamp(x, self.stats, *marks) if on else x

    def plan_sizes(self, counts_E: torch.Tensor) -> PlanSizes:
        """The step's one host read: exchange the per-expert counts, then read this
        rank's send and receive split sizes (and N, their send sum) in one copy.

        The router calls it (as its size reader) before it builds the plan; the splits
        come back to `forward` in `plan.sizes.dispatch`.
        """
        t0 = time.perf_counter()
        P, L = self.mesh.ep, self.num_local
        send_counts_PL = counts_E.view(P, L).to(torch.int64)
        recv_counts_PL = torch.empty_like(send_counts_PL)
        pdist.all_to_all_single(recv_counts_PL, send_counts_PL, group=self.mesh.ep_group)
        self.stats.meta_bytes_sent += (P - 1) * L * send_counts_PL.element_size()
        splits = host_ints(torch.cat([send_counts_PL.sum(1), recv_counts_PL.sum(1)]))  # the one host sync
        sizes = _Splits(send=splits[:P], recv=splits[P:], recv_counts_PL=recv_counts_PL)
        if self.stats.time_phases:
            self.stats.add_time("dispatch_fwd_s", time.perf_counter() - t0)
        return PlanSizes(num_pairs=sum(sizes.send), dispatch=sizes)

    def forward(self, x_BD: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        P, L = self.mesh.ep, self.num_local
        group = self.mesh.ep_group
        me = self.mesh.ep_rank
        # 1. split sizes: read with the plan's N (a plan built without this reader, e.g.
        # an `all` one, pays the exchange and the read here)
        sizes = plan.sizes.dispatch
        if not isinstance(sizes, _Splits):
            sizes = self.plan_sizes(plan.counts_E).dispatch
        t0 = time.perf_counter()
        # phase stamps for backward, only when the whole path is differentiated
        on = self.stats.time_phases and torch.is_grad_enabled() and x_BD.requires_grad
        x_BD = self._stamp(x_BD, on, ("dispatch_bwd_s", 1))
        send_splits, recv_splits = sizes.send, sizes.recv
        # 2. pair rows to their owners (expert-contiguous = owner-contiguous), gathered
        # in the experts' compute dtype and aligned width (bf16 under bf16 autocast: the
        # rows travel in it; the cast and padding happen once, on the B instance rows)
        x_ND = self.experts.input_rows(x_BD, plan.pair_instance_N)
        x_MD = self._exchange(x_ND, recv_splits, send_splits, group, me)
        # 3. received rows are [source][expert]-ordered; make them expert-contiguous
        # (one gather: they already have the layout the kernel reads)
        expert_of_row = (
            torch.arange(L, device=x_BD.device)
            .repeat(P)
            .repeat_interleave(sizes.recv_counts_PL.flatten(), output_size=sum(recv_splits))
        )
        order_M = torch.argsort(expert_of_row, stable=True)
        x_sorted = x_MD.index_select(0, order_M)
        x_sorted = self._stamp(x_sorted, on, ("experts_bwd_s", 1), ("dispatch_bwd_s", -1))
        t1 = time.perf_counter()
        y_sorted = self.experts(x_sorted, sizes.recv_counts_PL.sum(0))
        t2 = time.perf_counter()
        y_sorted = self._stamp(y_sorted, on, ("combine_bwd_s", 1), ("experts_bwd_s", -1))
        y_MH = y_sorted.new_empty(y_sorted.shape).index_copy(0, order_M, y_sorted)
        # 4. outputs back to the source ranks, in plan pair order
        y_NH = self._stamp(self._exchange(y_MH, send_splits, recv_splits, group, me), on, ("combine_bwd_s", -1))
        if self.stats.time_phases:
            t3 = time.perf_counter()
            for key, seconds in (("dispatch_fwd_s", t1 - t0), ("experts_fwd_s", t2 - t1), ("combine_fwd_s", t3 - t2)):
                self.stats.add_time(key, seconds)
        return y_NH

    def _exchange(
        self,
        x: torch.Tensor,
        out_splits: list[int],
        in_splits: list[int],
        group: dist.ProcessGroup | None,
        me: int,
    ) -> torch.Tensor:
        remote_in = sum(in_splits) - in_splits[me]
        remote_out = sum(out_splits) - out_splits[me]
        row_bytes = x.shape[-1] * x.element_size()
        self.stats.bytes_sent += remote_in * row_bytes
        self.stats.rows_sent += remote_in
        self.stats.calls += 1
        out = torch.empty((sum(out_splits), x.shape[-1]), dtype=x.dtype, device=x.device)
        # the backward of this all-to-all sends `remote_out` gradient rows
        y = pdist.all_to_all_single(out, x, out_splits, in_splits, group=group, autograd=True)
        return count_backward_bytes(y, self.stats, remote_out)


def apply_expert_parallel(model: nn.Module, mesh: ExpertMesh) -> list[str]:
    """Shard every SMES layer's experts over the EP group and make its balance counts
    global. Returns the names of the sharded expert parameters (to keep them out of
    DDP; none when ep = 1: replicated experts are plain DDP parameters)."""
    layers = smes_layers(model)
    if mesh.ep > 1 and not layers:
        raise ValueError("parallel.ep > 1 needs a sparse MoE core (model=smes)")

    def reduce_counts(counts: torch.Tensor) -> torch.Tensor:
        return pdist.all_reduce(counts, group=mesh.dp_group)  # in place, no grad

    for layer in layers:
        layer.count_reducer = reduce_counts
        if mesh.ep == 1:
            continue
        assert isinstance(layer.dispatcher, LocalDispatcher)
        full = layer.dispatcher.experts
        check_ep(mesh.ep, mesh.world_size, full.num_experts)
        L = full.num_experts // mesh.ep
        lo = mesh.ep_rank * L
        local = GroupedExperts.from_stacked(
            [w.detach()[lo : lo + L] for w in full.weights],
            [b.detach()[lo : lo + L] for b in full.biases],
            backend=full.backend,
        )
        layer.dispatcher = AllToAllDispatcher(local, mesh, full.num_experts)
        assert expert_modules(layer) == [local], "the sharded experts must be the layer's only expert module"
    if mesh.ep == 1:
        return []
    return [n for n, _ in named_expert_parameters(model)]


def a2a_stats(model: nn.Module) -> list[A2AStats]:
    """The traffic counters of every all-to-all dispatcher in `model`, in layer order."""
    return [layer.dispatcher.stats for layer in smes_layers(model) if isinstance(layer.dispatcher, AllToAllDispatcher)]
