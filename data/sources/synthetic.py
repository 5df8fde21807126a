"""Seeded synthetic multi-task data with a learnable signal (tests, smoke runs, benchmarks).

Generative model, all drawn from one `numpy` generator seeded by `seed`:

- ids: `user_id` (1..num_users), `num_sparse` single-hot features with vocabulary sizes
  cycled from `vocab_sizes`, and `num_multi_hot` multi-hot features whose rows hold
  0..max_multi_hot_len ids (empty bags included). Popularity is Zipf-like (`zipf`), as
  in real logs; `missing_rate` of the single-hot cells are id 0 (missing). Id 0 is
  never a real id, so the vocabularies need no train-only pass.
- every id has a latent vector `v` of size `latent_dim`; a row's representation is
  `h = sum of its single-hot vectors + mean of each bag's vectors + x W` (`x`: the
  `num_dense` dense columns, standard normal before a per-column scale and shift).
- task t reads `h` through `a_t = sqrt(rho) a_shared + sqrt(1 - rho) a_own_t`
  (`rho = task_correlation`), plus a non-additive user x first-feature term
  `interaction * <u_user * v_item, a_t>`, which only factorised models can fit.
  Each task's score is scaled to standard deviation `signal`.
- label: `1[score_t + logistic noise > c_t]` = Bernoulli(sigmoid(score_t - c_t)); `c_t`
  is the `1 - rate_t` quantile over all rows, so each task's positive rate matches
  `positive_rates` (default: cycled from 30%, 10%, 2%, 0.5%).

Clusters (`num_clusters` C > 0, off by default): every user and every `cat_0` id belongs
to one of C latent clusters (uniform, seeded). Each user cluster and each item cluster
has its own task read-out `A[c]` (drawn like `a`, with the same task correlation), and
a row reads `h` (and the interaction term) through
`sqrt(1 - w) a + sqrt(w / 2) (A_user[c_user] + A_item[c_item])` (`w = cluster_weight`).
The label function thus differs by cluster: a model must tell the clusters apart from
the user and item embeddings and fit C different functions of the other features, which
is where expert capacity (and routing by cluster) can pay off. The cluster draws come
from their own generator, so the features are exactly those of `num_clusters=0`; only
the labels change. `info["user_cluster"]` / `info["item_cluster"]` hold the assignments
(index = id; id 0, missing, has cluster -1); `Split.clusters` is each row's (user
cluster, item cluster) pair, for the cluster-expert NMI of evaluation.

The additive part is what a logistic regression on one-hot ids and dense columns can
learn, which the tests check (AUC well above 0.5 for every task). Splits are
consecutive blocks of the i.i.d. rows. Dense columns are standardised with train
statistics like every other source.

Legend: N rows, K latent dim, T tasks, Dn dense columns, C clusters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from data.columns import Dataset, SparseColumn, Split, standardize_dense
from data.spec import DatasetSpec, SparseFeature

DEFAULT_RATES = (0.3, 0.1, 0.02, 0.005)


@dataclass(kw_only=True)
class SyntheticConfig:
    """Config of the synthetic source.

    Attributes:
        num_tasks: number of tasks.
        task_names: task names (default `task0..task{T-1}`).
        positive_rates: per-task positive rate (default cycled from 0.3, 0.1, 0.02, 0.005).
        num_train, num_val, num_test: split sizes.
        num_users: distinct users (`user_id` feature and GAUC groups).
        num_sparse: single-hot features besides user_id (`cat_<i>`).
        vocab_sizes: their vocabulary sizes, cycled over the features.
        num_multi_hot: multi-hot features (`tags_<i>`), each over
            `multi_hot_vocab_size` ids with 0..max_multi_hot_len ids per row.
        num_dense: dense columns.
        latent_dim: size of the latent id vectors.
        signal: standard deviation of each task's score (higher = easier).
        task_correlation: share of the task read-out shared by all tasks, in [0, 1].
        interaction: weight of the non-additive user x cat_0 term.
        zipf: id popularity exponent (0 = uniform).
        missing_rate: share of single-hot cells that are id 0.
        num_clusters: latent user / item clusters with their own task read-outs (0 = off;
            see the module doc).
        cluster_weight: share of the read-out that is cluster-specific, in [0, 1].
        seed: generator seed.
    """

    name: str = "synthetic"
    num_tasks: int = 4
    task_names: list[str] | None = None
    positive_rates: list[float] | None = None
    num_train: int = 100_000
    num_val: int = 20_000
    num_test: int = 20_000
    num_users: int = 2_000
    num_sparse: int = 6
    vocab_sizes: list[int] = field(default_factory=lambda: [10, 100, 1_000, 10_000])
    num_multi_hot: int = 2
    multi_hot_vocab_size: int = 5_000
    max_multi_hot_len: int = 8
    num_dense: int = 8
    latent_dim: int = 8
    signal: float = 3.0
    task_correlation: float = 0.5
    interaction: float = 0.5
    zipf: float = 1.05
    missing_rate: float = 0.01
    num_clusters: int = 0
    cluster_weight: float = 0.8
    seed: int = 2026


def _task_setup(cfg: SyntheticConfig) -> tuple[list[str], list[float]]:
    if cfg.num_tasks < 1:
        raise ValueError(f"data.num_tasks must be >= 1, got {cfg.num_tasks}")
    names = cfg.task_names if cfg.task_names is not None else [f"task{t}" for t in range(cfg.num_tasks)]
    if len(names) != cfg.num_tasks or len(set(names)) != len(names):
        raise ValueError(f"data.task_names={names} must be {cfg.num_tasks} distinct names")
    if cfg.positive_rates is None:
        rates = [DEFAULT_RATES[t % len(DEFAULT_RATES)] for t in range(cfg.num_tasks)]
    else:
        rates = list(cfg.positive_rates)
    if len(rates) != cfg.num_tasks or not all(0.0 < r < 1.0 for r in rates):
        raise ValueError(f"data.positive_rates={rates} must be {cfg.num_tasks} rates in (0, 1)")
    return list(names), rates


def _check(cfg: SyntheticConfig) -> None:
    sizes = {"num_train": cfg.num_train, "num_users": cfg.num_users, "latent_dim": cfg.latent_dim}
    for key, value in sizes.items():
        if value < 1:
            raise ValueError(f"data.{key} must be >= 1, got {value}")
    if min(cfg.num_val, cfg.num_test, cfg.num_sparse, cfg.num_multi_hot, cfg.num_dense) < 0:
        raise ValueError("data.num_val, num_test, num_sparse, num_multi_hot and num_dense must be >= 0")
    if cfg.num_sparse and (not cfg.vocab_sizes or min(cfg.vocab_sizes) < 1):
        raise ValueError(f"data.vocab_sizes={cfg.vocab_sizes} must be non-empty and >= 1")
    if cfg.num_multi_hot and (cfg.multi_hot_vocab_size < 1 or cfg.max_multi_hot_len < 1):
        raise ValueError("data.multi_hot_vocab_size and data.max_multi_hot_len must be >= 1")
    if not 0.0 <= cfg.task_correlation <= 1.0 or not 0.0 <= cfg.missing_rate < 1.0:
        raise ValueError("data.task_correlation must be in [0, 1] and data.missing_rate in [0, 1)")
    if cfg.num_clusters < 0 or not 0.0 <= cfg.cluster_weight <= 1.0:
        raise ValueError(
            f"data.num_clusters must be >= 0 and data.cluster_weight in [0, 1], "
            f"got {cfg.num_clusters} and {cfg.cluster_weight}"
        )


def _zipf_ids(rng: np.random.Generator, vocab: int, n: int, exponent: float) -> np.ndarray:
    """`[n]` ids in 1..vocab with Zipf-like popularity (popular ids spread over the range)."""
    p = 1.0 / np.arange(1, vocab + 1, dtype=np.float64) ** exponent
    ranks = rng.choice(vocab, size=n, p=p / p.sum())
    return rng.permutation(vocab)[ranks].astype(np.int64) + 1


def _latent(rng: np.random.Generator, vocab: int, dim: int) -> np.ndarray:
    """`[vocab + 1, K]` id vectors; row 0 (missing) is zero."""
    v = rng.normal(size=(vocab + 1, dim)) / np.sqrt(dim)
    v[0] = 0.0
    return v


def _readouts(rng: np.random.Generator, num: int, dim: int, num_tasks: int, rho: float) -> np.ndarray:
    """`[num, K, T]` task read-outs, tasks correlated by `rho` within each one."""
    shared = rng.normal(size=(num, dim, 1))
    return np.sqrt(rho) * shared + np.sqrt(1.0 - rho) * rng.normal(size=(num, dim, num_tasks))


@dataclass
class Clusters:
    """Cluster assignments (index = id, -1 for id 0) and the per-row read-outs `[N, K, T]`."""

    user: np.ndarray
    item: np.ndarray | None
    readout_NKT: np.ndarray


def _clusters(
    cfg: SyntheticConfig, a_KT: np.ndarray, users_N: np.ndarray, items_N: np.ndarray | None, item_vocab: int
) -> Clusters:
    """Per-row read-outs mixing the global `a_KT` with the row's user / item cluster read-outs."""
    rng = np.random.default_rng([cfg.seed, 1])  # own stream: the features stay those of num_clusters=0
    C, (K, T), w = cfg.num_clusters, a_KT.shape, cfg.cluster_weight
    user_c = np.concatenate([[-1], rng.integers(0, C, size=cfg.num_users)])
    a_user_CKT = _readouts(rng, C, K, T, cfg.task_correlation)
    part_NKT = a_user_CKT[user_c[users_N]]
    item_c = None
    if items_N is not None:
        item_c = np.concatenate([[-1], rng.integers(0, C, size=item_vocab)])
        a_item_CKT = _readouts(rng, C, K, T, cfg.task_correlation)
        # missing item (id 0): the user part alone
        part_NKT = np.where((items_N > 0)[:, None, None], part_NKT + a_item_CKT[item_c[items_N]], part_NKT)
        part_NKT /= np.sqrt(2.0)
    readout_NKT = np.sqrt(1.0 - w) * a_KT[None] + np.sqrt(w) * part_NKT
    return Clusters(user=user_c, item=item_c, readout_NKT=readout_NKT)


