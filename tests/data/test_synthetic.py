"""Synthetic source: schema, determinism, positive rates, and a signal a linear model learns."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from data.build import build_dataset
from data.columns import Dataset
from data.loaders.in_memory import TrainLoader, eval_batches
from data.sources.synthetic import SyntheticConfig, load_synthetic

SMALL = {"num_train": 3000, "num_val": 500, "num_test": 500, "num_users": 100}


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Rank formula (Mann-Whitney U), ties broken by order (fine for continuous scores)."""
    ranks = np.empty(len(scores))
    ranks[np.argsort(scores, kind="stable")] = np.arange(1, len(scores) + 1)
    pos = labels == 1
    num_pos, num_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg))


def test_auc_formula() -> None:
    assert auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert auc(np.array([1.0, 2.0, 3.0]), np.array([0, 1, 1])) == 1.0


def test_schema_and_shapes() -> None:
    cfg = SyntheticConfig(**SMALL, num_sparse=3, vocab_sizes=[7, 50], num_multi_hot=2, num_dense=5)
    d = load_synthetic(cfg)
    assert d.spec.tasks == ("task0", "task1", "task2", "task3")
    assert d.spec.sparse_names == ("user_id", "cat_0", "cat_1", "cat_2", "tags_0", "tags_1")
    assert [f.num_embeddings for f in d.spec.sparse] == [101, 8, 51, 8, 5001, 5001]
    assert [f.multi_hot for f in d.spec.sparse] == [False] * 4 + [True] * 2
    assert d.spec.dense_names == tuple(f"dense_{i}" for i in range(5)) and d.spec.has_user_id
    assert (len(d.train), len(d.val), len(d.test)) == (3000, 500, 500)
    for split in (d.train, d.val, d.test):
        assert split.dense.shape == (len(split), 5) and split.dense.dtype == np.float32
        assert split.user_id is not None and split.user_id.min() >= 1 and split.user_id.max() <= 100
        for f in d.spec.sparse:
            col = split.sparse[f.name]
            assert len(col) == len(split)
            assert col.values.min() >= 0 and col.values.max() < f.num_embeddings
        for t in d.spec.tasks:
            assert set(np.unique(split.labels[t])) <= {0.0, 1.0}
    lengths = np.diff(d.train.sparse["tags_0"].offsets)
    assert lengths.min() == 0 and lengths.max() == cfg.max_multi_hot_len  # variable, empty bags included
    assert (d.train.sparse["cat_1"].values == 0).any()  # missing_rate -> id 0
    assert np.array_equal(d.train.sparse["user_id"].values, d.train.user_id)
    np.testing.assert_allclose(d.train.dense.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(d.train.dense.std(axis=0), 1.0, atol=1e-4)


def _arrays(d: Dataset) -> list[np.ndarray]:
    out = []
    for split in (d.train, d.val, d.test):
        out += [split.dense, split.user_id, *split.labels.values()]
        out += [a for c in split.sparse.values() for a in (c.values, c.offsets)]
    return out


def test_deterministic_for_a_seed() -> None:
    a, b = load_synthetic(SyntheticConfig(**SMALL)), load_synthetic(SyntheticConfig(**SMALL))
    for x, y in zip(_arrays(a), _arrays(b), strict=True):
        assert np.array_equal(x, y)
    c = load_synthetic(SyntheticConfig(**SMALL, seed=1))
    assert not np.array_equal(a.train.labels["task0"], c.train.labels["task0"])


def test_positive_rates_match_targets() -> None:
    d = load_synthetic(SyntheticConfig(num_train=40_000, num_val=100, num_test=100, num_tasks=6))
    targets = [0.3, 0.1, 0.02, 0.005, 0.3, 0.1]  # default cycled
    assert list(d.info["target_positive_rates"].values()) == targets  # type: ignore[attr-defined]
    assert min(targets) < 0.01
    for t, target in zip(d.spec.tasks, targets, strict=True):
        rate = d.train.labels[t].mean()
        assert abs(rate - target) < 4 * np.sqrt(target * (1 - target) / 40_000) + 1e-4, (t, rate, target)
    # tasks are correlated but not copies of each other
    assert not np.array_equal(d.train.labels["task0"], d.train.labels["task4"])


def test_custom_names_and_rates() -> None:
    cfg = SyntheticConfig(**SMALL, num_tasks=2, task_names=["ctr", "cvr"], positive_rates=[0.5, 0.05])
    d = load_synthetic(cfg)
    assert d.spec.tasks == ("ctr", "cvr")
    assert abs(d.train.labels["ctr"].mean() - 0.5) < 0.05


@pytest.mark.parametrize(
    "bad",
    [
        {"positive_rates": [0.1, 0.2]},
        {"positive_rates": [0.1, 0.2, 1.0, 0.1]},
        {"task_names": ["a", "a", "b", "c"]},
        {"num_tasks": 0},
        {"num_train": 0},
        {"vocab_sizes": []},
        {"task_correlation": 1.5},
        {"num_clusters": -1},
        {"num_clusters": 4, "cluster_weight": 1.5},
    ],
)
def test_invalid_config(bad: dict) -> None:
    with pytest.raises(ValueError, match="data\\."):
        load_synthetic(SyntheticConfig(**{**SMALL, **bad}))


def test_structured_config_and_registry() -> None:
    node = OmegaConf.merge(OmegaConf.structured(SyntheticConfig), {**SMALL, "positive_rates": [0.2, 0.1, 0.05, 0.01]})
    cfg = OmegaConf.to_object(node)
    assert isinstance(cfg, SyntheticConfig)
    d = build_dataset(cfg)
    assert d.spec.name == "synthetic" and len(d.train) == 3000


def test_logistic_regression_learns_every_task() -> None:
    """Per-id weights + a linear dense layer (a logistic regression on one-hot ids)."""
    d = load_synthetic(SyntheticConfig(num_train=30_000, num_val=100, num_test=10_000))
    num_tasks = len(d.spec.tasks)
    torch.manual_seed(0)
    bags = torch.nn.ModuleDict(
        {
            f.name: torch.nn.EmbeddingBag(f.num_embeddings, num_tasks, mode="sum", include_last_offset=True)
            for f in d.spec.sparse
        }
    )
    for bag in bags.values():
        torch.nn.init.zeros_(bag.weight)
    linear = torch.nn.Linear(d.spec.num_dense, num_tasks)
    opt = torch.optim.Adam([*bags.parameters(), *linear.parameters()], lr=0.05)

    def logits(batch) -> torch.Tensor:
        out = linear(batch.dense)
        sparse = batch.sparse.to_dict()
        for name in d.spec.sparse_names:
            out = out + bags[name](sparse[name].values(), sparse[name].offsets())
        return out

    for batch in itertools.islice(TrainLoader(d.train, spec=d.spec, batch_size=512, seed=0), 400):
        labels = torch.stack([batch.labels[t] for t in d.spec.tasks], dim=1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits(batch), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        test = next(eval_batches(d.test, spec=d.spec, batch_size=len(d.test)))
        scores = logits(test).numpy()
    for i, t in enumerate(d.spec.tasks):
        labels = d.test.labels[t]
        assert labels.sum() >= 30, "too few positives for a stable AUC"
        assert auc(scores[:, i], labels) > 0.7, t


def _fit_logistic(x: np.ndarray, y: np.ndarray, steps: int = 300) -> tuple[np.ndarray, float]:
    """Logistic regression `(w, b)` by full-batch Adam steps."""
    torch.manual_seed(0)
    w, b = torch.zeros(x.shape[1], requires_grad=True), torch.zeros((), requires_grad=True)
    xt, yt = torch.from_numpy(x).float(), torch.from_numpy(y).float()
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(steps):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xt @ w + b, yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return w.detach().numpy(), float(b.detach())


def test_clusters_keep_features_and_change_labels() -> None:
    plain = load_synthetic(SyntheticConfig(**SMALL))
    clustered = load_synthetic(SyntheticConfig(**SMALL, num_clusters=8))
    for x, y in zip(_arrays(plain), _arrays(clustered), strict=True):
        if x.dtype != np.float32 or x.ndim != 1:  # features and ids: identical
            assert np.array_equal(x, y)
    changed = [not np.array_equal(plain.train.labels[t], clustered.train.labels[t]) for t in plain.spec.tasks]
    assert all(changed)
    user_c, item_c = clustered.info["user_cluster"], clustered.info["item_cluster"]
    assert user_c.shape == (SMALL["num_users"] + 1,) and user_c[0] == -1 and set(user_c[1:]) == set(range(8))
    assert item_c.shape == (10 + 1,) and item_c[0] == -1 and item_c[1:].max() < 8  # cat_0 vocabulary 10
    assert "user_cluster" not in plain.info
    # val / test rows carry their (user cluster, item cluster) pair, one code per pair; train none
    assert clustered.train.clusters is None and plain.val.clusters is None
    for split in (clustered.val, clustered.test):
        items = split.sparse["cat_0"].values  # single-hot
        pairs = list(zip(user_c[split.user_id].tolist(), item_c[items].tolist(), strict=True))
        codes = split.clusters.tolist()  # type: ignore[union-attr]
        assert len(set(pairs)) == len(set(codes)) == len(set(zip(pairs, codes, strict=True))) > 8


def test_label_function_differs_by_cluster() -> None:
    """On the dense features alone (ids left out), one logistic regression per user
    cluster beats a pooled one on held-out rows: the read-out differs by cluster."""
    cfg = SyntheticConfig(
        num_train=40_000, num_val=100, num_test=20_000, num_users=400, num_tasks=1, positive_rates=[0.3],
        num_clusters=4, cluster_weight=1.0, interaction=0.0, num_sparse=0, num_multi_hot=0,
    )  # fmt: skip
    d = load_synthetic(cfg)
    cluster = d.info["user_cluster"]
    train_c, test_c = cluster[d.train.user_id], cluster[d.test.user_id]
    y_train, y_test = d.train.labels["task0"], d.test.labels["task0"]
    w_pool, b_pool = _fit_logistic(d.train.dense, y_train)
    pooled_scores = d.test.dense @ w_pool + b_pool
    pooled = auc(pooled_scores, y_test)
    scores = np.zeros(len(d.test))
    for c in range(4):
        w, b = _fit_logistic(d.train.dense[train_c == c], y_train[train_c == c])
        scores[test_c == c] = d.test.dense[test_c == c] @ w + b
    per_cluster = np.mean([auc(scores[test_c == c], y_test[test_c == c]) for c in range(4)])
    pooled_per_cluster = np.mean([auc(pooled_scores[test_c == c], y_test[test_c == c]) for c in range(4)])
    assert per_cluster > 0.7 and per_cluster > pooled + 0.05 and per_cluster > pooled_per_cluster + 0.05
