"""Expert-load figures (DESIGN section 6) from the cores' no-grad `ExpertLoad`.

The trainer adds every step's `ExpertLoad` to an `ExpertLoadMeter`; at log time the
accumulated counts are all-reduced over the data-parallel group, so the logged figures
are global, then reset. A separate meter spans the whole run for `summary.json`.

Specialisation: `nmi` is the normalised mutual information of a joint count table
(a labelling x experts). `load_figures` reports `task_expert_nmi` from the per-task
selection counts of each training window. The cluster-expert NMI measures how much a
row's latent cluster (e.g. the capacity generator's user x item cluster) tells about
the experts its union U ran: each row spreads a weight of 1 over its U
(`cluster_expert_counts`). Evaluation computes it on every validation and on test, for
splits whose source gives `Split.clusters` (`ClusterExpertMeter`, device counts, one
reduce and one host read per split); `cluster_expert_nmi` computes it from the
`experts` column of `trainer.predict experts=true`.

Legend: T tasks, E experts, A / B the two labellings of a joint table, C clusters,
B rows of a batch, W slots of a union table.
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


def cluster_expert_counts(
    union_BW: torch.Tensor, cluster_B: torch.Tensor, weights_B: torch.Tensor, num_clusters: int, num_experts: int
) -> torch.Tensor:
    """`[C, E]` float64 contingency table of latent clusters x executed experts.

    Each row with a positive weight spreads a weight of 1 over its experts, `1 / |U|`
    each, into its cluster's row, so every row counts once whatever its |U|; rows with
    weight 0 (evaluation padding) or no expert add nothing. On the tensors' device.

    Args:
        union_BW: `[B, W]` long, each row's executed experts padded with -1
            (`model.moe.router.union_experts`).
        cluster_B: `[B]` long cluster codes in 0..C-1.
        weights_B: `[B]` row weights (> 0 counts).
        num_clusters, num_experts: C and E.
    """
    ran_BW = union_BW >= 0
    share_B = (weights_B > 0).double() / ran_BW.sum(1).clamp_min(1).double()
    cells_BW = cluster_B.long()[:, None] * num_experts + union_BW.clamp_min(0)
    table = torch.zeros(num_clusters * num_experts, dtype=torch.float64, device=union_BW.device)
    table.index_add_(0, cells_BW.reshape(-1), (ran_BW.double() * share_B[:, None]).reshape(-1))
    return table.view(num_clusters, num_experts)


class ClusterExpertMeter:
    """Sums `cluster_expert_counts` over a split's batches on the device (no host sync
    per batch); `compute()` reduces over ranks and reads the table once."""

    def __init__(self, num_clusters: int, num_experts: int, device: torch.device) -> None:
        self.num_clusters, self.num_experts = num_clusters, num_experts
        self.table_CE = torch.zeros(num_clusters, num_experts, dtype=torch.float64, device=device)

    def add(self, union_BW: torch.Tensor, cluster_B: torch.Tensor, weights_B: torch.Tensor) -> None:
        self.table_CE += cluster_expert_counts(union_BW, cluster_B, weights_B, self.num_clusters, self.num_experts)

    def compute(self, group: dist.ProcessGroup | None = None) -> float | None:
        """The NMI over every rank's rows (collective: every rank must call it)."""
        table = self.table_CE.clone()
        all_reduce(table, group=group)
        return nmi(to_host(table).numpy())


def cluster_expert_nmi(experts_lists: Sequence[Sequence[int]], clusters: Sequence[Any] | np.ndarray) -> float | None:
    """NMI between a row's latent cluster and the experts its union U ran, from lists.

    The table is `cluster_expert_counts` (rows: the distinct values of `clusters` in
    sorted order; columns: expert ids 0..max); rows with no expert contribute nothing.

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
    union_RW = np.full((len(sizes_R), int(sizes_R.max(initial=0))), -1, dtype=np.int64)
    # row-major fill: each row's experts go to its first |U| slots
    union_RW[np.arange(union_RW.shape[1])[None, :] < sizes_R[:, None]] = experts
    table_CE = cluster_expert_counts(
        torch.from_numpy(union_RW),
        torch.from_numpy(cluster_R.reshape(-1).astype(np.int64)),
        torch.ones(len(sizes_R)),
        len(names),
        int(experts.max()) + 1 if len(experts) else 0,
    )
    return nmi(table_CE.numpy())


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
