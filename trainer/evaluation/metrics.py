"""Evaluation metrics over the whole evaluation set of every rank: the trainer's entry point.

Per task: AUC, GAUC and NE (normalised entropy), plus the row count, the positive rate
and the number of users GAUC averages over.

- AUC is exact (Mann-Whitney with average ranks for ties), not a bucketed estimate.
- GAUC is the AUC of each user's impressions, averaged with weights = that user's number
  of impressions; users whose impressions are all positive or all negative are skipped
  (their AUC is undefined). This is the definition used in DESIGN section 6. TorchRec's
  `GAUCMetric` groups by in-batch sessions and averages users unweighted, so it would
  give a different number; its AUC agrees with ours (checked in the tests).
- NE is the log loss divided by the entropy of the label's base rate; below 1 means the
  model beats predicting the average.

Entry point: `compute_metrics(preds, tasks, mode=...)`, called by every rank after the
evaluation batches; it returns task -> {auc, gauc, gauc_users, ne, num_rows,
positive_rate} (None where undefined: one class, no user ids, no rows), the same values
on every rank. Ranks each hold a shard of predictions in `Predictions` (CPU; the
evaluation loader pads with weight-0 rows so that all shards have the same length, and
the padding is dropped before any metric). `mode` (`trainer.eval_mode`):

- `exact`: `Predictions.gather` all-gathers every row onto every rank, which computes the
  metrics over the full arrays (`task_metrics`). O(N) memory and O(N log N) time per
  rank: for small sets, and the reference the distributed path is tested against.
- `distributed`: `trainer/evaluation/distributed.py`, a distributed sort (exact AUC and GAUC, NE
  from summed parts); O(N / W) memory and O((N / W) log(N / W)) time per rank.
- `auto` (default): `distributed` when the world has more than one rank and more than
  `AUTO_DISTRIBUTED_ROWS` (2,000,000) evaluation rows in all, else `exact`: below the
  threshold every rank sorting all rows is still affordable, above it the exact path's
  memory and time grow with N on every rank (figures: `benchmarks/results/eval_scale/`).
  The distributed AUC equals the exact one bit for bit (both sum integers exactly), GAUC
  and NE agree to float64 rounding, so the switch does not move the numbers.

Legend: N evaluation rows, W ranks, T tasks.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

from model.moe.host import to_host
from parallel.dist import all_gather_cat, world_size
from trainer.evaluation.distributed import distributed_task_metrics, rank_sum

EVAL_MODES = ("exact", "distributed", "auto")
AUTO_DISTRIBUTED_ROWS = 2_000_000


def _average_ranks(x_N: np.ndarray) -> np.ndarray:
    """1-based ranks of `x_N`, ties sharing their average rank."""
    order = np.argsort(x_N, kind="mergesort")
    sorted_x = x_N[order]
    # boundaries of runs of equal values
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x_N)]
    avg = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks_sorted = np.repeat(avg, ends - starts)
    ranks = np.empty(len(x_N), dtype=np.float64)
    ranks[order] = ranks_sorted
    return ranks


def auc(scores_N: np.ndarray, labels_N: np.ndarray) -> float | None:
    """Exact ROC AUC; None when only one class is present."""
    pos = labels_N > 0.5
    n_pos = int(pos.sum())
    n_neg = len(labels_N) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = _average_ranks(np.asarray(scores_N, dtype=np.float64))
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def gauc(scores_N: np.ndarray, labels_N: np.ndarray, users_N: np.ndarray) -> float | None:
    """Impression-weighted mean of per-user AUC over users with both classes."""
    return gauc_and_users(scores_N, labels_N, users_N)[0]


def gauc_and_users(scores_N: np.ndarray, labels_N: np.ndarray, users_N: np.ndarray) -> tuple[float | None, int]:
    """GAUC and the number of users it averages over (those with both classes)."""
    scores = np.asarray(scores_N, dtype=np.float64)
    pos = (labels_N > 0.5).astype(np.int64)
    # rank within user: sort by (user, score), tie groups are equal (user, score)
    order = np.lexsort((scores, users_N))
    u, s, p = users_N[order], scores[order], pos[order]
    new_user = np.r_[True, u[1:] != u[:-1]]
    new_tie = new_user | np.r_[True, s[1:] != s[:-1]]
    user_idx = np.cumsum(new_user) - 1
    user_start = np.flatnonzero(new_user)
    tie_starts = np.flatnonzero(new_tie)
    tie_ends = np.r_[tie_starts[1:], len(u)]
    # average position of each tie group, relative to the user's first row (1-based)
    avg_pos = (tie_starts + tie_ends + 1) / 2.0 - user_start[user_idx[tie_starts]]
    rank = np.repeat(avg_pos, tie_ends - tie_starts)
    num_users = len(user_start)
    n = np.bincount(user_idx, minlength=num_users).astype(np.float64)
    n_pos = np.bincount(user_idx, weights=p, minlength=num_users)
    n_neg = n - n_pos
    pos_rank_sum = np.bincount(user_idx, weights=rank * p, minlength=num_users)
    ok = (n_pos > 0) & (n_neg > 0)
    if not ok.any():
        return None, 0
    user_auc = (pos_rank_sum[ok] - n_pos[ok] * (n_pos[ok] + 1) / 2.0) / (n_pos[ok] * n_neg[ok])
    return float(np.average(user_auc, weights=n[ok])), int(ok.sum())


def normalized_entropy(probs_N: np.ndarray, labels_N: np.ndarray, eps: float = 1e-7) -> float | None:
    """Log loss / entropy of the base rate; None when the base rate is 0 or 1."""
    p = np.clip(np.asarray(probs_N, dtype=np.float64), eps, 1 - eps)
    y = np.asarray(labels_N, dtype=np.float64)
    rate = y.mean()
    if rate <= 0.0 or rate >= 1.0:
        return None
    logloss = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    base = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))
    return float(logloss / base)


class Predictions:
    """Accumulates this rank's evaluation outputs batch by batch (on CPU): one
    device-to-host copy of the logits, labels and weights per batch (and one of the user
    ids), through `model.moe.host.to_host`."""

    def __init__(self, tasks: tuple[str, ...]) -> None:
        self.tasks = tasks
        self._logits: dict[str, list[torch.Tensor]] = {t: [] for t in self.tasks}
        self._labels: dict[str, list[torch.Tensor]] = {t: [] for t in self.tasks}
        self._weights: list[torch.Tensor] = []
        self._users: list[torch.Tensor] = []

    def add(
        self,
        logits: dict[str, torch.Tensor],
        labels: dict[str, torch.Tensor],
        weights_B: torch.Tensor,
        user_id_B: torch.Tensor | None,
    ) -> None:
        T = len(self.tasks)
        rows = [*(logits[t].detach().float().reshape(-1) for t in self.tasks)]
        rows += [labels[t].detach().float().reshape(-1) for t in self.tasks]
        host_KB = to_host(torch.stack([*rows, weights_B.detach().float().reshape(-1)]))  # one device-to-host copy
        for i, t in enumerate(self.tasks):
            self._logits[t].append(host_KB[i])
            self._labels[t].append(host_KB[T + i])
        self._weights.append(host_KB[2 * T])
        if user_id_B is not None:
            self._users.append(to_host(user_id_B))

    @property
    def has_users(self) -> bool:
        return bool(self._users)

    def _local(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """This rank's rows, padding included, and their weights."""
        cat = lambda xs, dtype: torch.cat(xs) if xs else torch.zeros(0, dtype=dtype)
        local = {}
        for t in self.tasks:
            local[f"logit/{t}"] = cat(self._logits[t], torch.float32)
            local[f"label/{t}"] = cat(self._labels[t], torch.float32)
        if self._users:
            local["user_id"] = cat(self._users, torch.int64)
        return local, cat(self._weights, torch.float32)

    def local_rows(self) -> dict[str, np.ndarray]:
        """This rank's rows (padding dropped) as numpy arrays; keys as `gather`."""
        local, weights = self._local()
        keep = weights.numpy() > 0
        return {key: value.numpy()[keep] for key, value in local.items()}

    def gather(self, group: dist.ProcessGroup | None = None) -> dict[str, np.ndarray]:
        """All ranks' rows (padding dropped) as numpy arrays, on every rank: O(N) per rank.

        Keys: `logit/<task>`, `label/<task>`, and `user_id` when present.
        """
        local, weights = self._local()
        out: dict[str, np.ndarray] = {}
        keep = all_gather_cat(weights, group).numpy() > 0
        for key, value in local.items():
            out[key] = all_gather_cat(value, group).numpy()[keep]
        return out


