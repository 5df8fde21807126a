"""Census-Income source on a slice of the shipped files, and its errors on corrupt files."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from data.build import build_dataset
from data.columns import Dataset, validation_rows
from data.sources.census import (
    CATEGORICAL,
    CONTINUOUS,
    DEFAULT_DIR,
    CensusIncomeConfig,
    _encode,
    _strings,
    load_census_income,
    read_raw,
)

LIMIT = 2000


@pytest.fixture(scope="module")
def census() -> Dataset:
    return load_census_income(CensusIncomeConfig(limit_rows=LIMIT))


def test_shapes_and_spec(census: Dataset) -> None:
    d = census
    assert d.spec.tasks == ("income", "never_married") and not d.spec.has_user_id
    assert d.spec.sparse_names == tuple(CATEGORICAL.values())
    assert d.spec.dense_names == tuple(CONTINUOUS.values())
    assert (len(d.train), len(d.val), len(d.test)) == (LIMIT - 200, 200, LIMIT)
    for split in (d.train, d.val, d.test):
        assert split.dense.shape == (len(split), 7) and split.dense.dtype == np.float32
        assert np.isfinite(split.dense).all()
        for f in d.spec.sparse:
            ids = split.sparse[f.name].values
            assert len(ids) == len(split) and ids.min() >= 0 and ids.max() < f.num_embeddings
    np.testing.assert_allclose(d.train.dense.mean(axis=0), 0.0, atol=1e-4)


def test_label_sources() -> None:
    d = build_dataset(CensusIncomeConfig(limit_rows=300))
    assert d.spec.name == "census_income"
    assert d.info["label_sources"] == {
        "income": "column 41 (income) == '50000+.'",
        "never_married": "column 7 (marital status) == 'Never married'",
    }
    rate = d.info["label_stats"]["test"]["income"]["positive_rate"]  # type: ignore[index]
    assert rate == pytest.approx(float(d.test.labels["income"].mean())) and 0 < rate < 0.2


def test_label_rates(census: Dataset) -> None:
    for split in (census.train, census.test):
        assert 0.03 < split.labels["income"].mean() < 0.10  # 6.2% on the full files
        assert 0.25 < split.labels["never_married"].mean() < 0.55


def test_vocabulary_from_train_rows_only(census: Dataset) -> None:
    raw_train = read_raw(DEFAULT_DIR / "census-income.data.gz", limit_rows=LIMIT)
    raw_test = read_raw(DEFAULT_DIR / "census-income.test.gz", limit_rows=LIMIT)
    train_rows, val_rows = validation_rows(LIMIT, fraction=0.1, seed=2026)
    unseen_somewhere = False
    for col, name in CATEGORICAL.items():
        vocab = set(_strings(raw_train, col)[train_rows])
        assert census.spec.feature(name).num_embeddings == len(vocab) + 1
        assert (census.train.sparse[name].values > 0).all()
        for split, values in (
            (census.val, _strings(raw_train, col)[val_rows]),
            (census.test, _strings(raw_test, col)),
        ):
            unseen = np.array([v not in vocab for v in values])
            assert np.array_equal(split.sparse[name].values == 0, unseen), name
            unseen_somewhere |= bool(unseen.any())
    assert unseen_somewhere  # the slice does exercise id 0


def test_encode_maps_unseen_to_zero() -> None:
    vocab = np.array(["a", "c", "e"])
    assert _encode(vocab, np.array(["c", "b", "a", "z", "e"])).tolist() == [2, 0, 1, 0, 3]


def _row(age: str = "73", label: str = "- 50000.") -> str:
    cells = ["0"] * 42
    cells[0], cells[7], cells[41] = age, "Never married", label
    return ", ".join(cells) + "\n"


def _write(root: Path, train: str, test: str | None = None) -> None:
    for name, text in (("census-income.data.gz", train), ("census-income.test.gz", test or train)):
        with gzip.open(root / name, "wt") as f:
            f.write(text)


def test_small_valid_files(tmp_path: Path) -> None:
    _write(tmp_path, "".join(_row(str(20 + i), "50000+." if i % 4 == 0 else "- 50000.") for i in range(40)))
    d = load_census_income(CensusIncomeConfig(root=str(tmp_path)))
    assert len(d.train) + len(d.val) == 40 and d.train.labels["never_married"].all()
    assert d.test.labels["income"].mean() == 0.25


@pytest.mark.parametrize(
    ("train", "match"),
    [
        (_row() + ", ".join(["0"] * 41) + "\n", "census-income.data.gz: not a 42-column"),
        (
            _row() + _row(age="old"),
            r"census-income.data.gz: row 2, column 0 \(age\): non-numeric value 'old' \(data.on_bad_row=skip drops",
        ),
        (_row() + _row(age="inf"), r"row 2, column 0 \(age\): non-finite"),
        (_row(label="maybe"), r"row 1, column 41 \(income\): label 'maybe'"),
    ],
)
def test_corrupt_file_errors_name_file_row_column(tmp_path: Path, train: str, match: str) -> None:
    _write(tmp_path, train, test=_row())
    with pytest.raises(ValueError, match=match):
        load_census_income(CensusIncomeConfig(root=str(tmp_path)))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="census-income.data.gz"):
        load_census_income(CensusIncomeConfig(root=str(tmp_path)))


def test_on_bad_row_skip(tmp_path: Path) -> None:
    good = [_row(str(20 + i), "50000+." if i % 4 == 0 else "- 50000.") for i in range(40)]
    dirty = list(good)
    dirty.insert(5, _row(age="old"))
    dirty.insert(9, _row(age="inf"))
    dirty.insert(13, _row(label="maybe"))
    dirty.insert(17, ", ".join(["0"] * 41) + "\n")  # 41 fields
    _write(tmp_path, "".join(dirty), test="".join(good[:8]))
    with pytest.raises(ValueError, match=r"census-income.data.gz: not a 42-column .*: row 18: 41 fields"):
        load_census_income(CensusIncomeConfig(root=str(tmp_path)))
    d = load_census_income(CensusIncomeConfig(root=str(tmp_path), on_bad_row="skip"))
    assert d.skipped_rows == 4
    assert d.info["skipped"]["by_reason"] == {
        "wrong number of fields": 1,
        "non-numeric value": 1,
        "non-finite dense value": 1,
        "label not 0 or 1": 1,
    }
    _write(tmp_path, "".join(good), test="".join(good[:8]))
    clean = load_census_income(CensusIncomeConfig(root=str(tmp_path)))
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(d.split(name).dense, clean.split(name).dense)
        np.testing.assert_array_equal(d.split(name).labels["income"], clean.split(name).labels["income"])
