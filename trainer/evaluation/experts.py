"""Expert-load figures (DESIGN section 6) from the cores' no-grad `ExpertLoad`.

The trainer adds every step's `ExpertLoad` to an `ExpertLoadMeter`; at log time the
accumulated counts are all-reduced over the data-parallel group, so the logged figures
are global, then reset. A separate meter spans the whole run for `summary.json`.

Specialisation: `nmi` is the normalised mutual information of a joint count table
(a labelling x experts). `load_figures` reports `task_expert_nmi` from the per-task
selection counts; `cluster_expert_nmi` measures how much a row's latent group (e.g. the
synthetic data's user clusters) tells about the experts its union U ran, from the
`experts` column of `trainer.predict experts=true`.

Legend: T tasks, E experts, A / B the two labellings of a joint table, C clusters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
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


def nmi(counts_AB: Any) -> float | None:
    """Normalised mutual information of a joint count table, `I(A;B) / sqrt(H(A) H(B))`.

    `counts_AB[a, b]` is how often (or with how much weight) label a of one labelling
    (tasks, latent clusters: rows) occurred with label b of the other (experts: columns);
    the empirical joint is `p_ab = counts / total`. The normalisation is the geometric
    mean of the two entropies (Strehl and Ghosh's NMI, scikit-learn's
    `average_method="geometric"`), in [0, 1]: 0 when A and B are independent, 1 when
    each determines the other (a one-to-one map between the used labels). Logarithm
    base does not matter (it cancels). All-zero rows and columns (unused labels, dead
    experts) change nothing. Rounding is clipped into [0, 1].

    Args:
        counts_AB: 2-D non-negative finite counts (numpy array, torch tensor or nested
            lists).

    Returns:
        The NMI, or None when the table is empty (no cell, or a total of 0) or either
        marginal entropy is 0 (a single label in use: nothing to explain or nothing to
        tell).
    """
    if isinstance(counts_AB, torch.Tensor):
        counts_AB = counts_AB.detach().cpu().double().numpy()
    c = np.asarray(counts_AB, dtype=np.float64)
    if c.ndim != 2:
        raise ValueError(f"nmi needs a 2-D count table, got shape {c.shape}")
    if not np.isfinite(c).all() or (c < 0).any():
        raise ValueError("nmi needs finite non-negative counts")
    total = float(c.sum())
    if c.size == 0 or total <= 0:
        return None
    p_AB = c / total
    p_A, p_B = p_AB.sum(1), p_AB.sum(0)
    h_A = -float(np.sum(p_A[p_A > 0] * np.log(p_A[p_A > 0])))
    h_B = -float(np.sum(p_B[p_B > 0] * np.log(p_B[p_B > 0])))
    if h_A <= 0 or h_B <= 0:
        return None
    a, b = np.nonzero(p_AB)
    p = p_AB[a, b]
    mutual = float(np.sum(p * (np.log(p) - np.log(p_A[a]) - np.log(p_B[b]))))
    return min(1.0, max(0.0, mutual / math.sqrt(h_A * h_B)))


def cluster_expert_nmi(experts_lists: Sequence[Sequence[int]], clusters: Sequence[Any] | np.ndarray) -> float | None:
    """NMI between a row's latent cluster and the experts its union U ran.

    Each row spreads a weight of 1 over its experts, `1 / |U_row|` each, into the
    contingency table `[clusters, experts]` (rows: the distinct values of `clusters`
    in sorted order; columns: expert ids 0..max), so every row counts once whatever
    its |U|; the result is `nmi` of that table. Rows with no expert contribute nothing.

    Args:
        experts_lists: per row, its distinct experts, e.g. the `experts` column of
            `trainer.predict experts=true` (`table["experts"].to_pylist()`).
        clusters: per row, its cluster label (any sortable values, e.g. ints).

    Returns:
        `nmi` of the table: None when it is empty or uses a single cluster or expert.
    """
    labels = np.asarray(clusters)
    if labels.ndim != 1 or len(labels) != len(experts_lists):
        raise ValueError(f"clusters must hold one label per row: {labels.shape} labels, {len(experts_lists)} rows")
    sizes_R = np.fromiter((len(u) for u in experts_lists), dtype=np.int64, count=len(experts_lists))
    experts = np.fromiter((e for u in experts_lists for e in u), dtype=np.int64, count=int(sizes_R.sum()))
    if (experts < 0).any():
        raise ValueError("expert ids must be >= 0")
    names, cluster_R = np.unique(labels, return_inverse=True)
    table_CE = np.zeros((len(names), int(experts.max()) + 1 if len(experts) else 0))
    weights = np.repeat(1.0 / np.maximum(sizes_R, 1), sizes_R)
    np.add.at(table_CE, (np.repeat(cluster_R, sizes_R), experts), weights)
    return nmi(table_CE)


def load_figures(
    counts_TE: torch.Tensor,
    tasks: tuple[str, ...],
    active_sum: float,
    num_instances: float,
    active_max: float,
    dropped_pairs: float,
) -> dict[str, object]:
    """Selection fractions pooled and per task, CV, max/mean, dead experts, |U| stats, and
    `task_expert_nmi`: `nmi(counts_TE)`, how specialised the experts are by task
    (None with a single task or nothing counted)."""
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
        "task_expert_nmi": nmi(counts_TE),
        "selection_fraction": frac_E.tolist(),
        "selection_fraction_per_task": per_task,
    }
