"""Distributed evaluation on 2 and 3 gloo ranks: both modes against brute force, and
the distributed path's memory per rank.

Shards hold ties within and across ranks, a user with ~40% of all rows, a user on one
rank only, weight-0 padding rows, and (parametrised) a rank whose shard is all padding.
Tasks: `ties` (logits rounded to 0.1), `smooth` (continuous logits: the heavy user's
entries span ranks in the GAUC sort), `flat` (one logit for every row: AUC 1/2, one tie
group cut by every range boundary), `oneclass` (no positive: every metric None).
"""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
import torch

from tests._dist import run_ranks
from tests.trainer.metric_refs import brute_auc, brute_gauc
from trainer.evaluation import distributed as dist_metrics
from trainer.evaluation.metrics import Predictions, compute_metrics

TASKS = ("ties", "smooth", "flat", "oneclass")
ROWS_PER_RANK = 600
BATCH = 100


def shard(rank: int, world: int, empty_rank: int | None) -> dict[str, np.ndarray]:
    """Rank `rank`'s padded shard (the same on the parent and in the worker)."""
    rng = np.random.default_rng(1000 * world + rank)
    n = ROWS_PER_RANK
    users = rng.zipf(1.5, n) % 200
    users[rng.random(n) < 0.4] = 7  # heavy user, on every rank
    users[:25] = 1000 + rank  # a user on this rank only
    weights = (rng.random(n) > 0.1).astype(np.float32)
    weights[-37:] = 0.0  # the loader's tail padding
    if rank == empty_rank:
        weights[:] = 0.0
    out = {"user_id": users.astype(np.int64), "weights": weights}
    for t in TASKS:
        y = (rng.random(n) < 0.3).astype(np.float32)
        logits = y * 0.7 + rng.standard_normal(n)
        if t == "ties":
            logits = np.round(logits, 1)  # also -0.0 and 0.0: equal scores with different bits
        elif t == "flat":
            logits = np.full(n, 0.3)
        elif t == "oneclass":
            y[:] = 0.0
        out[f"logit/{t}"], out[f"label/{t}"] = logits.astype(np.float32), y
    return out


def predictions(rows: dict[str, np.ndarray], tasks: tuple[str, ...], users: bool = True) -> Predictions:
    preds = Predictions(tasks)
    for lo in range(0, len(rows["weights"]), BATCH):
        cut = {k: torch.from_numpy(v[lo : lo + BATCH]) for k, v in rows.items()}
        preds.add(
            {t: cut[f"logit/{t}"] for t in tasks},
            {t: cut[f"label/{t}"] for t in tasks},
            cut["weights"],
            cut["user_id"] if users else None,
        )
    return preds


def _modes_worker(rank: int, world: int, empty_rank: int | None) -> dict:
    preds = predictions(shard(rank, world, empty_rank), TASKS)
    return {mode: compute_metrics(preds, TASKS, mode=mode) for mode in ("exact", "distributed", "auto")}


def reference(world: int, empty_rank: int | None) -> dict[str, dict[str, float | None]]:
    """Brute-force metrics of all ranks' rows without padding (independent of the code)."""
    shards = [shard(r, world, empty_rank) for r in range(world)]
    keep = [s["weights"] > 0 for s in shards]
    users = np.concatenate([s["user_id"][k] for s, k in zip(shards, keep, strict=True)])
    out = {}
    for t in TASKS:
        s = np.concatenate([x[f"logit/{t}"][k] for x, k in zip(shards, keep, strict=True)]).astype(np.float64)
        y = np.concatenate([x[f"label/{t}"][k] for x, k in zip(shards, keep, strict=True)]).astype(np.float64)
        rate = y.mean()
        p = 1 / (1 + np.exp(-s))
        ne = None
        if 0 < rate < 1:
            entropy = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))
            ne = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)) / entropy
        gauc, num_users = brute_gauc(s, y, users)
        out[t] = {
            "auc": brute_auc(s, y) if 0 < rate < 1 else None,
            "gauc": gauc,
            "gauc_users": float(num_users),
            "ne": ne,
            "num_rows": float(len(y)),
            "positive_rate": rate,
        }
    return out


