"""The KuaiRand-shaped generator: layout, schema, row and row-group counts, positive rates,
power-law ids, a learnable signal, its vocabulary / statistics files, and the shipped
`conf/data/parquet_stream.yaml` reading its output."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from data.build import build_dataset, build_train_loader
from data.generators.logs import DENSE, TASKS, build_world, generate, parse_args
from data.parsing.prepare import read_vocab
from data.sources.parquet_stream import ParquetStreamConfig

ARGS = ["--rows", "30000", "--files", "3", "--row-group-size", "4000", "--val-rows", "5000", "--test-rows", "5000"]
ARGS += ["--users", "3000", "--videos", "1500"]
RATES = {  # target rate, tolerance at 30k rows
    "is_click": (0.40, 0.03),
    "long_view": (0.25, 0.03),
    "is_like": (0.015, 0.006),
    "is_follow": (0.004, 0.003),
    "is_comment": (0.003, 0.0025),
    "is_forward": (0.002, 0.002),
}


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gen")
    generate(parse_args([*ARGS, "--out", str(path)]))
    return path


def _split(out: Path, name: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted((out / name).glob("*.parquet"))])


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    ranks = np.empty(len(s))
    ranks[np.argsort(s, kind="stable")] = np.arange(1, len(s) + 1)
    pos = y.sum()
    return float((ranks[y == 1].sum() - pos * (pos + 1) / 2) / (pos * (len(y) - pos)))


def test_layout_schema_and_row_groups(out: Path) -> None:
    files = sorted(p.name for p in (out / "train").glob("*.parquet"))
    assert files == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert {p.name for p in out.iterdir()} >= {"train", "val", "test", "vocab.parquet", "stats.json", "meta.json"}
    schema = pq.read_schema(out / "train" / files[0])
    for col in ("user_id", "video_id", "author_id", "music_id", "duration_ms", "play_time_ms"):
        assert schema.field(col).type == pa.int64()
    for col in ("user_active_degree", "video_type", "upload_type"):
        assert schema.field(col).type == pa.string()
    assert schema.field("tag").type == pa.list_(pa.int32())
    assert all(schema.field(t).type == pa.int8() for t in TASKS)
    for name, rows in (("train", 30000), ("val", 5000), ("test", 5000)):
        assert _split(out, name).num_rows == rows
    for path in (out / "train").glob("*.parquet"):
        md = pq.ParquetFile(path).metadata
        sizes = [md.row_group(g).num_rows for g in range(md.num_row_groups)]
        assert sizes[:-1] == [4000] * (len(sizes) - 1) and 0 < sizes[-1] <= 4000


def test_positive_rates_and_outcome_consistency(out: Path) -> None:
    train = _split(out, "train")
    for task, (rate, tol) in RATES.items():
        got = float(np.mean(train.column(task).to_numpy()))
        assert abs(got - rate) <= tol, (task, got)
        assert got > 0
    play, dur = train.column("play_time_ms").to_numpy(), train.column("duration_ms").to_numpy()
    np.testing.assert_array_equal(train.column("long_view").to_numpy(), play >= np.minimum(dur, 18_000))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["rows"] == {"train": 30000, "val": 5000, "test": 5000} and meta["rows_per_s"] > 0


def test_ids_follow_a_power_law(out: Path) -> None:
    train = _split(out, "train")
    users = np.sort(np.bincount(train.column("user_id").to_numpy()))[::-1]
    assert users[: len(users) // 100].sum() / users.sum() > 0.10, "top 1% of users hold far more than 1% of rows"
    videos = np.sort(np.bincount(train.column("video_id").to_numpy()))[::-1]
    ranks = np.arange(10, 300)
    slope = np.polyfit(np.log(ranks + 1), np.log(videos[ranks]), 1)[0]
    assert -1.3 < slope < -0.7, slope  # exponent 1.0 for videos


def test_dates_put_val_and_test_after_train(out: Path) -> None:
    dates = {s: _split(out, s).column("date").to_numpy() for s in ("train", "val", "test")}
    assert dates["train"].max() < dates["val"].min() and dates["val"].max() < dates["test"].min()
    assert len(np.unique(dates["train"])) > 20


def test_labels_are_learnable(out: Path) -> None:
    """Per-user plus per-video positive-rate tables fitted on train rank val rows well
    above chance (a base-rate model has AUC 0.5)."""
    train, val = _split(out, "train"), _split(out, "val")
    for task in ("is_click", "long_view", "is_like"):
        y = train.column(task).to_numpy().astype(float)
        score = np.zeros(val.num_rows)
        for key in ("user_id", "video_id"):
            ids, at = train.column(key).to_numpy(), val.column(key).to_numpy()
            size = int(max(ids.max(), at.max())) + 1
            rate = (np.bincount(ids, y, size) + 10 * y.mean()) / (np.bincount(ids, minlength=size) + 10)
            score += rate[at]
        auc = _auc(val.column(task).to_numpy(), score)
        assert auc > 0.6, (task, auc)


def test_labels_depend_on_the_latent_user_video_factors(out: Path) -> None:
    """The generator's own latent interaction score (rebuilt from the seed) ranks labels."""
    w = build_world(3000, 1500, 0)
    val = _split(out, "val")
    u = np.argsort(w.user_perm)[val.column("user_id").to_numpy()]  # id -> popularity rank
    v = np.argsort(w.video_perm)[val.column("video_id").to_numpy()]
    inter_NT = (w.u_UK[u] * w.v_VK[v]) @ w.c_TK.T
    for t, task in enumerate(("is_click", "long_view")):
        assert _auc(val.column(task).to_numpy(), inter_NT[:, t]) > 0.55, task


