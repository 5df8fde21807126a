"""Expert parallelism: experts sharded over ranks, tokens moved by all-to-all.

Mesh (DESIGN section 5). World W, expert-parallel size `ep` (divides W and E):

- data parallel: all W ranks (dense parameters by DDP, balance counts all-reduced);
- expert-parallel groups: consecutive ranks `[g*ep, (g+1)*ep)`; inside one, rank with
  local index j owns experts `[j*E/ep, (j+1)*E/ep)`;
- expert-data-parallel groups: ranks holding the same experts, `{j, j+ep, j+2ep, ...}`
  (size W/ep); expert gradients are all-reduced only there.

Dispatch (`AllToAllDispatcher`, replacing `LocalDispatcher` on every SMES layer): the
routing plan's deduplicated pairs are already expert-contiguous, hence sorted by owner.
Per step: exchange per-expert pair counts (one small all-to-all, as the router's size
reader `plan_sizes`), read the send and receive split sizes on the host in one copy
(the step's one host sync per layer; N, the rows of the plan, is their send sum), send
the pair rows with an uneven `all_to_all_single` (gathered by
`GroupedExperts.input_rows` in the experts' compute dtype and aligned width: bf16 rows
under bf16 autocast, every rank alike, so no copy is left for the receiver but the
reordering gather), reorder the received rows to expert-contiguous order, run the
local experts as one grouped matmul, undo the reordering, send the outputs back with the
reverse all-to-all. Both all-to-alls are the autograd versions
(`torch.distributed.nn.functional.all_to_all_single`), so gradients flow back through
them to the source ranks.

Capacity (`parallel.capacity_factor`, None = dropless): a per-expert limit on each
source rank's *local* batch, decided by that rank's router before dispatch. With N_r
the deduplicated pairs of rank r's batch, rank r sends expert e at most
`ceil(capacity_factor * N_r / E)` pairs (the lowest instance indices win, see
`model.moe.router.apply_capacity`); the owner of e therefore runs at most
`sum_r ceil(capacity_factor * N_r / E)` rows, about `capacity_factor` times an even
share of its EP group's pairs. No collective is involved, so every rank drops exactly
what one process would drop on that rank's batch, for any ep (and ep = 1). Dropped
pairs are counted per rank in `ExpertLoad.dropped_pairs`; the trainer sums them over
all ranks for `experts/dropped_pairs`. Capacity applies in training only: evaluation
is dropless (`model.moe.router`), so padding rows never take capacity.

Traffic accounting (`A2AStats`): `bytes_sent` counts the pair rows this rank puts on
the wire (rows kept on the rank itself are not counted), forward and backward. Summed
over the ranks of an EP group, one step moves exactly `R * (D + H + H + D) * bytes`
per layer, R being the pairs whose expert lives on another rank: x rows out (D),
outputs back (H), output gradients out (H), input gradients back (D; only when
`x_BD` requires grad). The per-step count exchange (`(P-1) * L` int64 leave each
rank) is metadata, counted apart in `meta_bytes_sent`. With `time_phases` on, `extra` accumulates seconds per phase:
`{dispatch,experts,combine}_{fwd,bwd}_s` (dispatch = count exchange, row gather,
all-to-all and sort into expert order; combine = unsort and the return all-to-all).

Gradient scale: every rank's loss is the mean over its local batch and DDP averages
dense gradients over W. An expert's gradient on its owner holds the sum of the
contributions of its expert-parallel group's ranks; the expert-data-parallel
all-reduce sums over the groups, and dividing by W gives the gradient of the global
mean loss, the same as single-process training on the concatenated batch.

Legend: B local batch, D input width, H expert output width, E experts, L = E/ep
local experts, N pairs sent by this rank, M pairs received, P = ep.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from model.moe.dispatch import LocalDispatcher
from model.moe.experts import GroupedExperts
from model.moe.host import host_ints
from model.moe.router import PlanSizes, RoutingPlan
from model.smes import SMESLayer
from parallel import dist as pdist


@dataclass
class ExpertMesh:
    """Process groups of this rank (every rank builds every group, as c10d requires)."""

    world_size: int
    ep: int
    rank: int
    ep_group: dist.ProcessGroup | None
    edp_group: dist.ProcessGroup | None
    dp_group: dist.ProcessGroup | None = None  # None = WORLD
    device_type: str = "cpu"  # of the run's tensors (the DTensor mesh of checkpoints)

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    @property
    def edp_size(self) -> int:
        return self.world_size // self.ep


def check_ep(ep: int, world_size: int, num_experts: int | None) -> None:
    """Start-up check: `ep` must divide the world size and the expert count."""
    if ep < 1:
        raise ValueError(f"parallel.ep must be >= 1, got {ep}")
    if world_size % ep:
        raise ValueError(f"parallel.ep={ep} must divide the world size {world_size}")
    if num_experts is not None and num_experts % ep:
        raise ValueError(f"parallel.ep={ep} must divide model.num_experts={num_experts}")


def check_capacity_factor(
    capacity_factor: float | None, *, model: str | None = None, routing: str | None = None
) -> None:
    """Start-up check of `parallel.capacity_factor` against the model name and routing mode."""
    if capacity_factor is None:
        return
    if not capacity_factor > 0:
        raise ValueError(f"parallel.capacity_factor must be > 0 or null (dropless), got {capacity_factor}")
    if model is not None and model != "smes":
        raise ValueError(f"parallel.capacity_factor needs a sparse MoE core (model=smes), got model={model}")
    if routing == "dense":
        raise ValueError("parallel.capacity_factor has no effect with model.routing=dense; set it to null")


def apply_capacity_factor(model: nn.Module, capacity_factor: float | None) -> None:
    """Set the per-expert capacity (see module doc) on every SMES layer of `model`."""
    check_capacity_factor(capacity_factor)
    layers = smes_layers(model)
    if capacity_factor is not None and not layers:
        raise ValueError("parallel.capacity_factor needs a sparse MoE core (model=smes); the model has no SMES layer")
    for layer in layers:
        check_capacity_factor(capacity_factor, routing=layer.router.routing)
        layer.capacity_factor = capacity_factor


def build_mesh(ep: int, *, device_type: str = "cpu") -> ExpertMesh:
    world, rank = dist.get_world_size(), dist.get_rank()
    check_ep(ep, world, None)
    ep_group = edp_group = None
    for g in range(world // ep):
        ranks = list(range(g * ep, (g + 1) * ep))
        group = pdist.new_group(ranks)
        if rank in ranks:
            ep_group = group
    for j in range(ep):
        ranks = list(range(j, world, ep))
        group = pdist.new_group(ranks)
        if rank in ranks:
            edp_group = group
    return ExpertMesh(
        world_size=world, ep=ep, rank=rank, ep_group=ep_group, edp_group=edp_group, device_type=device_type
    )


@dataclass
class A2AStats:
    """Bytes this rank put on the wire in the dispatcher's all-to-alls (rows kept on the
    rank itself are not counted), forward and backward, since the last `reset`; pair
    rows in `bytes_sent`, the count exchange in `meta_bytes_sent`. `extra` holds phase
    seconds when `time_phases` is on (see the module doc)."""

    bytes_sent: int = 0
    rows_sent: int = 0
    calls: int = 0
    meta_bytes_sent: int = 0
    time_phases: bool = False
    extra: dict[str, float] = field(default_factory=dict)

    def reset(self) -> None:
        self.bytes_sent = self.rows_sent = self.calls = self.meta_bytes_sent = 0
        self.extra.clear()

    def add_time(self, key: str, seconds: float) -> None:
        self.extra[key] = self.extra.get(key, 0.0) + seconds


class _Stamp(torch.autograd.Function):
    """Identity whose backward adds `sign * now` to each named phase timer.

    Placed at phase boundaries: in backward, the phase between two stamps gets
    `+t_end - t_start`. The CPU autograd engine runs ready nodes by descending sequence
    number, so the nodes created between two stamps run back to back in backward.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, stats: A2AStats, marks: tuple[tuple[str, int], ...]) -> torch.Tensor:  # type: ignore[override]
        ctx.stats, ctx.marks = stats, marks
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        now = time.perf_counter()
        for key, sign in ctx.marks:
            ctx.stats.add_time(key, sign * now)
        return grad, None, None


