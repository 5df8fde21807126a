"""The capacity-binding generator (`python -m data.generate --kind clusters`,
data/generators/clusters.py): layout and schema, every task at >= 2% positives, hundreds of
latent cluster pairs with their own non-linear label functions, noisy cluster proxies,
labels that only a pair-aware model can rank, and `conf/data/capacity_logs.yaml`
streaming the files."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from omegaconf import OmegaConf

from data.build import build_dataset, build_train_loader
from data.generators import clusters as cl
from data.generators.logs import generate, parse_args
from data.sources.parquet_stream import ParquetStreamConfig
from tests.data.test_generate import _auc, _split

ROWS = 40_000
ARGS = ["--kind", "clusters", "--rows", str(ROWS), "--files", "2", "--row-group-size", "5000", "--val-rows", "20000"]
ARGS += ["--test-rows", "5000", "--users", "2000", "--items", "500"]


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("clusters")
    generate(parse_args([*ARGS, "--out", str(path)]))
    return path


def _world() -> cl.ClusterWorld:
    return cl.build_cluster_world(cl.ClusterLogsConfig(users=2000, items=500))


def test_layout_schema_and_rates(out: Path) -> None:
    assert {p.name for p in out.iterdir()} >= {"train", "val", "test", "vocab.parquet", "stats.json", "meta.json"}
    train = _split(out, "train")
    assert train.num_rows == ROWS and _split(out, "val").num_rows == 20_000
    for c in ("user_id", "item_id"):
        assert train.schema.field(c).type == pa.int64()
        assert int(pc_min(train, c)) >= 1
    for t, rate in zip(cl.TASKS, cl.RATES, strict=True):
        assert train.schema.field(t).type == pa.int8()
        got = float(train.column(t).to_numpy().mean())
        assert rate >= 0.02 and abs(got - rate) < 0.25 * rate + 0.003, (t, got)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["args"]["kind"] == "clusters"
    stats = json.loads((out / "stats.json").read_text())
    assert set(stats["columns"]) == {f"dense_{i}" for i in range(8)}


def pc_min(table: pa.Table, column: str) -> int:
    return int(table.column(column).to_numpy().min())


def test_hundreds_of_cluster_pairs_and_noisy_proxies(out: Path) -> None:
    train = _split(out, "train")
    uc, ic = train.column("user_cluster").to_numpy(), train.column("item_cluster").to_numpy()
    assert len(np.unique(uc.astype(np.int64) * 32 + ic)) > 900, "nearly all 32 x 32 pairs occur"
    agree = (train.column("user_segment").to_numpy() == uc).mean()
    assert 0.70 < agree < 0.85, agree  # 1 - noise + noise / C = 0.758 by users; rows weight popular users
    assert 0.70 < (train.column("item_category").to_numpy() == ic).mean() < 0.85
    # a user's cluster is fixed: every row of one user carries the same cluster
    users = train.column("user_id").to_numpy()
    first = {}
    for u, c in zip(users[:5000].tolist(), uc[:5000].tolist(), strict=True):
        assert first.setdefault(u, c) == c


def test_pair_functions_are_non_linear_and_differ_by_pair() -> None:
    w = _world()
    rng = np.random.default_rng(0)
    rows = cl._draw(w, rng, 60_000)
    _, pair_NT = cl._parts(w, rows)
    pair = w.user_cluster[rows.user_rank] * 32 + w.item_cluster[rows.item_rank]
    big = np.bincount(pair).argsort()[-5:]  # the most frequent pairs
    r2, slopes = [], []
    for p in big:
        m = pair == p
        x = np.c_[rows.x_ND[m], np.eye(cl.NUM_CTX_A)[rows.ctx_a[m]]]
        y = pair_NT[m, 0]
        coef, *_ = np.linalg.lstsq(x, y, rcond=None)
        r2.append(1 - np.var(y - x @ coef) / np.var(y))
        slopes.append(coef[:8])
    assert max(r2) < 0.9, r2  # a linear function of the context does not fit one pair
    cos = [abs(a @ b) / np.linalg.norm(a) / np.linalg.norm(b) for a, b in itertools.combinations(slopes, 2)]
    assert max(cos) < 0.95, cos  # pairs read the context differently


def test_labels_need_the_pair(out: Path) -> None:
    """The generator's own scores (rebuilt from the seed) rank the val labels far better
    than its additive part alone: most of the signal is pair-specific."""
    w = _world()
    val = _split(out, "val")
    rows = []
    for c, start in enumerate(range(0, val.num_rows, 262_144)):  # data/generators/logs.py's chunking of val
        n = min(262_144, val.num_rows - start)
        rows.append(cl._draw(w, np.random.default_rng([0, 1, 0, c]), n))
    assert len(rows) == 1
    r = rows[0]
    np.testing.assert_array_equal(w.user_perm[r.user_rank] + 1, val.column("user_id").to_numpy())
    scores = cl.scores(w, r)
    additive, _ = cl._parts(w, r)
    for t, task in enumerate(cl.TASKS[:2]):
        y = val.column(task).to_numpy()
        full, add = _auc(y, scores[:, t]), _auc(y, additive[:, t])
        assert full > 0.85 and full - add > 0.15, (task, full, add)


def test_bad_flags_fail_naming_the_flag() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--kind", "clusters", "--rows", "10", "--out", "x", "--feature-noise", "2"])
    with pytest.raises(ValueError, match="--user-clusters"):
        cl.ClusterLogsConfig(user_clusters=0).check()


def test_shipped_config_streams_the_generated_layout(out: Path) -> None:
    text = Path("conf/data/capacity_logs.yaml").read_text().replace("outputs/data/capacity_logs", str(out))
    node = OmegaConf.merge(OmegaConf.structured(ParquetStreamConfig), OmegaConf.create(text))
    ds = build_dataset(OmegaConf.to_object(node))
    assert len(ds.train) == ROWS and len(ds.test) == 5000
    assert ds.spec.tasks == cl.TASKS
    assert {f.name for f in ds.spec.sparse} == set(cl.CATEGORICAL)
    assert ds.spec.num_dense == 8
    loader = build_train_loader(ds, batch_size=1024, rank=0, world_size=1, seed=0, prefetch=2)
    for batch in itertools.islice(iter(loader), 5):
        for f in ds.spec.sparse:
            ids = batch.sparse[f.name].values()
            assert int(ids.min()) >= 1 and int(ids.max()) < f.num_embeddings  # every train id is in the vocabulary
        assert abs(float(batch.dense.mean())) < 0.5