def task_metrics(rows: dict[str, np.ndarray], tasks: tuple[str, ...]) -> dict[str, dict[str, float | None]]:
    """task -> {auc, gauc, gauc_users, ne, num_rows, positive_rate} over gathered rows."""
    users = rows.get("user_id")
    out: dict[str, dict[str, float | None]] = {}
    for t in tasks:
        logits, labels = rows[f"logit/{t}"], rows[f"label/{t}"]
        probs = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
        g, g_users = (None, None) if users is None else gauc_and_users(logits, labels, users)
        out[t] = {
            "auc": auc(logits, labels),
            "gauc": g,
            "gauc_users": None if g_users is None else float(g_users),
            "ne": normalized_entropy(probs, labels) if len(labels) else None,
            "num_rows": float(len(labels)),
            "positive_rate": float(labels.mean(dtype=np.float64)) if len(labels) else None,
        }
    return out


def check_mode(mode: str) -> None:
    """`trainer.eval_mode` must be one of `EVAL_MODES`."""
    if mode not in EVAL_MODES:
        raise ValueError(f"trainer.eval_mode={mode!r}; choose one of {', '.join(EVAL_MODES)}")


def resolve_mode(mode: str, *, num_rows: int, num_ranks: int) -> str:
    """`exact` or `distributed` for `trainer.eval_mode` (see the module doc for `auto`)."""
    check_mode(mode)
    if mode == "auto":
        return "distributed" if num_ranks > 1 and num_rows > AUTO_DISTRIBUTED_ROWS else "exact"
    return mode


