"""AUC / GAUC / NE against brute-force definitions, the cross-rank gather, eval_mode.

The references here share no code with `trainer/evaluation/metrics.py`: AUC by counting every
(positive, negative) pair (ties 1/2), GAUC by looping over users, NE by its formula.
The 2- and 3-rank agreement of both evaluation modes is in `test_dist_metrics.py`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from torchrec.metrics.auc import compute_auc

from tests._dist import run_ranks
from tests.trainer.metric_refs import brute_auc, brute_gauc
from trainer.config import build_run_config
from trainer.evaluation.distributed import ne_sums
from trainer.evaluation.metrics import (
    Predictions,
    auc,
    compute_metrics,
    gauc,
    normalized_entropy,
    resolve_mode,
    task_metrics,
)

CONF = Path(__file__).resolve().parents[2] / "conf"


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
    expected, num_users = brute_gauc(s, y, users)
    assert gauc(s, y, users) == pytest.approx(expected, abs=1e-12)
    assert task_metrics({"logit/t": s, "label/t": y, "user_id": users}, ("t",))["t"]["gauc_users"] == num_users


def test_normalized_entropy() -> None:
    y = np.array([0, 0, 0, 1], dtype=np.float32)
    assert normalized_entropy(np.full(4, 0.25), y) == pytest.approx(1.0)  # base rate = no information
    assert normalized_entropy(np.array([0.01, 0.01, 0.01, 0.99]), y) < 0.1
    assert normalized_entropy(np.full(4, 0.5), np.zeros(4)) is None
    p = np.array([0.2, 0.6, 0.1, 0.7])  # log loss by hand over the entropy of rate 1/4
    loss = -(np.log(0.8) + np.log(0.4) + np.log(0.9) + np.log(0.7)) / 4
    assert normalized_entropy(p, y) == pytest.approx(loss / -(0.25 * np.log(0.25) + 0.75 * np.log(0.75)), rel=1e-12)


def test_ne_sums_add_up_over_chunks(scored) -> None:
    s, y, _ = scored
    whole = ne_sums(s, y, chunk=len(s))
    np.testing.assert_allclose(ne_sums(s, y, chunk=7), whole, rtol=1e-12)
    p = np.clip(1 / (1 + np.exp(-s)), 1e-7, 1 - 1e-7)
    assert whole[0] == pytest.approx(-(y * np.log(p) + (1 - y) * np.log(1 - p)).sum(), rel=1e-12)


@pytest.mark.parametrize("mode", ["exact", "distributed", "auto"])
def test_compute_metrics_matches_brute_force_in_one_process(scored, mode: str) -> None:
    s, y, users = scored
    s, y = s.astype(np.float32), y.astype(np.float32)
    preds = Predictions(("t", "none"))
    weights = torch.ones(len(y))
    weights[-100:] = 0.0  # padding: dropped
    half = len(y) // 2
    for lo, hi in ((0, half), (half, len(y))):
        logits = {"t": torch.tensor(s[lo:hi]), "none": torch.tensor(s[lo:hi])}
        labels = {"t": torch.tensor(y[lo:hi]), "none": torch.zeros(hi - lo)}
        preds.add(logits, labels, weights[lo:hi], torch.tensor(users[lo:hi]))
    m = compute_metrics(preds, ("t", "none"), mode=mode)
    s, y, users = s[:-100].astype(np.float64), y[:-100], users[:-100]
    expected_gauc, num_users = brute_gauc(s, y, users)
    assert m["t"]["auc"] == pytest.approx(brute_auc(s, y), abs=1e-12)
    assert m["t"]["gauc"] == pytest.approx(expected_gauc, abs=1e-12)
    assert m["t"]["gauc_users"] == num_users and m["t"]["num_rows"] == len(y)
    assert m["t"]["positive_rate"] == pytest.approx(y.mean(dtype=np.float64), rel=1e-12)
    assert m["none"]["auc"] is None and m["none"]["gauc"] is None and m["none"]["ne"] is None


def test_auto_mode_switches_above_the_threshold() -> None:
    assert resolve_mode("auto", num_rows=2_000_000, num_ranks=2) == "exact"
    assert resolve_mode("auto", num_rows=2_000_001, num_ranks=2) == "distributed"
    assert resolve_mode("auto", num_rows=10**9, num_ranks=1) == "exact"  # one rank: nothing to split
    assert resolve_mode("distributed", num_rows=1, num_ranks=1) == "distributed"
    with pytest.raises(ValueError, match="trainer.eval_mode"):
        compute_metrics(Predictions(("t",)), ("t",), mode="binned")


def test_eval_mode_config_is_validated() -> None:
    def run_config(*overrides: str):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return build_run_config(compose(config_name="config", overrides=list(overrides)))

    assert run_config().trainer.eval_mode == "auto"
    assert run_config("trainer.eval_mode=distributed").trainer.eval_mode == "distributed"
    with pytest.raises(ValueError, match="trainer.eval_mode"):
        run_config("trainer.eval_mode=binned")


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
    assert metrics["t"]["auc"] == pytest.approx(brute_auc(expected, rows["label/t"]), abs=1e-12)