def _generate(
    cfg: SyntheticConfig, rates: list[float]
) -> tuple[Split, list[SparseFeature], np.ndarray, Clusters | None]:
    """All rows (train, val, test consecutive), the per-task thresholds `c_t` and the
    clusters (None when `num_clusters` is 0)."""
    rng = np.random.default_rng(cfg.seed)
    n, k = cfg.num_train + cfg.num_val + cfg.num_test, cfg.latent_dim
    features, sparse = [], {}
    h_NK = np.zeros((n, k))

    users_N = _zipf_ids(rng, cfg.num_users, n, cfg.zipf)
    user_vec = _latent(rng, cfg.num_users, k)
    h_NK += user_vec[users_N]
    features.append(SparseFeature(name="user_id", num_embeddings=cfg.num_users + 1))
    sparse["user_id"] = SparseColumn.single_hot(users_N)

    item_vec_NK = np.zeros((n, k))
    items_N: np.ndarray | None = None
    for i in range(cfg.num_sparse):
        vocab = cfg.vocab_sizes[i % len(cfg.vocab_sizes)]
        ids_N = _zipf_ids(rng, vocab, n, cfg.zipf)
        ids_N[rng.random(n) < cfg.missing_rate] = 0
        vec = _latent(rng, vocab, k)[ids_N]
        h_NK += vec
        if i == 0:
            item_vec_NK, items_N = vec, ids_N
        features.append(SparseFeature(name=f"cat_{i}", num_embeddings=vocab + 1))
        sparse[f"cat_{i}"] = SparseColumn.single_hot(ids_N)

    for i in range(cfg.num_multi_hot):
        lengths_N = rng.integers(0, cfg.max_multi_hot_len + 1, size=n)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths_N, out=offsets[1:])
        values = _zipf_ids(rng, cfg.multi_hot_vocab_size, int(offsets[-1]), cfg.zipf)
        cum = np.zeros((len(values) + 1, k))
        np.cumsum(_latent(rng, cfg.multi_hot_vocab_size, k)[values], axis=0, out=cum[1:])
        h_NK += (cum[offsets[1:]] - cum[offsets[:-1]]) / np.maximum(lengths_N, 1)[:, None]
        features.append(SparseFeature(name=f"tags_{i}", num_embeddings=cfg.multi_hot_vocab_size + 1, multi_hot=True))
        sparse[f"tags_{i}"] = SparseColumn(values=values, offsets=offsets)

    x_ND = rng.normal(size=(n, cfg.num_dense))
    h_NK += x_ND @ (rng.normal(size=(cfg.num_dense, k)) / np.sqrt(max(cfg.num_dense, 1)))
    dense = x_ND * rng.uniform(0.5, 5.0, size=cfg.num_dense) + rng.normal(scale=3.0, size=cfg.num_dense)

    num_tasks, rho = len(rates), cfg.task_correlation
    a_KT = np.sqrt(rho) * rng.normal(size=(k, 1)) + np.sqrt(1.0 - rho) * rng.normal(size=(k, num_tasks))
    uv_NK = (user_vec[users_N] * item_vec_NK) * np.sqrt(k)
    clusters = None
    if cfg.num_clusters:
        clusters = _clusters(cfg, a_KT, users_N, items_N, cfg.vocab_sizes[0] if cfg.num_sparse else 0)
        score_NT = np.einsum("nk,nkt->nt", h_NK + cfg.interaction * uv_NK, clusters.readout_NKT)
    else:
        score_NT = h_NK @ a_KT + cfg.interaction * uv_NK @ a_KT
    score_NT *= cfg.signal / np.maximum(score_NT.std(axis=0), 1e-12)
    noisy_NT = score_NT + rng.logistic(size=score_NT.shape)
    thresholds_T = np.array([np.quantile(noisy_NT[:, t], 1.0 - r) for t, r in enumerate(rates)])
    labels_NT = (noisy_NT > thresholds_T).astype(np.float32)
    full = Split(
        dense=dense.astype(np.float32),
        sparse=sparse,
        labels={str(t): labels_NT[:, t] for t in range(num_tasks)},
        user_id=users_N,
    )
    if clusters is not None:  # the row's (user cluster, item cluster) pair, -1 (missing item) a cluster of its own
        item_N = np.full(n, -1) if clusters.item is None or items_N is None else clusters.item[items_N]
        full.clusters = ((clusters.user[users_N] + 1) * (cfg.num_clusters + 1) + item_N + 1).astype(np.int64)
    return full, features, thresholds_T, clusters