def test_vocab_and_stats_files_describe_train(out: Path) -> None:
    train = _split(out, "train")
    vocab = read_vocab(out / "vocab.parquet")
    users = train.column("user_id").to_numpy()
    assert sorted(int(v) for v in vocab["user_id"].to_pylist()) == sorted(np.unique(users).tolist())
    counts = np.bincount(users)
    first = int(vocab["user_id"][0].as_py())
    assert counts[first] == counts.max(), "most frequent value first"
    assert set(vocab["tag"].to_pylist()) == {str(t) for t in np.unique(train.column("tag").combine_chunks().flatten())}
    stats = json.loads((out / "stats.json").read_text())
    assert stats["rows"] == 30000
    for col in DENSE:
        x = train.column(col).to_numpy().astype(np.float64)
        assert stats["columns"][col]["mean"] == pytest.approx(x.mean(), rel=1e-9)
        assert stats["columns"][col]["std"] == pytest.approx(x.std(), rel=1e-9)


def test_same_seed_same_files(tmp_path: Path) -> None:
    small = ["--rows", "3000", "--files", "2", "--row-group-size", "500", "--val-rows", "200", "--test-rows", "200"]
    for name in ("a", "b"):
        generate(parse_args([*small, "--users", "300", "--videos", "100", "--out", str(tmp_path / name)]))
    for split in ("train", "val"):
        assert _split(tmp_path / "a", split).equals(_split(tmp_path / "b", split))


def test_shipped_config_reads_the_generated_layout(out: Path) -> None:
    text = Path("conf/data/parquet_stream.yaml").read_text().replace("outputs/data/kuairand_synth", str(out))
    node = OmegaConf.merge(OmegaConf.structured(ParquetStreamConfig), OmegaConf.create(text))
    cfg = OmegaConf.to_object(node)
    ds = build_dataset(cfg)
    assert len(ds.train) == 30000 and len(ds.val) == len(ds.test) == 5000
    assert ds.spec.tasks == TASKS
    vocab = read_vocab(out / "vocab.parquet")
    assert ds.spec.feature("user_id").num_embeddings == len(vocab["user_id"]) + 1
    loader = build_train_loader(ds, batch_size=1024, rank=1, world_size=2, seed=0, prefetch=2)
    for batch in itertools.islice(iter(loader), 20):
        for f in ds.spec.sparse:
            ids = batch.sparse[f.name].values()
            assert int(ids.min()) >= 0 and int(ids.max()) < f.num_embeddings
        assert int((batch.sparse["user_id"].values() == 0).sum()) == 0, "every train user is in the vocabulary"
        assert abs(float(batch.dense.mean())) < 1.0
