"""The interface every multi-task core implements.

A core maps the shared input `x_BD` (pooled embeddings concatenated with dense
features) to one representation per task, plus auxiliary losses and, for sparse MoE
cores, expert-load statistics. SharedBottom, MMoE, PLE, SMES and HoME all return a
`CoreOutput`, so the towers, the trainer and the parallel wrappers never special-case
a model.

Legend: B instances, D input width, H representation width, E experts, T tasks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass(slots=True)
class ExpertLoad:
    """No-grad expert-load statistics of one forward pass (local batch).

    Kept apart from the differentiable part so that `parallel/` can all-reduce the
    counts over the data-parallel group before the balance loss and the logs use them.

    Attributes:
        counts_TE: `[T, E]` float32 number of instances whose task t selected expert e.
        active_sum: scalar, sum over instances of the number of distinct experts run.
        active_max: scalar, max over instances of that number.
        num_instances: scalar, instances counted (for means).
        dropped_pairs: scalar, (instance, expert) pairs dropped by a capacity limit.
    """

    counts_TE: torch.Tensor
    active_sum: torch.Tensor
    active_max: torch.Tensor
    num_instances: torch.Tensor
    dropped_pairs: torch.Tensor = field(default_factory=lambda: torch.zeros(()))


@dataclass(slots=True)
class CoreOutput:
    """What a core returns.

    Attributes:
        task_reprs: task -> `[B, H]` representation fed to that task's tower.
        aux_losses: name -> scalar, already multiplied by its coefficient (e.g. the
            balance loss times beta); the trainer adds their sum to the task losses.
        load: expert-load statistics, or None for cores without sparse routing.
    """

    task_reprs: dict[str, torch.Tensor]
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    load: ExpertLoad | None = None


class MultiTaskCore(Protocol):
    """x_BD -> CoreOutput. `out_dim` is H, the width of every task representation."""

    out_dim: int

    def __call__(self, x_BD: torch.Tensor) -> CoreOutput: ...
