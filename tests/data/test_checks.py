"""`check_dataset` stops what no source should let through, naming split, column and row."""

from __future__ import annotations

import numpy as np
import pytest

from data.columns import Dataset, SparseColumn, Split, check_dataset
from data.spec import DatasetSpec, SparseFeature

SPEC = DatasetSpec(
    name="tiny",
    sparse=(
        SparseFeature(name="a", num_embeddings=5),
        SparseFeature(name="b", num_embeddings=3, multi_hot=True),
    ),
    dense_names=("d",),
    tasks=("y",),
    has_user_id=False,
)


def split() -> Split:
    return Split(
        dense=np.zeros((4, 1), dtype=np.float32),
        sparse={
            "a": SparseColumn.single_hot(np.array([0, 1, 2, 4])),
            "b": SparseColumn.from_lists([[1, 2], [], [0], [2]]),
        },
        labels={"y": np.array([0, 1, 0, 1], dtype=np.float32)},
    )


def dataset(**changes) -> Dataset:
    test = split()
    for k, v in changes.items():
        setattr(test, k, v)
    return Dataset(spec=SPEC, train=split(), val=split(), test=test)


def test_clean_dataset_passes() -> None:
    check_dataset(dataset())


def test_id_beyond_table_size() -> None:
    bad = {
        "a": SparseColumn.single_hot(np.array([0, 1, 2, 4])),
        "b": SparseColumn.from_lists([[1, 2], [], [3], [2]]),
    }
    with pytest.raises(ValueError, match=r"tiny/test: row 2, feature 'b': id 3 outside the table \[0, 3\)"):
        check_dataset(dataset(sparse=bad))


def test_non_finite_dense() -> None:
    dense = np.zeros((4, 1), dtype=np.float32)
    dense[3, 0] = np.inf
    with pytest.raises(ValueError, match="row 3, dense column 'd'"):
        check_dataset(dataset(dense=dense))


def test_label_outside_binary() -> None:
    with pytest.raises(ValueError, match=r"row 1, task 'y': label 2.0"):
        check_dataset(dataset(labels={"y": np.array([0, 2, 0, 1], dtype=np.float32)}))


def test_skip_policy_drops_and_counts_rows() -> None:
    dense = np.zeros((4, 1), dtype=np.float32)
    dense[3, 0] = np.nan
    bad_ids = {
        "a": SparseColumn.single_hot(np.array([0, 5, 2, 4])),  # row 1: id 5 outside [0, 5)
        "b": SparseColumn.from_lists([[1, 2], [], [0], [2]]),
    }
    labels = {"y": np.array([0.5, 1, 0, 1], dtype=np.float32)}  # row 0
    ds = dataset(dense=dense, sparse=bad_ids, labels=labels)
    check_dataset(ds, "skip")
    assert len(ds.test) == 1 and ds.skipped_rows == 3
    assert ds.test.sparse["a"].values.tolist() == [2] and ds.test.sparse["b"].values.tolist() == [0]
    assert ds.info["skipped"]["by_reason"] == {
        "non-finite dense value": 1,
        "id outside its table": 1,
        "label not 0 or 1": 1,
    }
    assert len(ds.train) == 4  # clean splits untouched
    with pytest.raises(ValueError, match="data.on_bad_row='ignore'"):
        check_dataset(dataset(), "ignore")


def test_label_stats_per_split_and_task() -> None:
    ds = dataset(labels={"y": np.array([1, 1, 0, 1], dtype=np.float32)})
    ds.val = ds.val.take(np.array([], dtype=np.int64))
    check_dataset(ds)
    assert ds.info["label_stats"] == {
        "train": {"y": {"rows": 4, "positive_rate": 0.5}},
        "val": {"y": {"rows": 0, "positive_rate": None}},
        "test": {"y": {"rows": 4, "positive_rate": 0.75}},
    }


def test_label_stats_after_skipped_rows() -> None:
    ds = dataset(labels={"y": np.array([0.5, 1, 0, 1], dtype=np.float32)})
    check_dataset(ds, "skip")
    assert ds.info["label_stats"]["test"]["y"] == {"rows": 3, "positive_rate": pytest.approx(2 / 3)}  # type: ignore[index]


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_single_class_split_is_warned(caplog: pytest.LogCaptureFixture, value: float) -> None:
    ds = dataset(labels={"y": np.full(4, value, dtype=np.float32)})
    ds.info["label_sources"] = {"y": "column 'income' rule '== 50000+'"}
    with caplog.at_level("WARNING", logger="data"):
        check_dataset(ds)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1  # train and val hold both classes; the empty-split case is silent
    assert "task 'y' has a single class in the test split of 'tiny'" in messages[0]
    assert f"all 4 rows are {int(value)}" in messages[0]
    assert "label from column 'income' rule '== 50000+'" in messages[0]


def test_single_class_warning_without_recorded_source(caplog: pytest.LogCaptureFixture) -> None:
    ds = dataset(labels={"y": np.zeros(4, dtype=np.float32)})
    ds.val = ds.val.take(np.array([], dtype=np.int64))
    with caplog.at_level("WARNING", logger="data"):
        check_dataset(ds)
    assert [r.getMessage() for r in caplog.records] == [
        "data: task 'y' has a single class in the test split of 'tiny' (all 4 rows are 0; "
        "label from source 'tiny'): its AUC / GAUC will be null"
    ]
