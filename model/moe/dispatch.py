"""Dispatch: run the plan's deduplicated (instance, expert) pairs through the experts.

The SMES layer calls `layer.dispatcher(x_BD, plan) -> y_NH`, whose rows are aligned
with the plan's pairs (`plan.pair_instance_N`, `plan.pair_expert_N`,
expert-contiguous). Mixing per task happens in the layer, not here. Before that, it
hands `layer.dispatcher.plan_sizes` to the router as its size reader: the one host
read of the step (`model.moe.host`), `counts_E -> PlanSizes`. The local dispatcher
reads N; the all-to-all one exchanges the counts first and reads N and the split
sizes in one copy, which come back to it in `plan.sizes.dispatch`. A dispatcher
without `plan_sizes` gets plans sized by `read_local_sizes`.

`LocalDispatcher` is the single-process implementation: gather the rows, one grouped
matmul, done. Expert parallelism (`parallel/`) replaces it by assigning another module
with the same `forward` to `SMESLayer.dispatcher`; that module owns the local slice of
the experts as its `experts` attribute, so expert parameters are always found under
`<layer>.dispatcher.experts.` (and `SMESLayer.experts` reads through to it).

Phases (Megatron-style, no communication in `dispatch` / `combine` of this class; an
all-to-all subclass puts its collectives between them):

1. `dispatch(x_BD, plan) -> (routed_x_ND, counts_e, metadata)`: rows for the local
   experts, expert-contiguous, and how many rows each local expert owns.
2. `experts(routed_x_ND, counts_e) -> y_NH`: grouped matmul.
3. `combine(y_NH, metadata) -> y_NH` in plan pair order.

Plans of `all` routing (`plan.all_experts`, all B*E pairs in `[E, B]` order) take a
shortcut here: `experts.forward_all(x_BD)` computes the same rows with a batched matmul
and no gather. A dispatcher that does not special-case them stays correct, just slower.

Legend: B instances, D input width, E experts, e local experts, N pairs, H expert
output width.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from model.moe.experts import GroupedExperts
from model.moe.router import PlanSizes, RoutingPlan, read_local_sizes


class Dispatcher(Protocol):
    """What `SMESLayer` needs from its `dispatcher` attribute."""

    experts: GroupedExperts

    def plan_sizes(self, counts_E: torch.Tensor) -> PlanSizes: ...

    def __call__(self, x_BD: torch.Tensor, plan: RoutingPlan) -> torch.Tensor: ...


class LocalDispatcher(nn.Module):
    """All E experts on this process.

    Args:
        experts: the experts (all of them, `experts.num_experts == plan.num_experts`).
    """

    def __init__(self, experts: GroupedExperts) -> None:
        super().__init__()
        self.experts = experts

    def plan_sizes(self, counts_E: torch.Tensor) -> PlanSizes:
        """The step's one host read: N, the pairs this process runs."""
        return read_local_sizes(counts_E)

    def dispatch(self, x_BD: torch.Tensor, plan: RoutingPlan) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Gather the pair rows: `(routed_x_ND, counts_E, metadata=None)`; the rows are in the
        experts' layout (`GroupedExperts.input_rows`: zero-padded columns when D is not
        16-byte aligned, so that the kernel reads the gather's output as it is)."""
        return self.experts.input_rows(x_BD, plan.pair_instance_N), plan.counts_E, None

    def combine(self, y_NH: torch.Tensor, metadata: Any) -> torch.Tensor:
        """Identity: rows are already in plan pair order."""
        return y_NH

    def forward(self, x_BD: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        """Expert outputs of the plan's pairs: `[N, H]`, aligned with `plan.pair_*_N`."""
        if plan.all_experts:
            y_EBH = self.experts.forward_all(x_BD)
            return y_EBH.reshape(-1, y_EBH.shape[-1])
        routed_x_ND, counts_E, metadata = self.dispatch(x_BD, plan)
        return self.combine(self.experts(routed_x_ND, counts_E), metadata)
