"""Expert-load figures (DESIGN section 6) from the cores' no-grad `ExpertLoad`.

The trainer adds every step's `ExpertLoad` to an `ExpertLoadMeter`; at log time the
accumulated counts are all-reduced over the data-parallel group, so the logged figures
are global, then reset. A separate meter spans the whole run for `summary.json`.

Legend: T tasks, E experts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from model.core import ExpertLoad
from parallel.dist import all_reduce


class ExpertLoadMeter:
    """Sums counts over steps; `compute()` reduces over ranks and derives the figures."""

    def __init__(self) -> None:
        self.counts_TE: torch.Tensor | None = None
        self.active_sum = 0.0
        self.active_max = 0.0
        self.num_instances = 0.0
        self.dropped_pairs = 0.0

    def add(self, load: ExpertLoad) -> None:
        counts = load.counts_TE.detach().float().cpu()
        self.counts_TE = counts if self.counts_TE is None else self.counts_TE + counts
        self.active_sum += float(load.active_sum)
        self.active_max = max(self.active_max, float(load.active_max))
        self.num_instances += float(load.num_instances)
        self.dropped_pairs += float(load.dropped_pairs)

    @property
    def empty(self) -> bool:
        return self.counts_TE is None

    def compute(self, tasks: tuple[str, ...], group: dist.ProcessGroup | None = None) -> dict[str, object] | None:
        """Global figures (collective: every rank must call it). None when nothing was added."""
        if self.counts_TE is None:
            return None
        counts_TE = self.counts_TE.clone()
        sums = torch.tensor([self.active_sum, self.num_instances, self.dropped_pairs], dtype=torch.float64)
        peak = torch.tensor([self.active_max], dtype=torch.float64)
        all_reduce(counts_TE, group=group)
        all_reduce(sums, group=group)
        all_reduce(peak, "max", group=group)
        return load_figures(counts_TE, tasks, float(sums[0]), float(sums[1]), float(peak[0]), float(sums[2]))

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]


def load_figures(
    counts_TE: torch.Tensor,
    tasks: tuple[str, ...],
    active_sum: float,
    num_instances: float,
    active_max: float,
    dropped_pairs: float,
) -> dict[str, object]:
    """Selection fractions pooled and per task, CV, max/mean, dead experts, |U| stats."""
    pooled_E = counts_TE.sum(0).double()
    total = float(pooled_E.sum())
    num_experts = counts_TE.shape[1]
    frac_E = pooled_E / total if total > 0 else torch.zeros(num_experts, dtype=torch.float64)
    mean = float(pooled_E.mean())
    per_task = {}
    for t, row in zip(tasks, counts_TE.double(), strict=True):
        s = float(row.sum())
        per_task[t] = (row / s if s > 0 else row).tolist()
    return {
        "num_experts": num_experts,
        "mean_active_per_instance": active_sum / num_instances if num_instances else None,
        "max_active_per_instance": active_max,
        "load_cv": float(pooled_E.std(unbiased=False) / mean) if mean > 0 else None,
        "max_over_mean_load": float(pooled_E.max() / mean) if mean > 0 else None,
        "dead_experts": int((pooled_E == 0).sum()),
        "dropped_pairs": dropped_pairs,
        "selection_fraction": frac_E.tolist(),
        "selection_fraction_per_task": per_task,
    }
