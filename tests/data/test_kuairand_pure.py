"""KuaiRand-Pure on the shipped files (data/files/kuairand-pure) through the
`data=kuairand_pure` preset: date split, joins, labels, user ids, and no leaking feature.

The data set is loaded once per module (about 2 s); expected figures were measured on
these files and are fixed with them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from data.build import build_dataset
from data.columns import Dataset, Split
from data.sources.kuairand import KuaiRandConfig, load_kuairand

ROOT = Path(__file__).resolve().parents[2]
PRESET = ROOT / "conf" / "data" / "kuairand_pure.yaml"
TASKS = ("is_click", "long_view", "is_like", "is_profile_enter", "is_comment", "is_follow")
# Outcomes of the impression (and bookkeeping) in the shipped logs; none may be a feature.
LEAKING = (
    "play_time_ms", "profile_stay_time", "comment_stay_time", "watch_ratio", "finish", "like",
    "long_watch", "is_positive", "is_forward", "is_hate", "source_file", *TASKS,
)  # fmt: skip
TRAIN_DATES = [f"202204{d}" for d in range(25, 31)] + [f"2022050{d}" for d in range(1, 6)]
ROWS = {"train": 185_061, "val": 13_834, "test": 29_434}
USERS = {"train": 24_448, "val": 7_695, "test": 12_576}


def preset_config(**changes: object) -> KuaiRandConfig:
    """The preset as the trainer builds it, with its project-relative paths made absolute."""
    node = OmegaConf.merge(OmegaConf.structured(KuaiRandConfig), OmegaConf.load(PRESET), changes)
    cfg = OmegaConf.to_object(node)
    assert isinstance(cfg, KuaiRandConfig)
    cfg.log_files = [str(ROOT / p) for p in cfg.log_files]
    cfg.user_features = str(ROOT / str(cfg.user_features))
    cfg.video_features = [str(ROOT / p) for p in cfg.video_features]
    return cfg


@pytest.fixture(scope="module")
def pure() -> Dataset:
    return build_dataset(preset_config())


@pytest.fixture(scope="module")
def raw() -> pa.Table:
    """The shipped logs, concatenated in config order."""
    return pa.concat_tables([pq.read_table(p) for p in preset_config().log_files])


def _raw_split(raw: pa.Table, dates: list[int]) -> dict[str, np.ndarray]:
    keep = np.isin(raw.column("date").to_numpy(), dates)
    return {c: raw.column(c).to_numpy()[keep] for c in ("user_id", "video_id", *TASKS)}


def _dense(d: Dataset, split: Split, name: str) -> np.ndarray:
    """A dense column undone: standardisation, then the signed log1p."""
    i = d.spec.dense_names.index(name)
    stats = d.info["dense_stats"]
    x = split.dense[:, i].astype(np.float64) * stats["std"][i] + stats["mean"][i]  # type: ignore[index]
    return np.sign(x) * np.expm1(np.abs(x))


def test_preset_names_the_shipped_files() -> None:
    node = OmegaConf.load(PRESET)
    assert node.name == "kuairand" and node.dataset_name == "kuairand_pure"
    for p in [*node.log_files, node.user_features, *node.video_features]:
        assert (ROOT / p).is_file(), p
    for p in ("README.md", "LICENSE"):
        assert (ROOT / "data" / "files" / "kuairand-pure" / p).is_file()


def test_date_split(pure: Dataset) -> None:
    assert pure.spec.name == "kuairand_pure"
    assert pure.info["train_dates"] == TRAIN_DATES
    assert pure.info["val_dates"] == ["20220506"]
    assert pure.info["test_dates"] == ["20220507", "20220508"]
    for name in ("train", "val", "test"):
        split = pure.split(name)
        assert len(split) == ROWS[name]
        assert split.user_id is not None and len(np.unique(split.user_id)) == USERS[name]


def test_labels_and_user_ids_are_the_logs(pure: Dataset, raw: pa.Table) -> None:
    """Rows keep log order inside each split; labels and `user_id` are the log's columns."""
    dates = {
        "train": [int(d) for d in TRAIN_DATES],
        "val": [20220506],
        "test": [20220507, 20220508],
    }
    assert pure.spec.tasks == TASKS and pure.spec.has_user_id
    for name, split_dates in dates.items():
        split, expected = pure.split(name), _raw_split(raw, split_dates)
        assert np.array_equal(split.user_id, expected["user_id"])  # type: ignore[arg-type]
        for task in TASKS:
            assert np.array_equal(split.labels[task], expected[task].astype(np.float32)), (name, task)


