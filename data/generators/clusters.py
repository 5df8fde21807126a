"""Impression logs where expert capacity binds: `python -m data.generate --kind clusters`.

SMES claims that a larger expert pool buys quality at a fixed activated compute. That can
only show on data whose label function has more structure than a small network without experts can
hold. Here every user belongs to one of `Cu` latent user clusters and every item to one
of `Ci` item clusters, and each of the `Cu * Ci` cluster pairs (1,024 by default) has
its own non-linear label function of the row's context:

    score_t = signal * (sqrt(1 - w) * additive_t + sqrt(w) * g_{pair, t}(x, ctx_a))
    g_pair(x, ctx_a) = W2_pair^T tanh(W1_pair^T x + e_pair[ctx_a] + b_pair)   (H tanh units)
    additive_t = user bias + item bias + ctx_b effect (what one embedding per id learns)
    label_t ~ Bernoulli(sigmoid(score_t + a_t))

- `x`: `D` standard-normal context columns, written as `dense_i = scale_i x_i + shift_i`;
  `ctx_a` (10 values) enters the pair functions, `ctx_b` (20 values) only the additive part.
- The pair functions are drawn independently per pair (`W1 ~ N(0, gain^2 / D)`, so the
  tanh units saturate); the tasks of one pair share a read-out direction with weight
  `task_correlation`, as in `data/sources/synthetic.py`.
- Both parts are standardised per task on a 200k-row calibration sample, so `w`
  (`cluster_weight`) is the share of the score's variance that is pair-specific.
- `a_t` (intercepts) are solved by bisection on the same sample for `RATES` (20%, 10%,
  5%, 2%: every task has at least 2% positives, so a 500k-row test split holds 10k
  positives of the rarest task).
- Clusters are latent, with noisy observed proxies, as user segments and item categories
  are in real logs: `user_segment` is the user's cluster for a share `1 - feature_noise`
  of the users (fixed per user) and a random cluster otherwise, `item_category` likewise.
  A model reads the pair from these and from the id embeddings, then must fit that
  pair's function: fitting 1,024 different non-linear functions is what needs capacity. The assignments are
  written as the columns `user_cluster` and `item_cluster` (not features) so that expert
  specialisation can be measured against them.
- User and item ids follow truncated power laws (exponents `USER_ALPHA`, `ITEM_ALPHA`)
  mapped to ids by a seeded permutation, ids from 1.

Legend: N rows of a chunk, D context columns, H tanh units, T tasks, P cluster pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from data.generators.draws import power_law

TASKS = ("task0", "task1", "task2", "task3")
RATES = (0.20, 0.10, 0.05, 0.02)
CATEGORICAL = ("user_id", "item_id", "user_segment", "item_category", "ctx_a", "ctx_b")
NUM_CTX_A, NUM_CTX_B = 10, 20
USER_ALPHA, ITEM_ALPHA = 0.5, 0.5


@dataclass(frozen=True, kw_only=True)
class ClusterLogsConfig:
    """Shape of the generated world (`python -m data.generate --kind clusters` flags)."""

    users: int = 10_000
    items: int = 2_000
    user_clusters: int = 32
    item_clusters: int = 32
    dense: int = 8
    hidden: int = 8
    gain: float = 2.0
    cluster_weight: float = 0.8
    task_correlation: float = 0.5
    signal: float = 3.0
    feature_noise: float = 0.25
    seed: int = 0

    def check(self) -> None:
        for key in ("users", "items", "user_clusters", "item_clusters", "dense", "hidden"):
            if getattr(self, key) < 1:
                raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(self, key)}")
        for key in ("cluster_weight", "task_correlation", "feature_noise"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"--{key.replace('_', '-')} must be in [0, 1], got {getattr(self, key)}")

    @property
    def dense_columns(self) -> tuple[str, ...]:
        return tuple(f"dense_{i}" for i in range(self.dense))


@dataclass
class ClusterWorld:
    """Per-id and per-pair tables, fixed by the seed (O(users + items + P H D))."""

    cfg: ClusterLogsConfig
    user_perm: np.ndarray  # popularity rank -> user id - 1
    item_perm: np.ndarray
    user_cluster: np.ndarray  # by rank
    item_cluster: np.ndarray
    user_segment: np.ndarray  # by rank: the noisy proxy of user_cluster
    item_category: np.ndarray
    user_bias_UT: np.ndarray
    item_bias_VT: np.ndarray
    ctx_b_effect_T: np.ndarray  # [NUM_CTX_B, T]
    w1_PDH: np.ndarray
    e_PAH: np.ndarray  # ctx_a offsets of the pre-activations
    b_PH: np.ndarray
    w2_PHT: np.ndarray
    dense_scale: np.ndarray
    dense_shift: np.ndarray
    moments: np.ndarray  # [4, T]: additive mean, std, pair-part mean, std (calibration sample)
    intercepts_T: np.ndarray

    @property
    def tasks(self) -> tuple[str, ...]:
        return TASKS

    @property
    def categorical(self) -> tuple[str, ...]:
        return CATEGORICAL

    @property
    def multi_hot(self) -> tuple[str, ...]:
        return ()

    @property
    def dense(self) -> tuple[str, ...]:
        return self.cfg.dense_columns


def build_cluster_world(cfg: ClusterLogsConfig) -> ClusterWorld:
    cfg.check()
    rng = np.random.default_rng([cfg.seed, 7])
    T, D, H = len(TASKS), cfg.dense, cfg.hidden
    P = cfg.user_clusters * cfg.item_clusters
    rho = cfg.task_correlation
    shared_PH1 = rng.normal(size=(P, H, 1))
    user_cluster = rng.integers(0, cfg.user_clusters, cfg.users)
    item_cluster = rng.integers(0, cfg.item_clusters, cfg.items)
    noisy_u, noisy_v = rng.random(cfg.users) < cfg.feature_noise, rng.random(cfg.items) < cfg.feature_noise
    w = ClusterWorld(
        cfg=cfg,
        user_perm=rng.permutation(cfg.users),
        item_perm=rng.permutation(cfg.items),
        user_cluster=user_cluster,
        item_cluster=item_cluster,
        user_segment=np.where(noisy_u, rng.integers(0, cfg.user_clusters, cfg.users), user_cluster),
        item_category=np.where(noisy_v, rng.integers(0, cfg.item_clusters, cfg.items), item_cluster),
        user_bias_UT=rng.normal(size=(cfg.users, T)).astype(np.float32),
        item_bias_VT=rng.normal(size=(cfg.items, T)).astype(np.float32),
        ctx_b_effect_T=rng.normal(scale=0.5, size=(NUM_CTX_B, T)).astype(np.float32),
        w1_PDH=(rng.normal(size=(P, D, H)) * cfg.gain / np.sqrt(D)).astype(np.float32),
        e_PAH=rng.normal(scale=0.5 * cfg.gain, size=(P, NUM_CTX_A, H)).astype(np.float32),
        b_PH=rng.normal(scale=0.5, size=(P, H)).astype(np.float32),
        w2_PHT=(np.sqrt(rho) * shared_PH1 + np.sqrt(1 - rho) * rng.normal(size=(P, H, T))).astype(np.float32),
        dense_scale=rng.uniform(0.5, 5.0, D),
        dense_shift=rng.normal(scale=3.0, size=D),
        moments=np.array([np.zeros(T), np.ones(T), np.zeros(T), np.ones(T)]),
        intercepts_T=np.zeros(T),
    )
    _calibrate(w)
    return w


@dataclass
class _Rows:
    user_rank: np.ndarray
    item_rank: np.ndarray
    x_ND: np.ndarray
    ctx_a: np.ndarray
    ctx_b: np.ndarray


def _draw(w: ClusterWorld, rng: np.random.Generator, n: int) -> _Rows:
    cfg = w.cfg
    return _Rows(
        user_rank=power_law(rng, cfg.users, USER_ALPHA, n),
        item_rank=power_law(rng, cfg.items, ITEM_ALPHA, n),
        x_ND=rng.standard_normal((n, cfg.dense), dtype=np.float32),
        ctx_a=rng.integers(0, NUM_CTX_A, n),
        ctx_b=rng.integers(0, NUM_CTX_B, n),
    )


def _parts(w: ClusterWorld, r: _Rows) -> tuple[np.ndarray, np.ndarray]:
    """(`[N, T]` additive part, `[N, T]` pair part), raw (before standardisation)."""
    additive = w.user_bias_UT[r.user_rank] + w.item_bias_VT[r.item_rank] + w.ctx_b_effect_T[r.ctx_b]
    pair = w.user_cluster[r.user_rank] * w.cfg.item_clusters + w.item_cluster[r.item_rank]
    pre_NH = np.einsum("nd,ndh->nh", r.x_ND, w.w1_PDH[pair]) + w.e_PAH[pair, r.ctx_a] + w.b_PH[pair]
    return additive, np.einsum("nh,nht->nt", np.tanh(pre_NH), w.w2_PHT[pair])


def scores(w: ClusterWorld, r: _Rows) -> np.ndarray:
    """`[N, T]` logits without the intercepts."""
    add, pair = _parts(w, r)
    m, cw = w.moments, w.cfg.cluster_weight
    z = np.sqrt(1 - cw) * (add - m[0]) / m[1] + np.sqrt(cw) * (pair - m[2]) / m[3]
    return (w.cfg.signal * z).astype(np.float32)


def _calibrate(w: ClusterWorld) -> None:
    """Standardisation moments and the intercepts that hit RATES (bisection), on 200k rows."""
    rows = _draw(w, np.random.default_rng([w.cfg.seed, 8]), 200_000)
    add, pair = _parts(w, rows)
    w.moments = np.array([add.mean(0), add.std(0), pair.mean(0), pair.std(0)])
    s_NT = scores(w, rows).astype(np.float64)
    for t, rate in enumerate(RATES):
        lo, hi = -30.0, 30.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if (1 / (1 + np.exp(-(s_NT[:, t] + mid)))).mean() < rate else (lo, mid)
        w.intercepts_T[t] = (lo + hi) / 2


def chunk_table(w: ClusterWorld, rng: np.random.Generator, n: int, date: np.ndarray) -> pa.Table:
    """`n` impressions as a table (columns: see the module doc)."""
    r = _draw(w, rng, n)
    logits_NT = scores(w, r) + w.intercepts_T.astype(np.float32)
    labels_NT = rng.random(logits_NT.shape) < 1 / (1 + np.exp(-logits_NT))
    dense = r.x_ND * w.dense_scale.astype(np.float32) + w.dense_shift.astype(np.float32)
    cols: dict[str, pa.Array] = {
        "user_id": pa.array(w.user_perm[r.user_rank].astype(np.int64) + 1),
        "item_id": pa.array(w.item_perm[r.item_rank].astype(np.int64) + 1),
        "user_segment": pa.array(w.user_segment[r.user_rank].astype(np.int32)),
        "item_category": pa.array(w.item_category[r.item_rank].astype(np.int32)),
        "ctx_a": pa.array(r.ctx_a.astype(np.int32)),
        "ctx_b": pa.array(r.ctx_b.astype(np.int32)),
        "date": pa.array(date.astype(np.int32)),
    }
    cols.update({c: pa.array(dense[:, i]) for i, c in enumerate(w.dense)})
    cols.update({t: pa.array(labels_NT[:, i].astype(np.int8)) for i, t in enumerate(TASKS)})
    cols["user_cluster"] = pa.array(w.user_cluster[r.user_rank].astype(np.int16))
    cols["item_cluster"] = pa.array(w.item_cluster[r.item_rank].astype(np.int16))
    return pa.table(cols)