def compute_metrics(
    preds: Predictions, tasks: tuple[str, ...], *, mode: str, group: dist.ProcessGroup | None = None
) -> dict[str, dict[str, float | None]]:
    """Per-task metrics over every rank's predictions; every rank must call it together.

    Args:
        preds: this rank's predictions (padding rows included; they are dropped).
        tasks: task names (a subset of `preds.tasks`).
        mode: exact | distributed | auto (`trainer.eval_mode`, module doc).
        group: process group (None = the world; rows are CPU tensors, so with an NCCL
            main group they travel over the gloo host group, which spans the world).

    Returns:
        task -> {auc, gauc, gauc_users, ne, num_rows, positive_rate}, the same on every
        rank; gauc and gauc_users are None without user ids.
    """
    check_mode(mode)
    if mode == "exact":
        return task_metrics(preds.gather(group), tasks)
    rows = preds.local_rows()
    local_counts = np.array([len(rows[f"label/{preds.tasks[0]}"]), int(preds.has_users)])
    num_rows, num_with_users = (int(v) for v in rank_sum(local_counts, group))
    if resolve_mode(mode, num_rows=num_rows, num_ranks=world_size(group)) == "exact":
        del rows
        return task_metrics(preds.gather(group), tasks)
    return distributed_task_metrics(rows, tasks, with_users=num_with_users > 0, group=group)
