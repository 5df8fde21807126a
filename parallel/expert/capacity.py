"""Expert capacity (`parallel.capacity_factor`): its start-up check and its application.

Definition (None = dropless, the default): a per-expert limit on each source rank's
*local* batch, decided by that rank's router before dispatch. With N_r the deduplicated
pairs of rank r's batch, rank r sends expert e at most `ceil(capacity_factor * N_r / E)`
pairs (the lowest instance indices win, see `model.moe.router.apply_capacity`); the
owner of e therefore runs at most `sum_r ceil(capacity_factor * N_r / E)` rows, about
`capacity_factor` times an even share of its expert-parallel group's pairs. No
collective is involved, so every rank drops exactly what one process would drop on that
rank's batch, for any ep (and ep = 1). Dropped pairs are counted per rank in
`ExpertLoad.dropped_pairs`; the trainer sums them over all ranks for
`experts/dropped_pairs`. Capacity applies in training only: evaluation is dropless
(`model.moe.router`), so padding rows never take capacity.

It is a `parallel` key rather than a model key because under expert parallelism it
bounds what every source rank may send to an expert; `apply_capacity_factor` sets it on
every SMES layer (`SMESLayer.capacity_factor`).
"""

from __future__ import annotations

from torch import nn

from parallel.expert.params import smes_layers


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
    """Set the per-expert capacity (see the module doc) on every SMES layer of `model`."""
    check_capacity_factor(capacity_factor)
    layers = smes_layers(model)
    if capacity_factor is not None and not layers:
        raise ValueError("parallel.capacity_factor needs a sparse MoE core (model=smes); the model has no SMES layer")
    for layer in layers:
        check_capacity_factor(capacity_factor, routing=layer.router.routing)
        layer.capacity_factor = capacity_factor
