"""Deduplication of the router's selections into expert-contiguous (instance, expert)
pairs, with static shapes and no host read, and the per-expert capacity limit.

`model.moe.router.sparse_plan` builds every plan from these pieces (see that module's
doc, "Deduplication with static shapes" and "Capacity"): the M = B*T*K selections are
keyed `expert * B + instance` and sorted, the first key of each run is a pair, and each
selection's slot in its instance's union comes from a row-wise sort.

Legend: B instances, T tasks, K experts per task, E experts, M = B*T*K selections,
N deduplicated pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class SortedSelections:
    """Every selection `(b, t, k)` keyed `expert * B + instance`, sorted (static shapes).

    Attributes:
        order_M: position in `experts_BTK.flatten()` of each sorted key.
        instance_M: long, instance of each sorted key.
        expert_M: long, expert of each sorted key (non-decreasing).
        first_M: bool, the first key of its (instance, expert) pair.
        pair_M: long, the pair's row among all deduplicated pairs (expert-major).
        counts_E: long, deduplicated pairs per expert.
    """

    order_M: torch.Tensor
    instance_M: torch.Tensor
    expert_M: torch.Tensor
    first_M: torch.Tensor
    pair_M: torch.Tensor
    counts_E: torch.Tensor


def sort_selections(experts_BTK: torch.Tensor, num_experts: int) -> SortedSelections:
    """Deduplicate the selections into expert-contiguous pairs, no host sync (module doc)."""
    B = experts_BTK.shape[0]
    instance_B11 = torch.arange(B, device=experts_BTK.device).view(B, 1, 1)
    key_M, order_M = (experts_BTK * B + instance_B11).reshape(-1).sort(stable=True)
    expert_M = torch.div(key_M, B, rounding_mode="floor")
    first_M = torch.ones_like(key_M, dtype=torch.bool)
    first_M[1:] = key_M[1:] != key_M[:-1]
    counts_E = torch.zeros(num_experts, dtype=torch.long, device=key_M.device)
    counts_E.scatter_add_(0, expert_M, first_M.long())
    return SortedSelections(
        order_M=order_M,
        instance_M=key_M - expert_M * B,
        expert_M=expert_M,
        first_M=first_M,
        pair_M=torch.cumsum(first_M, 0) - 1,
        counts_E=counts_E,
    )


def instance_slots(experts_BTK: torch.Tensor) -> torch.Tensor:
    """`slot_BTK`: rank of each selected expert among its instance's distinct experts."""
    B, T, K = experts_BTK.shape
    sorted_BJ, order_BJ = experts_BTK.reshape(B, T * K).sort(dim=1, stable=True)
    new_BJ = torch.ones_like(sorted_BJ, dtype=torch.bool)
    new_BJ[:, 1:] = sorted_BJ[:, 1:] != sorted_BJ[:, :-1]
    rank_BJ = torch.cumsum(new_BJ, 1) - 1
    return torch.empty_like(rank_BJ).scatter_(1, order_BJ, rank_BJ).view(B, T, K)


def gather_pairs(
    sel: SortedSelections, row_M: torch.Tensor, fields: list[torch.Tensor], num_pairs: int
) -> list[torch.Tensor]:
    """Per-pair copies `[N]` of per-key `fields` (`[M]`, sorted order), written to `row_M`.

    Only the first key of a pair with a row below N writes; the others (duplicates,
    dropped pairs) go to a discarded row N, so no compaction (host sync) is needed.
    """
    dest_M = torch.where(sel.first_M, row_M, num_pairs)
    fields_FM = torch.stack(fields)
    out_FN = fields_FM.new_empty(len(fields), num_pairs + 1).index_copy_(1, dest_M, fields_FM)
    return list(out_FN[:, :num_pairs].unbind(0))


def all_pairs(
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
    sel: SortedSelections, *, capacity_factor: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep at most `ceil(capacity_factor * N / E)` pairs per expert (training only).

    N is the number of deduplicated pairs of the batch this router sees, so the limit
    is per batch and per expert: under expert parallelism it is every source rank's
    own local decision, taken before dispatch (`model.capacity_factor`, see `Router`). The
    limit is computed on the device in float64, the same value as Python's `math.ceil`.

    Inside an expert the pairs with the lowest instance index are kept (the order the
    plan already has). Slots of dropped pairs point at row N_kept, which the layer
    fills with zeros, so a task simply loses that expert's contribution (its remaining
    weights are not renormalised, as in Switch).

    Returns:
        `(row_M, counts_E, num_kept, num_dropped)`: the kept row of every sorted key
        (N_kept for a dropped pair), the kept pairs per expert, and the 0-dim counts.
    """
    counts_E = sel.counts_E
    num_pairs = counts_E.sum()
    capacity = torch.ceil(num_pairs.double() * capacity_factor / counts_E.shape[0])
    rank_M = sel.pair_M - (torch.cumsum(counts_E, 0) - counts_E)[sel.expert_M]
    kept_E = torch.minimum(counts_E, capacity.long())
    num_kept = kept_E.sum()
    kept_start_E = torch.cumsum(kept_E, 0) - kept_E
    row_M = torch.where(rank_M < capacity, kept_start_E[sel.expert_M] + rank_M, num_kept)
    return row_M, kept_E, num_kept, num_pairs - num_kept