@pytest.mark.slow
@pytest.mark.parametrize(("world", "empty_rank"), [(2, None), (2, 0), (3, 1)])
def test_modes_agree_with_brute_force(world: int, empty_rank: int | None) -> None:
    out = run_ranks(_modes_worker, world, empty_rank)
    for mode in ("exact", "distributed", "auto"):
        assert all(o[mode] == out[0][mode] for o in out), f"{mode}: ranks disagree"
    exact, distributed, ref = out[0]["exact"], out[0]["distributed"], reference(world, empty_rank)
    assert out[0]["auto"] == exact  # small set: auto is exact
    for t in TASKS:
        e, d, r = exact[t], distributed[t], ref[t]
        assert set(e) == set(d) == set(r)
        assert d["auc"] == e["auc"]  # both sum integers exactly: the same bits
        assert d["num_rows"] == e["num_rows"] == r["num_rows"]
        assert d["gauc_users"] == e["gauc_users"] == r["gauc_users"]
        for key in ("auc", "gauc", "ne", "positive_rate"):
            if r[key] is None:
                assert e[key] is None and d[key] is None, (t, key)
            else:
                assert e[key] == pytest.approx(r[key], rel=1e-12, abs=1e-14), (t, key, "exact")
                assert d[key] == pytest.approx(r[key], rel=1e-12, abs=1e-14), (t, key, "distributed")
    assert distributed["flat"]["auc"] == 0.5 and distributed["flat"]["gauc"] == 0.5
    assert distributed["oneclass"]["gauc_users"] == 0 and distributed["oneclass"]["positive_rate"] == 0


def _no_users_worker(rank: int, world: int) -> dict:
    preds = predictions(shard(rank, world, None), ("ties",), users=False)
    return {mode: compute_metrics(preds, ("ties",), mode=mode)["ties"] for mode in ("exact", "distributed")}


@pytest.mark.slow
def test_without_user_ids_gauc_is_none() -> None:
    out = run_ranks(_no_users_worker, 2)[0]
    for m in out.values():
        assert m["gauc"] is None and m["gauc_users"] is None and m["auc"] is not None
    assert out["distributed"]["auc"] == out["exact"]["auc"]


# -- memory per rank ----------------------------------------------------------------


def _memory_worker(rank: int, world: int, num_rows: int) -> dict:
    rng = np.random.default_rng(rank)
    n = num_rows // world
    users = rng.integers(0, num_rows // 20, n)
    users[rng.random(n) < 0.4] = 7  # a heavy user: hashing it would put 40% of all rows on one rank
    y = (rng.random(n) < 0.3).astype(np.float32)
    logits = (y + rng.standard_normal(n)).astype(np.float32)
    rows = {"user_id": users, "weights": np.ones(n, np.float32), "logit/t": logits, "label/t": y}
    preds = predictions(rows, ("t",))
    out: dict = {}
    for mode in ("distributed", "exact"):
        tracemalloc.start()  # numpy buffers (and the received entries, numpy-owned) are traced
        out[mode] = compute_metrics(preds, ("t",), mode=mode)["t"]
        out[f"{mode}_peak"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    # what the GAUC sort hands this rank: every entry of its key range
    t_M4 = dist_metrics._entries(users, logits, y)
    received = dist_metrics._exchange(t_M4, dist_metrics._cuts(t_M4, dist_metrics._splitters(t_M4, None)), None)
    out["entries"], out["received"] = len(t_M4), len(received)
    return out


@pytest.mark.slow
def test_distributed_memory_per_rank_is_o_n_over_w() -> None:
    num_rows = 240_000
    peaks = {}
    for world in (2, 3):
        out = run_ranks(_memory_worker, world, num_rows)
        assert out[0]["distributed"]["auc"] == out[0]["exact"]["auc"]
        peaks[world] = max(o["distributed_peak"] for o in out)
        exact_peak = max(o["exact_peak"] for o in out)
        # the meter sees O(N) arrays: the exact path sorts all N float64 scores
        assert exact_peak > 8 * num_rows
        # the largest array: the entries a rank receives (~M / W, M <= N), whatever the skew
        total = sum(o["entries"] for o in out)
        samples = min(dist_metrics.OVERSAMPLE * world, dist_metrics.MAX_SAMPLES)
        assert max(o["received"] for o in out) <= total / world + 2 * (total / samples + world)
        # working memory per local row stays a constant: no array of N rows
        assert peaks[world] < 120 * num_rows / world  # measured: ~72 bytes per local row
    # one more rank, proportionally less memory per rank (2/3 ideally)
    assert peaks[3] < 0.8 * peaks[2]
