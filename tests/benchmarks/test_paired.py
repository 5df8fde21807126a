"""`benchmarks/paired.py`: the AUC, DeLong and bootstrap-replicate math against brute force
and `trainer.evaluation.metrics`, the bootstrap standard error against DeLong's, and `compare` /
`interval` on prediction parquet files (identical models, a clearly better one, rows that
do not match)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from benchmarks import paired
from trainer.evaluation import metrics


def _brute_auc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> float:
    num = den = 0.0
    for i in np.flatnonzero(labels == 1):
        for j in np.flatnonzero(labels == 0):
            psi = 1.0 if scores[i] > scores[j] else 0.5 if scores[i] == scores[j] else 0.0
            num += weights[i] * weights[j] * psi
            den += weights[i] * weights[j]
    return num / den


def _tied_data(n: int, seed: int, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """k score rows on n rows, rounded to 1 decimal (many ties), and 0/1 labels."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.4).astype(np.int8)
    scores = np.round(labels * rng.uniform(0.5, 1.5, (k, 1)) + rng.normal(size=(k, n)), 1)
    return scores, labels


def test_auc_equals_pair_count_with_ties_and_weights() -> None:
    scores, labels = _tied_data(150, seed=0)
    s = scores[0]
    assert len(np.unique(s)) < 80  # ties are exercised
    assert paired.auc(s, labels) == metrics.auc(s, labels)  # the project's AUC, bit for bit
    assert paired.auc(s, labels) == pytest.approx(_brute_auc(s, labels, np.ones(len(s))), rel=1e-12)
    w = np.random.default_rng(1).uniform(0, 3, len(s)) * (np.arange(len(s)) % 7 != 0)  # zeros too
    assert paired.auc(s, labels, w) == pytest.approx(_brute_auc(s, labels, w), rel=1e-12)
    counts = np.random.default_rng(2).integers(0, 4, len(s))  # w copies of a row = weight w
    rows = np.repeat(np.arange(len(s)), counts)
    assert paired.auc(s, labels, counts) == pytest.approx(metrics.auc(s[rows], labels[rows]), rel=1e-12)
    assert math.isnan(paired.auc(s, np.zeros(len(s))))
    assert math.isnan(paired.auc(s, labels, w * (labels == 0)))  # positives weigh nothing


@pytest.mark.parametrize("k", [2, 3])
def test_delong_equals_brute_force_structural_components(k: int) -> None:
    scores, labels = _tied_data(200, seed=k, k=k)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    m, n = len(pos), len(neg)
    v10, v01 = np.zeros((k, m)), np.zeros((k, n))
    for c in range(k):
        for a, i in enumerate(pos):
            for b, j in enumerate(neg):
                psi = 1.0 if scores[c, i] > scores[c, j] else 0.5 if scores[c, i] == scores[c, j] else 0.0
                v10[c, a] += psi / n
                v01[c, b] += psi / m
    aucs = v10.mean(axis=1)
    s10 = (v10 - aucs[:, None]) @ (v10 - aucs[:, None]).T / (m - 1)
    s01 = (v01 - aucs[:, None]) @ (v01 - aucs[:, None]).T / (n - 1)
    got_aucs, got_cov = paired.delong(scores, labels)
    np.testing.assert_allclose(got_aucs, aucs, rtol=1e-12)
    np.testing.assert_allclose(got_cov, s10 / m + s01 / n, rtol=1e-10)
    assert got_aucs[0] == pytest.approx(paired.auc(scores[0], labels), rel=1e-12)


@pytest.mark.parametrize("ties", [True, False])
def test_bootstrap_replicates_equal_weighted_auc_and_duplicated_users(ties: bool) -> None:
    """`bootstrap` replicate r is `auc(scores, labels, W[r])` for its Poisson row weights
    and the GAUC of the data with each user's rows repeated V[r, u] times."""
    n, num_users, n_boot, seed = 600, 40, 6, 3
    scores, labels = _tied_data(n, seed=4, k=2)
    if not ties:
        scores = scores + np.random.default_rng(5).normal(scale=1e-3, size=scores.shape)
    users = np.random.default_rng(6).integers(0, num_users, n)
    ranked = [paired.RankedScores(s, labels, users, num_users) for s in scores]
    assert ranked[0].ties == ties
    for rs, s in zip(ranked, scores, strict=True):
        assert rs.auc == metrics.auc(s, labels)
        assert (rs.gauc, rs.gauc_users) == pytest.approx(metrics.gauc_and_users(s, labels, users), rel=1e-12)
    aucs, gaucs = paired.bootstrap(ranked, n, num_users, n_boot, np.random.default_rng(seed))
    row_rng, user_rng = np.random.default_rng(seed).spawn(2)  # the draws `bootstrap` makes
    W, V = paired.poisson1(row_rng, (n_boot, n)), paired.poisson1(user_rng, (n_boot, num_users))
    assert gaucs is not None
    for k, s in enumerate(scores):
        np.testing.assert_allclose(aucs[k], [paired.auc(s, labels, w) for w in W], rtol=1e-12)
        for r in range(n_boot):
            rows = np.repeat(np.arange(n), V[r, users])
            copy = np.concatenate([np.arange(c) for c in V[r, users]])  # a repeated user is a new user
            assert gaucs[k, r] == pytest.approx(metrics.gauc(s[rows], labels[rows], users[rows] * 100 + copy))
    # one class weighs nothing -> NaN, not an error
    only_neg = np.where(labels == 1, 0, 1).astype(np.uint8)[None]
    assert math.isnan(ranked[0].weighted_aucs(only_neg)[0])


