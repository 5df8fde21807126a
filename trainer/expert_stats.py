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
from model.moe.host import to_host
from parallel.dist import all_reduce


class ExpertLoadMeter:
    """Sums counts over steps on the device (no host sync per step); `compute()`
    reduces over ranks, copies to the host once and derives the figures."""

    def __init__(self) -> None:
        self.counts_TE: torch.Tensor | None = None
        self.sums_3: torch.Tensor | None = None  # active_sum, num_instances, dropped_pairs
        self.peak_1: torch.Tensor | None = None  # max active per instance

    def add(self, load: ExpertLoad) -> None:
        counts = load.counts_TE.detach().double()
        on = counts.device
        parts = (load.active_sum, load.num_instances, load.dropped_pairs)
        sums = torch.stack([x.detach().double().to(on) for x in parts])
        peak = load.active_max.detach().double().reshape(1).to(on)
        if self.counts_TE is None or self.sums_3 is None or self.peak_1 is None:
            self.counts_TE, self.sums_3, self.peak_1 = counts.clone(), sums, peak.clone()
        else:
            self.counts_TE += counts
            self.sums_3 += sums
            torch.maximum(self.peak_1, peak, out=self.peak_1)

    @property
    def empty(self) -> bool:
        return self.counts_TE is None

    def compute(self, tasks: tuple[str, ...], group: dist.ProcessGroup | None = None) -> dict[str, object] | None:
        """Global figures (collective: every rank must call it). None when nothing was added."""
        if self.counts_TE is None or self.sums_3 is None or self.peak_1 is None:
            return None
        counts_TE, sums, peak = self.counts_TE.clone(), self.sums_3.clone(), self.peak_1.clone()
        all_reduce(counts_TE, group=group)  # device tensors: the device group
        all_reduce(sums, group=group)
        all_reduce(peak, "max", group=group)
        host = to_host(torch.cat([sums, peak, counts_TE.flatten()]))  # one host read, at log time
        s, counts = host[:3].tolist(), host[4:].view_as(counts_TE).float()
        return load_figures(counts, tasks, s[0], s[1], float(host[3]), s[2])

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
