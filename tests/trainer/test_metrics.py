"""AUC / GAUC / NE against brute-force definitions, and the cross-rank gather."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchrec.metrics.auc import compute_auc

from tests._dist import run_ranks
from trainer.metrics import Predictions, auc, gauc, normalized_entropy, task_metrics


def brute_auc(s: np.ndarray, y: np.ndarray) -> float:
    p, n = s[y > 0.5], s[y <= 0.5]
    wins = (p[:, None] > n[None]).sum() + 0.5 * (p[:, None] == n[None]).sum()
    return float(wins / (len(p) * len(n)))


@pytest.fixture
def scored() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = (rng.random(2000) < 0.3).astype(np.float32)
    s = np.round(y * 0.8 + rng.standard_normal(2000), 1)  # rounded: many ties
    users = rng.integers(0, 50, 2000)
    return s, y, users


def test_auc_matches_pairwise_definition_with_ties(scored) -> None:
    s, y, _ = scored
    assert auc(s, y) == pytest.approx(brute_auc(s, y), abs=1e-12)
    assert auc(-s, y) == pytest.approx(1 - brute_auc(s, y), abs=1e-12)


def test_auc_agrees_with_torchrec_on_distinct_scores(scored) -> None:
    _, y, _ = scored
    s = np.random.default_rng(1).standard_normal(len(y)) + y
    ours = auc(s, y)
    theirs = compute_auc(
        1,
        [torch.tensor(s)[None]],
        [torch.tensor(y, dtype=torch.float64)[None]],
        [torch.ones(1, len(y), dtype=torch.float64)],
    )
    assert ours == pytest.approx(float(theirs[0]), abs=1e-6)


def test_auc_undefined_for_one_class() -> None:
    assert auc(np.array([0.1, 0.2]), np.array([1.0, 1.0])) is None


def test_gauc_is_impression_weighted_mean_of_user_aucs(scored) -> None:
    s, y, users = scored
    users = users.copy()
    users[:5] = 999  # one user with a single class is skipped
    y = y.copy()
    y[:5] = 1.0
    vals, weights = [], []
    for u in np.unique(users):
        m = users == u
        if 0 < y[m].sum() < m.sum():
            vals.append(brute_auc(s[m], y[m]))
            weights.append(m.sum())
    assert gauc(s, y, users) == pytest.approx(np.average(vals, weights=weights), abs=1e-12)


def test_normalized_entropy() -> None:
    y = np.array([0, 0, 0, 1], dtype=np.float32)
    assert normalized_entropy(np.full(4, 0.25), y) == pytest.approx(1.0)  # base rate = no information
    assert normalized_entropy(np.array([0.01, 0.01, 0.01, 0.99]), y) < 0.1
    assert normalized_entropy(np.full(4, 0.5), np.zeros(4)) is None


def _gather_worker(rank: int, world: int) -> dict:
    rng = np.random.default_rng(rank)
    preds = Predictions(("t",))
    for _ in range(2):
        logits = torch.tensor(rng.standard_normal(8), dtype=torch.float32)
        labels = torch.tensor(rng.integers(0, 2, 8), dtype=torch.float32)
        weights = torch.ones(8)
        weights[6:] = 0.0  # padding rows must be dropped
        users = torch.arange(8) + 100 * rank
        preds.add({"t": logits}, {"t": labels}, weights, users)
    return {"local": (torch.cat(preds._logits["t"]), torch.cat(preds._weights)), "rows": preds.gather()}


@pytest.mark.slow
def test_gather_collects_every_rank_without_padding() -> None:
    out = run_ranks(_gather_worker, 2)
    rows = out[0]["rows"]
    expected = torch.cat([o["local"][0][o["local"][1] > 0] for o in out]).numpy()
    np.testing.assert_array_equal(rows["logit/t"], expected)
    np.testing.assert_array_equal(out[1]["rows"]["logit/t"], expected)  # every rank sees all rows
    assert len(rows["user_id"]) == 24 and set(rows["user_id"] // 100) == {0, 1}
    metrics = task_metrics(rows, ("t",))
    assert metrics["t"]["num_rows"] == 24
    assert metrics["t"]["auc"] == pytest.approx(auc(rows["logit/t"], rows["label/t"]))
