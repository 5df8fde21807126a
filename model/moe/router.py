"""Routing math for the SMES layer: per-task routers, expert selection and the plan.

The router turns `x_BD` into a frozen `RoutingPlan` that says, per instance, which
experts every task mixes (and with which weights), and which deduplicated
(instance, expert) pairs have to be executed, in expert-contiguous order.

Selection modes (DESIGN section 3):

- `progressive` (SMES): Stage I picks the task-shared subset
  `S = TopK_e(sum_t w_t * p_{t,e}, K_s)` jointly across tasks (w_t: the selection
  weights, `model.selection_weights`); Stage II picks for every
  task `A_t = TopK_{e not in S}(p_{t,e}, K_a)`. Task t mixes `S u A_t`; the first K_s
  slots of `experts_BTK` are S (same for all tasks), the last K_a are A_t.
- `independent`: every task its own `TopK(p_t, K_s + K_a)` (the exploded-activation
  baseline: the union can reach `min(E, T * (K_s + K_a))`).
- `all`: every task mixes all E experts (MMoE-like); the plan holds all B*E pairs.

Precision: the router's logits, softmax, selection, mixing weights and the z-loss are
float32 whatever the autocast (the gate runs with autocast off, DESIGN section 5): in
bf16 (8 bits of mantissa) near-tied logits round to equal values, more often the
larger E is, and top-k then breaks the ties towards low expert indices.

Mixing weights (`model.mixing`): which executed experts each task reads, and how much.

- `selected` (the paper, DESIGN section 3): task t mixes its own set K_t with a softmax
  over its selected logits, `softmax_{e in K_t} z_{t,e}`. It equals the probabilities
  renormalised over the set, `p_{t,e} / sum_{K_t} p`, but stays finite when the
  selected probabilities underflow (0/0), e.g. for experts that only a large selection
  bias put in the set.
- `union`: task t mixes every expert its instance executes, the union U, with
  `softmax_{e in U} z_{t,e}` (`p_{t,e}` renormalised over U). The selection, the pairs
  and so the expert FLOPs are the same as `selected`; only the per-task mix reads
  |U| table slots instead of K_s + K_a (an O(B*T*W*H) product, small next to the
  experts). At equal activated expert compute each task then mixes as many experts as
  the instance runs (MMoE's tasks mix all of theirs), and every task's router gets a
  gradient through the other tasks' adaptive experts as well.

Either way the plan carries the result as `weights_BTW`, each task's weight on each
slot of the instance's table (0 on slots it does not read), which `model.smes.mix_tasks`
multiplies by.

Selection bias (auxiliary-loss-free balancing, after DeepSeek-V3): an optional
per-expert `bias_E` shifts the scores used for *selection only*; it never enters the
mixing weights. It acts in log space: the selection scores are `log p_{t,e} + b_e`
(Stage I: `b_e + log sum_t w_t p_{t,e}`), the order of `p * exp(b)`. So a bias step changes an
expert's score by the same factor at any E and for any Stage I weights; a bias added
to the probabilities themselves (mean 1/E) would weigh 4x more at E = 64 than at
E = 16 for the same step.

Deduplication with static shapes and one host read. Every selection (b, t, k) is keyed
`expert * B + instance` and the M = B*T*K keys are sorted: the first key of each run is
a pair, and its rank among first keys is the pair's row, expert-major with instances
ascending inside an expert (the order of `torch.unique(sorted=True)`, which the plan
always had). Per-expert counts are a scatter-add over first keys; the slot of a pair
inside its instance's union U is its rank among the instance's distinct experts (a
row-wise sort of the instance's T*K selections). The host needs one value, N, the
number of pairs to execute, to size the pair tensors: the router reads it once per
step through the `read_sizes` callable it is given (the dispatcher's: under expert
parallelism that read also brings the all-to-all split sizes, see `model.moe.host`),
then writes every pair's fields to its row with one index-copy (duplicate keys and
dropped pairs go to a discarded row N). No `unique`, `bincount`, `nonzero` or boolean
indexing (each a host sync on CUDA). Cost: O(M log M) for the sort, independent of E.
`sparse_plan` is the project's one implementation of it: training, evaluation and the
program `trainer.export` traces (through `Router.forward`, with a reader that bounds
the traced N) all build their pairs there; the tests check it against a brute-force
reference.

Table width W (`RoutingPlan.table_width`): the layer mixes through a per-instance
table of the static width `max_union(...)`, the bound on |U|: min(E, K_s + T*K_a) for
`progressive`, min(E, T*(K_s + K_a)) for `independent`, E for `all`, plus one slot (the
one dropped pairs point at) when a capacity limit applies. U itself is always the
union of an instance's executed experts; W is a shape, |U| <= W.

Capacity (`model.capacity_factor`, see `model.moe.pairs.apply_capacity`) applies in
training only. In evaluation (module not in training mode) routing is dropless whatever the factor:
this is the documented policy, so that evaluation outputs of a row do not depend on
the evaluation batch it lands in, and the weight-0 padding rows of the last
evaluation batch can never take capacity from real rows.

Legend: B instances, D input width, E experts, T tasks, K experts per task
(K_s + K_a, or E for `all`), N deduplicated (instance, expert) pairs, W table width.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model.moe.host import host_ints
from model.moe.pairs import all_pairs, apply_capacity, gather_pairs, instance_slots, sort_selections

ROUTING_MODES = ("progressive", "independent", "all")
MIXING_MODES = ("selected", "union")
ROUTER_NORMS = ("none", "layernorm")


@dataclass(frozen=True, slots=True)
class PlanSizes:
    """What the step's one host read returned.

    Attributes:
        num_pairs: N, the pairs this process executes (after any capacity drop).
        dispatch: whatever the dispatcher read in the same copy (the all-to-all split
            sizes under expert parallelism), handed back to it through the plan;
            None for the local dispatcher and for plans built without its reader.
    """

    num_pairs: int
    dispatch: Any = None


SizeReader = Callable[[torch.Tensor], PlanSizes]


def read_local_sizes(counts_E: torch.Tensor) -> PlanSizes:
    """Single-process size reader: N = the sum of the per-expert pair counts."""
    return PlanSizes(num_pairs=host_ints(counts_E.sum())[0])  # the step's one host sync


@dataclass(frozen=True, slots=True)
class RoutingPlan:
    """Everything downstream of the router needs, for one local batch.

    Attributes:
        logits_BTE: router logits (with grad; z-loss).
        probs_BTE: `softmax(logits)` (with grad; balance loss).
        experts_BTK: long, experts selected per (instance, task); for `progressive` the
            first K_s columns are the shared subset S.
        weights_BTK: the softmax of each task's selected logits, the paper's mixing
            weights over K_t (grad). What the layer mixes with is `weights_BTW`.
        pair_instance_N: long, instance of each deduplicated pair, expert-contiguous.
        pair_expert_N: long, expert of each pair (non-decreasing).
        counts_E: long, pairs per expert (the traffic the grouped matmul sees), after
            any capacity drop; sums to N.
        pair_index_BTK: long, row of the pair output `y_NH` that slot (b, t, k) reads;
            equals N (a zero row appended by the layer) for a dropped pair.
        pair_slot_N: long, position of each pair inside its instance's union U (the
            layer scatters `y_NH` into a padded `[B, table_width, H]` table with it).
        slot_BTK: long, that position for every selection; `table_width - 1` (a slot
            no pair fills) for a dropped pair.
        weights_BTW: each task's mixing weight on each table slot (grad): `weights_BTK`
            scattered to `slot_BTK` for `selected` mixing, the softmax over U for
            `union` (module doc); 0 on empty slots. For `all` plans W = E and it is
            `probs_BTE`.
        table_width: W, the static width of the layer's per-instance table: the bound
            on |U| (`max_union`), +1 when a capacity limit applied (module doc).
        num_dropped: long scalar, pairs dropped by the capacity limit (0 = dropless).
        all_experts: True for `all` routing: the plan holds all B*E pairs in `[E, B]`
            order, so that `y_NH.view(E, B, H)` is valid and the layer mixes with one
            einsum.
        sizes: the host read that sized the plan (`sizes.num_pairs == N`).
    """

    logits_BTE: torch.Tensor
    probs_BTE: torch.Tensor
    experts_BTK: torch.Tensor
    weights_BTK: torch.Tensor
    pair_instance_N: torch.Tensor
    pair_expert_N: torch.Tensor
    counts_E: torch.Tensor
    pair_index_BTK: torch.Tensor
    pair_slot_N: torch.Tensor
    slot_BTK: torch.Tensor
    weights_BTW: torch.Tensor
    table_width: int
    num_dropped: torch.Tensor
    all_experts: bool
    sizes: PlanSizes

    @property
    def num_experts(self) -> int:
        return self.probs_BTE.shape[-1]

    @property
    def num_pairs(self) -> int:
        return self.pair_instance_N.shape[0]


def max_union(routing: str, *, num_experts: int, num_tasks: int, shared_top_k: int, adaptive_top_k: int) -> int:
    """Static bound on the distinct experts of one instance, |U| (see the module doc)."""
    if routing == "progressive":
        return min(num_experts, shared_top_k + num_tasks * adaptive_top_k)
    if routing == "independent":
        return min(num_experts, num_tasks * (shared_top_k + adaptive_top_k))
    return num_experts


def select_progressive(
    scores_BTE: torch.Tensor,
    selection_weights_T: torch.Tensor,
    *,
    shared_top_k: int,
    adaptive_top_k: int,
    log_space: bool = False,
) -> torch.Tensor:
    """SMES two-stage selection. Returns `experts_BTK` with K = K_s + K_a, S first.

    `scores_BTE` are probabilities, or with `log_space` log-probabilities (plus a
    selection bias): Stage I then ranks `log sum_t w_t exp(score)`, the same order as
    `sum_t w_t p` without its underflow.
    """
    T = scores_BTE.shape[1]
    parts = []
    if shared_top_k > 0:
        if log_space:
            log_w_T = selection_weights_T.log().view(1, T, 1)
            joint_BE = torch.logsumexp(scores_BTE + log_w_T, dim=1)
        else:
            joint_BE = torch.einsum("t,bte->be", selection_weights_T, scores_BTE)
        shared_BS = joint_BE.topk(shared_top_k, dim=-1).indices
        shared_BTS = shared_BS.unsqueeze(1).expand(-1, T, -1)
        parts.append(shared_BTS)
        # Stage II must pick outside S: mask S out of every task's scores.
        scores_BTE = scores_BTE.scatter(-1, shared_BTS, float("-inf"))
    if adaptive_top_k > 0:
        parts.append(scores_BTE.topk(adaptive_top_k, dim=-1).indices)
    return torch.cat(parts, dim=-1)


def select_independent(scores_BTE: torch.Tensor, *, k: int) -> torch.Tensor:
    """Per-task top-k, no sharing across tasks: `experts_BTK`."""
    return scores_BTE.topk(k, dim=-1).indices


def renormalised_weights(experts_BTK: torch.Tensor, *, logits_BTE: torch.Tensor) -> torch.Tensor:
    """Each task's mixing weights over its selected set: `softmax` of the selected logits.

    Equal to `p_{t,e} / sum_{e' in K_t} p_{t,e'}` with `p = softmax(logits)`, without
    the 0/0 when the selected probabilities underflow (with grad).
    """
    return torch.softmax(logits_BTE.gather(-1, experts_BTK), dim=-1)


def union_weights(
    experts_BTK: torch.Tensor, slot_BTK: torch.Tensor, *, logits_BTE: torch.Tensor, table_width: int
) -> torch.Tensor:
    """`union` mixing: every task's `softmax_{e in U} z_{t,e}` over its instance's
    executed experts, laid out on the table's slots `[B, T, W]` (0 on empty slots).

    U is read from the selections (each selection writes its expert at its slot), so no
    sort and no host read; every instance has at least one selection, hence a finite
    softmax.
    """
    B, T, K = experts_BTK.shape
    union_BW = experts_BTK.new_full((B, table_width), -1)
    # duplicate slots write the same expert, so the result does not depend on the order
    union_BW.scatter_(1, slot_BTK.reshape(B, T * K), experts_BTK.reshape(B, T * K))
    logits_BTW = logits_BTE.gather(-1, union_BW.clamp(min=0).unsqueeze(1).expand(B, T, table_width))
    return torch.softmax(logits_BTW.masked_fill((union_BW < 0).unsqueeze(1), float("-inf")), dim=-1)


def selection_counts(experts_BTK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """`[T, E]` float32: instances whose task t selected expert e (no grad)."""
    T = experts_BTK.shape[1]
    experts_TN = experts_BTK.transpose(0, 1).reshape(T, -1)
    counts_TE = torch.zeros(T, num_experts, dtype=torch.float32, device=experts_BTK.device)
    return counts_TE.scatter_add_(1, experts_TN, torch.ones(experts_TN.shape, device=experts_BTK.device))


def union_experts(plan: RoutingPlan) -> torch.Tensor:
    """`[B, W]` long (W = `plan.table_width`): every instance's executed experts U,
    ascending, padded with -1.

    Built from the plan's pairs (what the dispatcher ran, so pairs dropped by a capacity
    limit are absent): each pair writes its expert at its instance's slot. Slots rank an
    instance's distinct experts, so row b holds its |U_b| experts in increasing order in
    its first |U_b| columns. `all` plans give every expert to every row. No grad, no
    host read: one O(N) scatter on the plan's device.
    """
    B, W = plan.probs_BTE.shape[0], plan.table_width
    with torch.no_grad():
        table_BW = torch.full((B * W,), -1, dtype=torch.long, device=plan.pair_expert_N.device)
        rows_N = plan.pair_instance_N * W + plan.pair_slot_N
        return table_BW.index_copy_(0, rows_N, plan.pair_expert_N).view(B, W)


def sparse_plan(
    logits_BTE: torch.Tensor,
    probs_BTE: torch.Tensor,
    experts_BTK: torch.Tensor,
    *,
    table_width: int,
    read_sizes: SizeReader,
    capacity_factor: float | None = None,
    mixing: str = "selected",
) -> RoutingPlan:
    """The plan of a sparse selection: deduplicated expert-contiguous pairs, the slots of
    every instance's union, the capacity limit and the mixing weights (module doc).

    The one implementation of the SMES deduplication and pair order, for training,
    evaluation and the exported program alike (`trainer.export` traces it through
    `Router.forward`): static shapes and no host read except `read_sizes(counts_E)`,
    which sizes the pair tensors (N, the one data-dependent size: under `torch.export`
    an unbacked SymInt, which the exporting reader bounds).

    Args:
        logits_BTE: router logits; `probs_BTE` their softmax.
        experts_BTK: the selection (`Router.select`).
        table_width: W before any capacity slot, the static bound on |U| (`max_union`).
        read_sizes: the step's one host read, `counts_E -> PlanSizes`.
        capacity_factor: None for dropless, else see `apply_capacity`.
        mixing: `selected` or `union` (module doc).
    """
    B, T, E = probs_BTE.shape
    sel = sort_selections(experts_BTK, E)
    slot_BTK = instance_slots(experts_BTK)
    if capacity_factor is None:
        row_M, counts_E, num_dropped = sel.pair_M, sel.counts_E, sel.counts_E.new_zeros(())
    else:
        row_M, counts_E, _, num_dropped = apply_capacity(sel, capacity_factor=capacity_factor)
    sizes = read_sizes(counts_E)  # the step's one host sync
    N = sizes.num_pairs
    slot_M = slot_BTK.reshape(-1).index_select(0, sel.order_M)
    inst_N, exp_N, slot_N = gather_pairs(sel, row_M, [sel.instance_M, sel.expert_M, slot_M], N)
    index_BTK = torch.empty_like(row_M).scatter_(0, sel.order_M, row_M).view(B, T, -1)
    weights_BTK = renormalised_weights(experts_BTK, logits_BTE=logits_BTE)
    if mixing == "union":
        # a dropped pair's slot stays in U: no pair fills it, so the task loses that
        # expert's share without renormalising, as with `selected` (`apply_capacity`)
        weights_BTW = union_weights(experts_BTK, slot_BTK, logits_BTE=logits_BTE, table_width=table_width)
    if capacity_factor is not None:
        slot_BTK = slot_BTK.masked_fill(index_BTK == N, table_width)
        table_width += 1
    if mixing == "union":
        weights_BTW = F.pad(weights_BTW, (0, table_width - weights_BTW.shape[-1]))
    else:
        weights_BTW = weights_BTK.new_zeros(B, T, table_width).scatter(-1, slot_BTK, weights_BTK)
    return RoutingPlan(
        logits_BTE=logits_BTE,
        probs_BTE=probs_BTE,
        experts_BTK=experts_BTK,
        weights_BTK=weights_BTK,
        pair_instance_N=inst_N,
        pair_expert_N=exp_N,
        counts_E=counts_E,
        pair_index_BTK=index_BTK,
        pair_slot_N=slot_N,
        slot_BTK=slot_BTK,
        weights_BTW=weights_BTW,
        table_width=table_width,
        num_dropped=num_dropped,
        all_experts=False,
        sizes=sizes,
    )


def float32_routing(device: torch.device) -> Any:
    """Autocast off on `device` (when it is on): the router's math stays float32."""
    on = device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type)
    return torch.autocast(device.type, enabled=False) if on else nullcontext()


