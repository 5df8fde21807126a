"""Routing math for the SMES layer: per-task routers, expert selection and the plan.

The router turns `x_BD` into a frozen `RoutingPlan` that says, per instance, which
experts every task mixes (and with which weights), and which deduplicated
(instance, expert) pairs have to be executed, in expert-contiguous order.

Selection modes (DESIGN section 3):

- `progressive` (SMES): Stage I picks the task-shared subset
  `S = TopK_e(sum_t w_t * p_{t,e}, K_s)` jointly across tasks; Stage II picks for every
  task `A_t = TopK_{e not in S}(p_{t,e}, K_a)`. Task t mixes `S u A_t`; the first K_s
  slots of `experts_BTK` are S (same for all tasks), the last K_a are A_t.
- `independent`: every task its own `TopK(p_t, K_s + K_a)` (the exploded-activation
  baseline: the union can reach `min(E, T * (K_s + K_a))`).
- `dense`: every task mixes all E experts (MMoE-like); the plan holds all B*E pairs.

Mixing weights are the router probabilities renormalised over each task's set. An
optional selection bias `bias_E` (auxiliary-loss-free balancing, DeepSeek-V3) is added
to the scores used for *selection only*; it never enters the mixing weights.

Deduplication: the union `U` over tasks is built by `torch.unique` on the key
`expert * B + instance`, which sorts the pairs expert-major (instance ascending inside
an expert) and gives, for every (instance, task, slot), the index of its pair. This
costs O(B*T*K log), independent of E.

Legend: B instances, D input width, E experts, T tasks, K experts per task
(K_s + K_a, or E for dense), N deduplicated (instance, expert) pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

ROUTING_MODES = ("progressive", "independent", "dense")


@dataclass(frozen=True, slots=True)
class RoutingPlan:
    """Everything downstream of the router needs, for one local batch.

    Attributes:
        logits_BTE: router logits (with grad; z-loss).
        probs_BTE: `softmax(logits)` (with grad; balance loss).
        experts_BTK: long, experts selected per (instance, task); for `progressive` the
            first K_s columns are the shared subset S.
        weights_BTK: mixing weights, probabilities renormalised over the K slots (grad).
        pair_instance_N: long, instance of each deduplicated pair, expert-contiguous.
        pair_expert_N: long, expert of each pair (non-decreasing).
        counts_E: long, pairs per expert (the traffic the grouped matmul sees), after
            any capacity drop; sums to N.
        pair_index_BTK: long, row of the pair output `y_NH` that slot (b, t, k) reads;
            equals N (a zero row appended by the layer) for a dropped pair.
        pair_slot_N: long, position of each pair inside its instance's union U (the
            layer scatters `y_NH` into a padded `[B, num_slots, H]` table with it).
        slot_BTK: long, that position for every selection; `num_slots - 1` (a slot
            no pair fills) for a dropped pair.
        num_slots: max |U| over the batch (+1 when a capacity limit is on).
        num_dropped: long scalar, pairs dropped by the capacity limit (0 = dropless).
        dense: True when the plan holds all B*E pairs in `[E, B]` order, so that
            `y_NH.view(E, B, H)` is valid and the layer mixes with one einsum.
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
    num_slots: int
    num_dropped: torch.Tensor
    dense: bool

    @property
    def num_experts(self) -> int:
        return self.probs_BTE.shape[-1]

    @property
    def num_pairs(self) -> int:
        return self.pair_instance_N.shape[0]


def select_progressive(
    scores_BTE: torch.Tensor, task_weights_T: torch.Tensor, *, num_shared: int, num_adaptive: int
) -> torch.Tensor:
    """SMES two-stage selection. Returns `experts_BTK` with K = K_s + K_a, S first."""
    T = scores_BTE.shape[1]
    parts = []
    if num_shared > 0:
        joint_BE = torch.einsum("t,bte->be", task_weights_T, scores_BTE)
        shared_BS = joint_BE.topk(num_shared, dim=-1).indices
        shared_BTS = shared_BS.unsqueeze(1).expand(-1, T, -1)
        parts.append(shared_BTS)
        # Stage II must pick outside S: mask S out of every task's scores.
        scores_BTE = scores_BTE.scatter(-1, shared_BTS, float("-inf"))
    if num_adaptive > 0:
        parts.append(scores_BTE.topk(num_adaptive, dim=-1).indices)
    return torch.cat(parts, dim=-1)