class _CountBytes(torch.autograd.Function):
    """Identity that adds the backward all-to-all's remote bytes to the stats."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, stats: A2AStats, remote_rows: int) -> torch.Tensor:  # type: ignore[override]
        ctx.stats, ctx.remote_rows = stats, remote_rows
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        ctx.stats.bytes_sent += ctx.remote_rows * grad.shape[-1] * grad.element_size()
        return grad, None, None


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
        return _Stamp.apply(x, self.stats, marks) if on else x

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
        # a dense one, pays the exchange and the read here)
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
        return _CountBytes.apply(y, self.stats, remote_out)


def smes_layers(model: nn.Module) -> list[SMESLayer]:
    return [m for m in model.modules() if isinstance(m, SMESLayer)]


def apply_expert_parallel(model: nn.Module, mesh: ExpertMesh) -> list[str]:
    """Shard every SMES layer's experts over the EP group and make its balance counts
    global. Returns the names of the expert parameters (to keep them out of DDP)."""
    layers = smes_layers(model)
    if mesh.ep > 1 and not layers:
        raise ValueError("parallel.ep > 1 needs a sparse MoE core (model=smes)")

    def reduce_counts(counts: torch.Tensor) -> torch.Tensor:
        return pdist.all_reduce(counts, group=mesh.dp_group)  # in place, no grad

    for layer in layers:
        layer.count_reducer = reduce_counts
        if mesh.ep == 1:
            continue
        full = layer.dispatcher.experts
        assert isinstance(layer.dispatcher, LocalDispatcher)
        check_ep(mesh.ep, mesh.world_size, full.num_experts)
        L = full.num_experts // mesh.ep
        lo = mesh.ep_rank * L
        local = GroupedExperts.from_stacked(
            [w.detach()[lo : lo + L] for w in full.weights],
            [b.detach()[lo : lo + L] for b in full.biases],
            backend=full.backend,
        )
        layer.dispatcher = AllToAllDispatcher(local, mesh, full.num_experts)
    if mesh.ep == 1:  # replicated experts: plain DDP parameters
        return []
    return [n for n, _ in model.named_parameters() if ".dispatcher.experts." in n]


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if ".dispatcher.experts." in n]


@torch.no_grad()
def clip_grad_norm_(
    params: list[nn.Parameter], max_norm: float, *, sharded_experts: list[nn.Parameter], mesh: ExpertMesh | None
) -> torch.Tensor:
    """Clip `params`' gradients by the norm of the whole model's dense gradient.

    After the expert-gradient sync (`parallel.expert_grads`), the non-expert gradients are the same on every rank (DDP)
    and each rank holds the gradient of its E/ep expert slice (the same slice as its
    expert-data-parallel peers). The squared norm is then the local non-expert part plus
    the expert part summed over the expert-parallel group, so every rank clips by the
    same coefficient. A per-rank norm (over only the local experts) would clip the
    replicated weights differently on each rank and let them drift apart.

    Returns:
        The total norm (before clipping).
    """
    experts = {id(p) for p in sharded_experts}
    own = [p.grad for p in params if p.grad is not None and id(p) not in experts]
    sliced = [p.grad for p in sharded_experts if p.grad is not None]
    device = params[0].device if params else torch.device("cpu")

    def squared(grads: list[torch.Tensor]) -> torch.Tensor:
        """Sum of squared gradient norms: one norm per tensor in float32 (a fused
        multi-tensor kernel, no copy of any gradient), their squares summed in float64."""
        if not grads:
            return torch.zeros((), device=device, dtype=torch.float64)
        norms = torch._foreach_norm([g.detach() for g in grads], 2, dtype=torch.float32)
        return torch.stack(norms).double().square().sum()

    expert_sq = squared(sliced)
    if mesh is not None and mesh.ep > 1 and mesh.world_size > 1:
        pdist.all_reduce(expert_sq, group=mesh.ep_group)
    total = (squared(own) + expert_sq).sqrt().float()
    torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, total)
    return total


def a2a_stats(model: nn.Module) -> list[A2AStats]:
    return [layer.dispatcher.stats for layer in smes_layers(model) if isinstance(layer.dispatcher, AllToAllDispatcher)]


def checkpoint_view(state: dict, mesh: ExpertMesh | None, _cache: dict = {}) -> dict:  # noqa: B006
    """The state dict with local expert slices wrapped as DTensors (for DCP).

    Each rank holds `[E/ep, ...]` slices of the expert tensors (and of their optimizer
    state). Wrapped over a `(W/ep, ep)` device mesh with placements
    `[Replicate(), Shard(0)]`, DCP sees their global `[E, ...]` shape, so a checkpoint
    written under one (world, ep) loads under any other. The wrappers share storage
    with the live tensors, so loading writes into them in place.
    """
    if mesh is None or mesh.ep == 1:
        return state
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard

    key = (mesh.world_size, mesh.ep, mesh.device_type)
    if key not in _cache:
        _cache[key] = init_device_mesh(
            mesh.device_type, (mesh.world_size // mesh.ep, mesh.ep), mesh_dim_names=("edp", "ep")
        )
    device_mesh = _cache[key]
    placements = [Replicate(), Shard(0)]

    def wrap(name: str, value: object) -> object:
        if isinstance(value, dict):
            return {k: wrap(f"{name}.{k}", v) for k, v in value.items()}
        if isinstance(value, torch.Tensor) and ".dispatcher.experts." in name and value.dim() > 0:
            shape = (value.shape[0] * mesh.ep, *value.shape[1:])
            return DTensor.from_local(
                value, device_mesh, placements, run_check=False, shape=shape, stride=_strides(shape)
            )
        return value

    return {k: wrap(k, v) for k, v in state.items()}


def _strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= n
    return tuple(reversed(out))