def synthetic_names(cfg: SyntheticConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(tasks, sparse features) from the config alone (see `data.build.declared_names`)."""
    names, _ = _task_setup(cfg)
    features = ["user_id", *(f"cat_{i}" for i in range(cfg.num_sparse))]
    features += [f"tags_{i}" for i in range(cfg.num_multi_hot)]
    return tuple(names), tuple(features)


def load_synthetic(cfg: SyntheticConfig) -> Dataset:
    """Generate the dataset (deterministic for a given config)."""
    _check(cfg)
    names, rates = _task_setup(cfg)
    full, features, thresholds_T, clusters = _generate(cfg, rates)
    full.labels = {name: full.labels[str(t)] for t, name in enumerate(names)}
    bounds = np.cumsum([0, cfg.num_train, cfg.num_val, cfg.num_test])
    train, val, test = (full.take(np.arange(lo, hi)) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True))
    train.clusters = None  # evaluation's (the cluster-expert NMI): training batches do not carry them
    stats = standardize_dense(train, val, test)
    spec = DatasetSpec(
        name=cfg.name,
        sparse=tuple(features),
        dense_names=tuple(f"dense_{i}" for i in range(cfg.num_dense)),
        tasks=tuple(names),
        has_user_id=True,
    )
    info: dict[str, object] = {
        "dense_stats": stats,
        "target_positive_rates": dict(zip(names, rates, strict=True)),
        "positive_rates": {t: float(train.labels[t].mean()) for t in names},
        "label_thresholds": dict(zip(names, thresholds_T.tolist(), strict=True)),
    }
    if clusters is not None:
        info["user_cluster"], info["item_cluster"] = clusters.user, clusters.item
    return Dataset(spec=spec, train=train, val=val, test=test, info=info)