def test_poisson1_counts_are_poisson() -> None:
    w = paired.poisson1(np.random.default_rng(0), (1_000_000,))
    assert w.dtype == np.uint8
    pmf = [math.exp(-1) / math.factorial(k) for k in range(6)]
    np.testing.assert_allclose(np.bincount(w)[:6] / len(w), pmf, atol=2e-3)
    assert w.mean() == pytest.approx(1, abs=5e-3) and w.var() == pytest.approx(1, abs=1e-2)


def _table(scores: dict[str, np.ndarray], labels: dict[str, np.ndarray], users: np.ndarray | None) -> pa.Table:
    cols: dict[str, np.ndarray] = {} if users is None else {"user_id": users}
    cols |= {t: 1 / (1 + np.exp(-s)) for t, s in scores.items()}  # probabilities, as trainer.predict writes
    cols |= {f"label_{t}": y.astype(np.int8) for t, y in labels.items()}
    return pa.table(cols)


def _write(path: Path, table: pa.Table) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def test_bootstrap_se_of_a_difference_is_close_to_delong(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    n = 4000
    y = (rng.random(n) < 0.3).astype(np.int8)
    common = rng.normal(size=n)  # shared noise: the two models' errors correlate
    sa, sb = y + common + 0.8 * rng.normal(size=n), 0.8 * y + common + 0.8 * rng.normal(size=n)
    a = _write(tmp_path / "a.parquet", _table({"t": sa}, {"t": y}, None))
    b = _write(tmp_path / "b.parquet", _table({"t": sb}, {"t": y}, None))
    res = paired.compare([a], [b], n_boot=400, seed=1)
    m = res["metrics"]["auc/t"]
    _, cov = paired.delong(np.stack([sa, sb]), y)
    delong_se = math.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    assert m["se_delong"] == pytest.approx(delong_se, rel=1e-9)
    assert 0.75 < m["se_test"] / delong_se < 1.25
    assert m["diff"] == pytest.approx(metrics.auc(sa, y) - metrics.auc(sb, y), abs=1e-12)
    assert m["se_seed"] == 0 and m["se"] == m["se_test"]  # one seed
    assert "mean_gauc" not in res["metrics"] and res["n_users"] is None


def _runs(tmp_path: Path, name: str, strength: float, seeds: list[int], y: dict, users: np.ndarray) -> list[Path]:
    """Prediction files of one model: task scores `strength * label + noise` per seed."""
    out = []
    for s in seeds:
        rng = np.random.default_rng(1000 * s + int(strength * 10))
        scores = {t: strength * lab + rng.normal(size=len(lab)) for t, lab in y.items()}
        out.append(_write(tmp_path / name / f"seed{s}.parquet", _table(scores, y, users)))
    return out


@pytest.fixture
def data() -> tuple[dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(11)
    n = 3000
    y = {"click": (rng.random(n) < 0.3).astype(np.int8), "like": (rng.random(n) < 0.1).astype(np.int8)}
    return y, rng.integers(0, 150, n)


def test_compare_identical_models_has_zero_difference(tmp_path: Path, data: tuple) -> None:
    y, users = data
    a = _runs(tmp_path, "a", 1.0, [1, 2], y, users)
    res = paired.compare(a, list(a), n_boot=50, seed=0)
    assert res["tasks"] == ["click", "like"] and res["n_rows"] == 3000 and res["n_users"] == 150
    assert res["positives"] == {t: int(v.sum()) for t, v in y.items()}
    names = {"mean_auc", "mean_gauc", "auc/click", "auc/like", "gauc/click", "gauc/like"}
    assert set(res["metrics"]) == names
    for name, m in res["metrics"].items():
        assert m["diff"] == 0 and m["se"] == 0 and m["ci95"] == [0, 0] and not m["significant"], name
        assert m["unit"] == ("users" if "gauc" in name else "impressions")
    tables = [pq.read_table(p) for p in a]
    for t in y:
        want_auc = np.mean([metrics.auc(tb[t].to_numpy(), y[t]) for tb in tables])
        want_gauc = np.mean([metrics.gauc(tb[t].to_numpy(), y[t], users) for tb in tables])
        assert res["metrics"][f"auc/{t}"]["a"] == pytest.approx(want_auc, rel=1e-12)
        assert res["metrics"][f"gauc/{t}"]["b"] == pytest.approx(want_gauc, rel=1e-12)
    mean_auc = np.mean([res["metrics"][f"auc/{t}"]["a"] for t in y])
    assert res["metrics"]["mean_auc"]["a"] == pytest.approx(mean_auc, rel=1e-12)


def test_compare_finds_a_clearly_better_model(tmp_path: Path, data: tuple) -> None:
    y, users = data
    a = _runs(tmp_path, "a", 1.5, [1, 2, 3], y, users)
    b = _runs(tmp_path, "b", 0.0, [1, 2, 3], y, users)  # noise
    res = paired.compare(a, b, n_boot=50, seed=0)
    for name, m in res["metrics"].items():
        assert m["significant"] and m["diff"] > 0.2 and m["ci95"][0] > 0, name
        d = np.subtract(m["per_seed"]["a"], m["per_seed"]["b"])
        assert m["diff"] == pytest.approx(d.mean())
        assert m["se_seed"] == pytest.approx(d.std(ddof=1) / math.sqrt(3))
        assert m["se"] == pytest.approx(math.hypot(m["se_test"], m["se_seed"]))
        assert m["ci95"] == pytest.approx([m["diff"] - 1.96 * m["se"], m["diff"] + 1.96 * m["se"]])
        assert m["mde"] == pytest.approx(2.8 * m["se_test"]) and m["se_test"] > 0 and m["n_boot"] == 50
    # seeded: the same seed gives the same intervals, another seed other ones
    assert paired.compare(a, b, n_boot=50, seed=0) == res
    assert paired.compare(a, b, n_boot=50, seed=1)["metrics"]["mean_auc"]["se_test"] != pytest.approx(
        res["metrics"]["mean_auc"]["se_test"], rel=1e-9
    )


def test_compare_rejects_runs_on_other_rows(tmp_path: Path, data: tuple) -> None:
    y, users = data
    a = _runs(tmp_path, "a", 1.0, [1, 2], y, users)
    flipped = {t: v.copy() for t, v in y.items()}
    flipped["like"][5] = 1 - flipped["like"][5]
    bad = _runs(tmp_path, "flipped", 1.0, [2], flipped, users)[0]
    with pytest.raises(ValueError, match=rf"{bad}: label_like differs"):
        paired.compare(a, [a[0], bad], n_boot=10)
    short = _write(tmp_path / "short.parquet", pq.read_table(a[1]).slice(0, 100))
    with pytest.raises(ValueError, match=rf"{short}: 100 rows"):
        paired.compare(a, [a[0], short], n_boot=10)
    other_users = _runs(tmp_path, "users", 1.0, [2], y, users[::-1].copy())[0]
    with pytest.raises(ValueError, match=rf"{other_users}: user_id differs"):
        paired.compare(a, [a[0], other_users], n_boot=10)
    with pytest.raises(ValueError, match="same number"):
        paired.compare(a, a[:1], n_boot=10)


def test_interval_and_cli(tmp_path: Path, data: tuple, capsys: pytest.CaptureFixture[str]) -> None:
    y, users = data
    a = _runs(tmp_path, "a", 1.0, [1, 2, 3], y, users)
    run_dirs = []
    for i, p in enumerate(a):  # a run directory stands for RUN/predictions/test.parquet
        run_dirs.append(tmp_path / f"run{i}")
        _write(run_dirs[-1] / "predictions" / "test.parquet", pq.read_table(p))
    res = paired.interval(run_dirs, ["click"], n_boot=50, seed=0)
    assert set(res["metrics"]) == {"mean_auc", "mean_gauc", "auc/click", "gauc/click"}
    m = res["metrics"]["mean_auc"]
    assert m["mean"] == pytest.approx(np.mean(m["per_seed"]))
    assert m["se_seed"] == pytest.approx(np.std(m["per_seed"], ddof=1) / math.sqrt(3))
    assert m["ci95"][0] < m["mean"] < m["ci95"][1] and m["se_test"] > 0
    click = res["metrics"]["auc/click"]
    assert click["se_test"] / click["se_delong"] == pytest.approx(1, abs=0.4)
    out = tmp_path / "out.json"
    paired.main(["--a", *map(str, a[:2]), "--b", *map(str, a[1:]), "--n-boot", "20", "--out", str(out)])
    assert "| mean_auc |" in capsys.readouterr().out
    assert set(json.loads(out.read_text())["metrics"]) >= {"mean_auc", "gauc/like"}


def test_group_index_user_column_gives_the_same_gauc(tmp_path: Path, data: tuple) -> None:
    """Sources without key columns name users by their group index (`user`, trainer.predict):
    the same GAUC figures as with raw `user_id` values."""
    y, users = data
    a, b = _runs(tmp_path, "a", 1.0, [1], y, users), _runs(tmp_path, "b", 0.5, [1], y, users)

    def renamed(paths: list[Path], name: str) -> list[Path]:
        out = []
        for p in paths:
            t = pq.read_table(p)
            t = t.rename_columns(["user" if c == "user_id" else c for c in t.column_names])
            out.append(_write(tmp_path / name / p.name, t))
        return out

    raw = paired.compare(a, b, n_boot=20, seed=0)
    grouped = paired.compare(renamed(a, "ga"), renamed(b, "gb"), n_boot=20, seed=0)
    assert grouped["n_users"] == raw["n_users"] == 150
    assert grouped["metrics"]["mean_gauc"] == raw["metrics"]["mean_gauc"]