class Router(nn.Module):
    """Per-task linear routers (`z_t = x W_t`, without bias by default) and the selection step.

    Args:
        in_dim: D.
        num_experts: E.
        num_tasks: T.
        shared_top_k: K_s, the Stage I shared slots per instance.
        adaptive_top_k: K_a, the Stage II adaptive slots per task.
        routing: one of `ROUTING_MODES`.
        selection_weights: Stage I weights w_t (length T). Kept in the buffer
            `task_weights_T`, whose name is the checkpoints' state-dict key.
        capacity_factor: None for dropless, else see `apply_capacity`; applies in
            training mode only (evaluation is dropless, see the module doc).
        input_norm: a LayerNorm over D (learned scale and shift, float32) before the
            gate: the routers then read every part of the input at one scale.
        bias: a learned per-(task, expert) bias on the logits (`z_t = x W_t + b_t`),
            as MMoE's gates have; an MMoE run converts into SMES exactly with it
            (`model.moe.upcycle`).
        mixing: `selected` (each task mixes its own K_s + K_a experts) or `union`
            (each task mixes every executed expert of its instance), see the module doc.
            `all` routing mixes all E either way.
    """

    def __init__(
        self,
        in_dim: int,
        *,
        num_experts: int,
        num_tasks: int,
        shared_top_k: int,
        adaptive_top_k: int,
        routing: str,
        selection_weights: list[float],
        capacity_factor: float | None = None,
        input_norm: bool = False,
        bias: bool = False,
        mixing: str = "selected",
    ) -> None:
        super().__init__()
        if mixing not in MIXING_MODES:
            raise ValueError(f"model.mixing must be one of {MIXING_MODES}, got {mixing!r}")
        self.mixing = mixing
        self.num_experts, self.num_tasks = num_experts, num_tasks
        self.shared_top_k, self.adaptive_top_k = shared_top_k, adaptive_top_k
        self.routing, self.capacity_factor = routing, capacity_factor
        # All T routers as one matmul: weight rows are [task0 experts..., task1 ...].
        self.gate = nn.Linear(in_dim, num_tasks * num_experts, bias=bias)
        self.norm = nn.LayerNorm(in_dim) if input_norm else None
        # the Stage I selection weights; the buffer keeps its older name, a state-dict key
        self.task_weights_T: torch.Tensor
        self.register_buffer("task_weights_T", torch.tensor(selection_weights, dtype=torch.float32))

    def gating(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Router logits `[B, T, E]`, in float32 whatever the autocast (see the module doc)."""
        with float32_routing(x_BD.device):
            x = x_BD.float()
            if self.norm is not None:
                x = F.layer_norm(x, self.norm.normalized_shape, self.norm.weight.float(), self.norm.bias.float())
            bias = None if self.gate.bias is None else self.gate.bias.float()
            logits = F.linear(x, self.gate.weight.float(), bias)
        return logits.view(x_BD.shape[0], self.num_tasks, self.num_experts)

    @torch.no_grad()
    def select(
        self, probs_BTE: torch.Tensor, bias_E: torch.Tensor | None = None, *, logits_BTE: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Selected experts `[B, T, K]` (no grad).

        `bias_E` shifts the selection scores only, in log space: the experts are ranked by
        `log p + bias` (`log_softmax(logits_BTE)` when the logits are given, which stays
        finite where `p` underflows), the same order as `p * exp(bias)` (module doc).
        """
        k = self.shared_top_k + self.adaptive_top_k
        log_space = bias_E is not None
        if bias_E is None:
            scores_BTE = probs_BTE
        else:
            log_p_BTE = probs_BTE.log() if logits_BTE is None else torch.log_softmax(logits_BTE, dim=-1)
            scores_BTE = log_p_BTE + bias_E.to(log_p_BTE.dtype)
        if self.routing == "progressive":
            w_T = self.task_weights_T.to(scores_BTE.dtype)
            return select_progressive(
                scores_BTE, w_T, shared_top_k=self.shared_top_k, adaptive_top_k=self.adaptive_top_k, log_space=log_space
            )
        if self.routing == "independent":
            return select_independent(scores_BTE, k=k)
        raise ValueError(f"model.routing={self.routing!r} has no sparse selection")

    @property
    def max_union(self) -> int:
        """Static bound on |U|: the width W of the layer's per-instance table (before any
        capacity slot)."""
        return max_union(
            self.routing,
            num_experts=self.num_experts,
            num_tasks=self.num_tasks,
            shared_top_k=self.shared_top_k,
            adaptive_top_k=self.adaptive_top_k,
        )

    def forward(
        self, x_BD: torch.Tensor, bias_E: torch.Tensor | None = None, *, read_sizes: SizeReader | None = None
    ) -> RoutingPlan:
        """The routing plan of `x_BD`.

        Args:
            x_BD: router input.
            bias_E: selection-only bias (None = none).
            read_sizes: the step's one host read, `counts_E -> PlanSizes` (the
                dispatcher's `plan_sizes`; default `read_local_sizes`). Not called
                for `all` plans, whose N = B*E is known.

        The capacity factor applies in training mode only; evaluation is dropless.
        Everything here runs in float32 with autocast off (module doc).
        """
        with float32_routing(x_BD.device):
            return self._plan(x_BD, bias_E, read_sizes)

    def _plan(self, x_BD: torch.Tensor, bias_E: torch.Tensor | None, read_sizes: SizeReader | None) -> RoutingPlan:
        logits_BTE = self.gating(x_BD)
        probs_BTE = torch.softmax(logits_BTE, dim=-1)
        if self.routing == "all":
            return self._all_experts_plan(logits_BTE, probs_BTE)
        return sparse_plan(
            logits_BTE,
            probs_BTE,
            self.select(probs_BTE, bias_E, logits_BTE=logits_BTE),
            table_width=self.max_union,
            read_sizes=read_sizes or read_local_sizes,
            capacity_factor=self.capacity_factor if self.training else None,
            mixing=self.mixing,
        )

    def _all_experts_plan(self, logits_BTE: torch.Tensor, probs_BTE: torch.Tensor) -> RoutingPlan:
        B, T, E = probs_BTE.shape
        experts_BTK, inst_N, exp_N, counts_E, index_BTK = all_pairs(B, T, E, probs_BTE.device)
        return RoutingPlan(
            logits_BTE=logits_BTE,
            probs_BTE=probs_BTE,
            experts_BTK=experts_BTK,
            weights_BTK=probs_BTE,
            pair_instance_N=inst_N,
            pair_expert_N=exp_N,
            counts_E=counts_E,
            pair_index_BTK=index_BTK,
            pair_slot_N=exp_N,
            slot_BTK=experts_BTK,
            weights_BTW=probs_BTE,
            table_width=E,
            num_dropped=torch.zeros((), dtype=torch.long, device=probs_BTE.device),
            all_experts=True,
            sizes=PlanSizes(num_pairs=B * E),
        )