def test_positive_rates(pure: Dataset) -> None:
    """Rates over all rows from the data README: 44.2% .. 0.13%; recorded per split."""
    total = sum(ROWS.values())
    expected = {"is_click": 0.442, "long_view": 0.311, "is_like": 0.0171, "is_profile_enter": 0.0185,
                "is_comment": 0.0025, "is_follow": 0.0013}  # fmt: skip
    stats = pure.info["label_stats"]
    for task, rate in expected.items():
        pooled = sum(stats[s][task]["positive_rate"] * stats[s][task]["rows"] for s in ROWS) / total  # type: ignore[index]
        assert abs(pooled - rate) < 0.0006, (task, pooled)
        assert {s: stats[s][task]["rows"] for s in ROWS} == ROWS  # type: ignore[index]
    test_y = pure.test.labels["is_follow"]
    assert stats["test"]["is_follow"]["positive_rate"] == pytest.approx(float(test_y.mean()))  # type: ignore[index]


def test_every_task_has_users_with_both_classes_in_test(pure: Dataset) -> None:
    """GAUC needs users with both classes; even is_follow (0.15%) has some."""
    user = pure.test.user_id
    assert user is not None
    _, inverse = np.unique(user, return_inverse=True)
    rows = np.bincount(inverse)
    for task in TASKS:
        positives = np.bincount(inverse, weights=pure.test.labels[task])
        assert ((positives > 0) & (positives < rows)).sum() >= 30, task


def test_no_leaking_column_is_a_feature(pure: Dataset, raw: pa.Table) -> None:
    features = set(pure.spec.sparse_names) | set(pure.spec.dense_names)
    assert set(LEAKING) <= set(raw.column_names)  # the shipped logs do hold them
    assert not features & set(LEAKING)
    assert {"user_id", "video_id", "hourmin", "author_id", "tag", "register_days"} <= features


@pytest.mark.parametrize(
    ("key", "column"),
    [("log_dense", "watch_ratio"), ("log_dense", "play_time_ms"), ("log_categorical", "finish"),
     ("log_categorical", "source_file"), ("log_categorical", "is_hate"), ("log_dense", "is_like")],
)  # fmt: skip
def test_leaking_column_is_refused(key: str, column: str) -> None:
    with pytest.raises(ValueError, match=rf"data.{key}: column '{column}' is .*; it cannot be a feature"):
        load_kuairand(preset_config(**{key: ["user_id", column] if key == "log_categorical" else [column]}))


def test_joins_by_id(pure: Dataset, raw: pa.Table) -> None:
    """Every log row finds its user and video; joined values are the tables' values."""
    assert pure.info["rows_without_user_features"] == 0
    assert list(pure.info["rows_without_video_features"].values()) == [0]  # type: ignore[union-attr]
    assert pure.info["feature_sources"]["register_days"] == "user"  # type: ignore[index]
    assert pure.info["feature_sources"]["author_id"] == "video0"  # type: ignore[index]
    cfg = preset_config()
    users = pacsv.read_csv(str(cfg.user_features))
    videos = pacsv.read_csv(cfg.video_features[0])
    register = dict(zip(users["user_id"].to_pylist(), users["register_days"].to_pylist(), strict=True))
    height = dict(zip(videos["video_id"].to_pylist(), videos["server_height"].to_pylist(), strict=True))
    test_raw = _raw_split(raw, [20220507, 20220508])
    expected_register = np.array([register[u] for u in test_raw["user_id"]], dtype=np.float64)
    expected_height = np.array([height[v] for v in test_raw["video_id"]], dtype=np.float64)
    np.testing.assert_allclose(_dense(pure, pure.test, "register_days"), expected_register, rtol=1e-4)
    np.testing.assert_allclose(_dense(pure, pure.test, "server_height"), expected_height, rtol=1e-4)
