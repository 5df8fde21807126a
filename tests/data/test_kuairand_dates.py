"""KuaiRand date window `data.dates = [first, last]`: rows dated outside are in no split
and shape no encoding (vocabularies, imputation means, dense statistics); the date split
then runs on the window's dates.

On the shipped KuaiRand-Pure files (dates 2022-05-01 and 05-02 of the second log) and on
the small synthetic KuaiRand-1K-like files of tests/data/test_kuairand.py (5 dates of
40 rows, 20220408 .. 20220412).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.build import build_dataset
from data.columns import Dataset
from data.sources.kuairand import KuaiRandConfig, load_kuairand
from tests.data.test_kuairand import DATES, SAMPLE, write_kuairand
from tests.data.test_kuairand_pure import TASKS, preset_config

DAY1, DAY2 = 20220501, 20220502
LOG_ROWS = 228_329  # both shipped logs
DAY_ROWS = {DAY1: 20_790, DAY2: 19_554}


@pytest.fixture(scope="module")
def window() -> Dataset:
    """KuaiRand-Pure limited to 05-01 (train, 10% carved out as val) and 05-02 (test)."""
    cfg = preset_config(dates=[DAY1, DAY2], test_days=1, val_days=0)
    return build_dataset(cfg, keep_keys=True)


@pytest.fixture(scope="module")
def second_log() -> pa.Table:
    """The shipped log of 05-01 .. 05-08 (the second of the preset's logs)."""
    return pq.read_table(preset_config().log_files[1])


def _rows_of(log: pa.Table, day: int) -> np.ndarray:
    return np.flatnonzero(log.column("date").to_numpy() == day)


def test_pure_window_splits_and_counts(window: Dataset) -> None:
    info = window.info
    assert (info["train_dates"], info["val_dates"], info["test_dates"]) == ([str(DAY1)], [], [str(DAY2)])
    assert len(window.train) + len(window.val) == DAY_ROWS[DAY1]
    assert len(window.val) == round(0.1 * DAY_ROWS[DAY1])
    assert len(window.test) == DAY_ROWS[DAY2]
    assert info["rows_outside_dates"] == LOG_ROWS - DAY_ROWS[DAY1] - DAY_ROWS[DAY2]


def test_pure_window_rows_are_the_days_rows(window: Dataset, second_log: pa.Table) -> None:
    """Test = exactly the 05-02 rows, train + val exactly the 05-01 rows (file and row
    numbers, user ids, labels), all from the second log."""
    second = preset_config().log_files[1]
    for splits, day in (((window.test,), DAY2), ((window.train, window.val), DAY1)):
        keys = [s.keys for s in splits]
        assert all(k is not None and set(np.unique(k["file"])) == {second} for k in keys)
        rows = np.concatenate([k["row"] for k in keys])  # type: ignore[index]
        order = np.argsort(rows)
        expected = _rows_of(second_log, day)
        assert np.array_equal(rows[order], expected + 1)  # file row numbers count from 1
        user = np.concatenate([s.user_id for s in splits])[order]  # type: ignore[arg-type]
        assert np.array_equal(user, second_log.column("user_id").to_numpy()[expected])
        for task in TASKS:
            got = np.concatenate([s.labels[task] for s in splits])[order]
            assert np.array_equal(got, second_log.column(task).to_numpy()[expected].astype(np.float32)), task


def test_pure_window_vocabulary_and_statistics_from_train_rows_only(window: Dataset, second_log: pa.Table) -> None:
    train = window.train
    assert train.keys is not None
    train_rows = np.asarray(train.keys["row"]) - 1  # file row numbers count from 1
    for feature in ("user_id", "video_id"):
        vocab = set(window.info["vocab"][feature].to_pylist())  # type: ignore[index]
        expected = {str(v) for v in np.unique(second_log.column(feature).to_numpy()[train_rows])}
        assert vocab == expected, feature
        spec = next(f for f in window.spec.sparse if f.name == feature)
        assert spec.num_embeddings == len(expected) + 1  # id 0 = unseen
    # the day's videos that train never saw are unseen (id 0) in test; some exist
    assert (window.test.sparse["video_id"].values == 0).any()
    # standardised with train statistics: train columns have mean 0, std 1
    np.testing.assert_allclose(train.dense.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(train.dense.std(axis=0), 1.0, atol=1e-3)


def test_pure_window_matches_a_log_of_the_window_alone(window: Dataset, second_log: pa.Table, tmp_path: Path) -> None:
    """Same encoding as a log that only holds the window's rows: nothing outside leaks in."""
    keep = np.isin(second_log.column("date").to_numpy(), [DAY1, DAY2])
    path = tmp_path / "window.parquet"
    pq.write_table(second_log.filter(pa.array(keep)), path)
    cfg = preset_config(test_days=1, val_days=0)
    cfg.log_files = [str(path)]
    alone = build_dataset(cfg)
    assert alone.info["rows_outside_dates"] == 0
    for key, value in alone.info["dense_stats"].items():  # type: ignore[union-attr]
        np.testing.assert_array_equal(value, window.info["dense_stats"][key])  # type: ignore[index]
    for feature, values in alone.info["vocab"].items():  # type: ignore[union-attr]
        assert values.equals(window.info["vocab"][feature]), feature  # type: ignore[index]
    for name in ("train", "val", "test"):
        a, b = alone.split(name), window.split(name)
        np.testing.assert_array_equal(a.dense, b.dense)
        for feature in a.sparse:
            np.testing.assert_array_equal(a.sparse[feature].values, b.sparse[feature].values)


# ------------------------------------------------------------------- synthetic files


@pytest.fixture
def files(tmp_path: Path) -> dict[str, object]:
    return write_kuairand(tmp_path)


def _load(files: dict[str, object], **kw) -> Dataset:
    return load_kuairand(KuaiRandConfig(**{**files, "log1p_dense": False, **kw}))  # type: ignore[arg-type]


def test_window_then_date_split(files: dict[str, object]) -> None:
    d = _load(files, dates=[20220409, 20220411])
    assert (d.info["train_dates"], d.info["val_dates"], d.info["test_dates"]) == (
        [DATES[1]], [DATES[2]], [DATES[3]]
    )  # fmt: skip
    assert (len(d.train), len(d.val), len(d.test)) == (40, 40, 40)
    assert d.info["rows_outside_dates"] == 80
    # bounds as text, and a window wider than the logs
    assert _load(files, dates=["20220409", "20220411"]).info["test_dates"] == [DATES[3]]
    wide = _load(files, dates=[20220101, 20221231])
    assert wide.info["rows_outside_dates"] == 0 and wide.info["test_dates"] == [DATES[-1]]
    # no window: every row, and the count is 0
    assert _load(files).info["rows_outside_dates"] == 0


def test_window_with_fraction_split(files: dict[str, object]) -> None:
    d = _load(files, split="fraction", dates=[20220408, 20220409], val_fraction=0.25, test_fraction=0.25)
    assert (len(d.train), len(d.val), len(d.test)) == (40, 20, 20)
    assert d.info["rows_outside_dates"] == 120


@pytest.mark.parametrize(
    ("dates", "match"),
    [
        ([20220409], r"data.dates=\[20220409\]; give \[first, last\]"),
        ([20220408, 20220409, 20220410], r"data.dates=.*; give \[first, last\]"),
        ([20220411, 20220409], r"data.dates=\[20220411, 20220409\]: the first date is after the last"),
        (["2022-04-09", "2022-04-11"], r"data.dates=.*: the logs' dates are integers"),
        ([20220501, 20220502], r"data.dates=\[20220501, 20220502\] holds no log row; .* 20220408 .. 20220412"),
        ([20220410, 20220410], r"span 1 dates within data.dates=.* leave no train date"),
    ],
)
def test_bad_windows_name_the_key(files: dict[str, object], dates: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _load(files, dates=dates)


def test_window_needs_a_date_column() -> None:
    """The 200-row sample has no date: a window is an error, with either split."""
    with pytest.raises(ValueError, match="no `date` column; set data.dates=null"):
        load_kuairand(KuaiRandConfig(log_files=[str(SAMPLE)], split="fraction", dates=[1, 2]))
    with pytest.raises(ValueError, match="no `date` column; set data.split=fraction and data.dates=null"):
        load_kuairand(KuaiRandConfig(log_files=[str(SAMPLE)], dates=[1, 2]))