def select_independent(scores_BTE: torch.Tensor, *, k: int) -> torch.Tensor:
    """Per-task top-k, no sharing across tasks: `experts_BTK`."""
    return scores_BTE.topk(k, dim=-1).indices


def renormalised_weights(probs_BTE: torch.Tensor, experts_BTK: torch.Tensor) -> torch.Tensor:
    """`p_{t,e}` over each task's selected set, renormalised to sum to 1 (with grad)."""
    picked_BTK = probs_BTE.gather(-1, experts_BTK)
    return picked_BTK / picked_BTK.sum(-1, keepdim=True)


def selection_counts(experts_BTK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """`[T, E]` float32: instances whose task t selected expert e (no grad)."""
    T = experts_BTK.shape[1]
    experts_TN = experts_BTK.transpose(0, 1).reshape(T, -1)
    counts_TE = torch.zeros(T, num_experts, dtype=torch.float32, device=experts_BTK.device)
    return counts_TE.scatter_add_(1, experts_TN, torch.ones(experts_TN.shape, device=experts_BTK.device))


def deduplicate(
    experts_BTK: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Union of every instance's task sets as expert-contiguous pairs.

    Returns:
        `(pair_instance_N, pair_expert_N, counts_E, pair_index_BTK)`, see `RoutingPlan`.
    """
    B = experts_BTK.shape[0]
    instance_B11 = torch.arange(B, device=experts_BTK.device).view(B, 1, 1)
    key_BTK = experts_BTK * B + instance_B11
    # sorted=True orders by expert, then instance: the expert-contiguous layout.
    key_N, pair_index = torch.unique(key_BTK.reshape(-1), sorted=True, return_inverse=True)
    pair_expert_N = torch.div(key_N, B, rounding_mode="floor")
    counts_E = torch.bincount(pair_expert_N, minlength=num_experts)
    return key_N - pair_expert_N * B, pair_expert_N, counts_E, pair_index.view_as(experts_BTK)


def instance_slots(pair_instance_N: torch.Tensor, B: int) -> tuple[torch.Tensor, int]:
    """Rank of every pair among its instance's pairs, and the max pairs per instance."""
    N = pair_instance_N.shape[0]
    if N == 0:
        return pair_instance_N.clone(), 0
    order_N = torch.argsort(pair_instance_N, stable=True)
    counts_B = torch.bincount(pair_instance_N, minlength=B)
    start_B = torch.cumsum(counts_B, 0) - counts_B
    slot_N = torch.empty_like(pair_instance_N)
    inst_sorted_N = pair_instance_N[order_N]
    slot_N[order_N] = torch.arange(N, device=pair_instance_N.device) - start_B[inst_sorted_N]
    return slot_N, int(counts_B.max())  # host sync: the padded table's width


def dense_pairs(
    B: int, T: int, num_experts: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """All B*E pairs in `[E, B]` order, built directly (no sort).

    Returns:
        `(experts_BTE, pair_instance_N, pair_expert_N, counts_E, pair_index_BTE)`.
    """
    experts_E = torch.arange(num_experts, device=device)
    experts_BTE = experts_E.expand(B, T, num_experts)
    pair_instance_N = torch.arange(B, device=device).repeat(num_experts)
    pair_expert_N = experts_E.repeat_interleave(B)
    counts_E = torch.full((num_experts,), B, dtype=torch.long, device=device)
    pair_index_BTE = experts_BTE * B + torch.arange(B, device=device).view(B, 1, 1)
    return experts_BTE, pair_instance_N, pair_expert_N, counts_E, pair_index_BTE


def apply_capacity(
    pair_expert_N: torch.Tensor,
    counts_E: torch.Tensor,
    pair_index_BTK: torch.Tensor,
    *,
    capacity_factor: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep at most `ceil(capacity_factor * N / E)` pairs per expert.

    N is the number of deduplicated pairs of the batch this router sees, so the limit
    is per batch and per expert: under expert parallelism it is every source rank's
    own local decision, taken before dispatch (`parallel.capacity_factor`).

    Inside an expert the pairs with the lowest instance index are kept (the order the
    plan already has). Slots of dropped pairs point at row N_kept, which the layer
    fills with zeros, so a task simply loses that expert's contribution (its remaining
    weights are not renormalised, as in Switch).

    Returns:
        `(keep_N, pair_index_BTK, num_dropped)`: the mask of kept pairs, the slot ->
        kept-row index (N_kept for dropped pairs), and the number dropped.
    """
    N, E = pair_expert_N.shape[0], counts_E.shape[0]
    capacity = math.ceil(capacity_factor * N / E)
    start_E = torch.cumsum(counts_E, 0) - counts_E
    rank_N = torch.arange(N, device=counts_E.device) - start_E[pair_expert_N]
    keep_N = rank_N < capacity
    num_kept = keep_N.sum()
    new_index_N = torch.where(keep_N, torch.cumsum(keep_N, 0) - 1, num_kept)
    return keep_N, new_index_N[pair_index_BTK], N - num_kept


class Router(nn.Module):
    """Per-task linear routers (`z_t = x W_t`, no bias) and the selection step.

    Args:
        in_dim: D.
        num_experts: E.
        num_tasks: T.
        num_shared: K_s (Stage I).
        num_adaptive: K_a (Stage II, per task).
        routing: one of `ROUTING_MODES`.
        task_weights: Stage I weights w_t (length T).
        capacity_factor: None for dropless, else see `apply_capacity`.
    """

    def __init__(
        self,
        in_dim: int,
        *,
        num_experts: int,
        num_tasks: int,
        num_shared: int,
        num_adaptive: int,
        routing: str,
        task_weights: list[float],
        capacity_factor: float | None = None,
    ) -> None:
        super().__init__()
        self.num_experts, self.num_tasks = num_experts, num_tasks
        self.num_shared, self.num_adaptive = num_shared, num_adaptive
        self.routing, self.capacity_factor = routing, capacity_factor
        # All T routers as one matmul: weight rows are [task0 experts..., task1 ...].
        self.gate = nn.Linear(in_dim, num_tasks * num_experts, bias=False)
        self.task_weights_T: torch.Tensor
        self.register_buffer("task_weights_T", torch.tensor(task_weights, dtype=torch.float32))

    def gating(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Router logits `[B, T, E]`."""
        return self.gate(x_BD).view(x_BD.shape[0], self.num_tasks, self.num_experts)

    @torch.no_grad()
    def select(self, probs_BTE: torch.Tensor, bias_E: torch.Tensor | None = None) -> torch.Tensor:
        """Selected experts `[B, T, K]` (no grad); `bias_E` shifts selection scores only."""
        scores_BTE = probs_BTE if bias_E is None else probs_BTE + bias_E
        k = self.num_shared + self.num_adaptive
        if self.routing == "progressive":
            w_T = self.task_weights_T.to(scores_BTE.dtype)
            return select_progressive(scores_BTE, w_T, num_shared=self.num_shared, num_adaptive=self.num_adaptive)
        if self.routing == "independent":
            return select_independent(scores_BTE, k=k)
        raise ValueError(f"model.routing={self.routing!r} has no sparse selection")

    def forward(self, x_BD: torch.Tensor, bias_E: torch.Tensor | None = None) -> RoutingPlan:
        logits_BTE = self.gating(x_BD)
        probs_BTE = torch.softmax(logits_BTE, dim=-1)
        B, T, E = probs_BTE.shape
        zero = torch.zeros((), dtype=torch.long, device=x_BD.device)
        if self.routing == "dense":
            experts_BTK, inst_N, exp_N, counts_E, index_BTK = dense_pairs(B, T, E, x_BD.device)
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
                num_slots=E,
                num_dropped=zero,
                dense=True,
            )
        experts_BTK = self.select(probs_BTE, bias_E)
        inst_N, exp_N, counts_E, index_BTK = deduplicate(experts_BTK, E)
        slot_N, num_slots = instance_slots(inst_N, B)
        slot_BTK = slot_N[index_BTK]
        num_dropped = zero
        if self.capacity_factor is not None:
            keep_N, index_BTK, num_dropped = apply_capacity(
                exp_N, counts_E, index_BTK, capacity_factor=self.capacity_factor
            )
            slot_BTK = slot_BTK.masked_fill(index_BTK == int(keep_N.sum()), num_slots)
            num_slots += 1
            inst_N, exp_N, slot_N = inst_N[keep_N], exp_N[keep_N], slot_N[keep_N]
            counts_E = torch.bincount(exp_N, minlength=E)
        return RoutingPlan(
            logits_BTE=logits_BTE,
            probs_BTE=probs_BTE,
            experts_BTK=experts_BTK,
            weights_BTK=renormalised_weights(probs_BTE, experts_BTK),
            pair_instance_N=inst_N,
            pair_expert_N=exp_N,
            counts_E=counts_E,
            pair_index_BTK=index_BTK,
            pair_slot_N=slot_N,
            slot_BTK=slot_BTK,
            num_slots=num_slots,
            num_dropped=num_dropped,
            dense=False,
        )
