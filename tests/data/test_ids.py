"""Id records of a run and the row map between two runs (data/ids.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from data.columns import Dataset, Split
from data.ids import DataRecord, IdRecord, id_counts, read_records, records, row_map, write_records
from data.spec import DatasetSpec, SparseFeature


def _vocab(feature: str, values: list[str]) -> IdRecord:
    return IdRecord(feature, "vocab", len(values) + 1, pa.array(values, pa.string()))


def test_rows_follow_their_value_and_new_values_get_none() -> None:
    old = _vocab("item", ["a", "b", "c", "d"])  # rows 1..4
    new = _vocab("item", ["d", "x", "b", "y", "a"])  # c gone, x / y new
    mapping = row_map(old, new)
    assert mapping.tolist() == [0, 4, -1, 2, -1, 1]
    assert id_counts(mapping) == (3, 2)


def test_hashed_ids_map_row_to_row_and_need_the_same_table() -> None:
    assert row_map(IdRecord("h", "rows", 7), IdRecord("h", "rows", 7)).tolist() == list(range(7))
    with pytest.raises(ValueError, match="num_embeddings"):
        row_map(IdRecord("h", "rows", 7), IdRecord("h", "rows", 9))
    with pytest.raises(ValueError, match="data.ids"):
        row_map(IdRecord("h", "rows", 3), _vocab("h", ["a", "b"]))


def test_records_round_trip_through_the_run_directory(tmp_path: Path) -> None:
    spec = DatasetSpec(
        name="toy",
        sparse=(SparseFeature(name="user", num_embeddings=3), SparseFeature(name="hashed", num_embeddings=11)),
        dense_names=("age",),
        tasks=("click",),
        has_user_id=False,
    )
    empty = Split(dense=np.zeros((0, 1), np.float32), sparse={}, labels={})
    ds = Dataset(spec=spec, train=empty, val=empty, test=empty, info={"vocab": {"user": pa.array(["u1", "u2"])}})
    rec = records(ds)
    assert rec.ids["user"].kind == "vocab" and rec.ids["hashed"].kind == "rows"
    write_records(rec, tmp_path)
    back = read_records(tmp_path)
    assert isinstance(back, DataRecord) and back.tasks == ("click",) and back.dense == ("age",)
    assert back.ids["user"].values.to_pylist() == ["u1", "u2"] and back.ids["hashed"].rows == 11
    with pytest.raises(FileNotFoundError, match="data_spec.json"):
        read_records(tmp_path / "elsewhere")
    bad = Dataset(spec=spec, train=empty, val=empty, test=empty, info={"vocab": {"user": pa.array(["u1"])}})
    with pytest.raises(ValueError, match="'user'"):
        records(bad)


def test_a_base_vocabulary_keeps_its_ids_and_train_values_are_appended() -> None:
    from data.parsing.files import category_dictionary, train_vocab

    column = pa.chunked_array([["b", "x", "a", "y", None, "c", "x"]])
    is_train = np.array([True, True, True, False, True, False, True])
    codes, dictionary = category_dictionary(column)
    ids, size, values = train_vocab(codes, dictionary, is_train, pa.array(["a", "b", "c", "d"]))
    # base ids 1..4 everywhere (c only in a test row keeps its trained id); x is new (5); y unseen (0)
    assert ids.tolist() == [2, 5, 1, 0, 0, 3, 5] and size == 6
    assert values.to_pylist() == ["a", "b", "c", "d", "x"]


def test_census_extends_a_base_vocabulary() -> None:
    from data.sources.census import CensusIncomeConfig, load_census_income

    first = load_census_income(CensusIncomeConfig(limit_rows=2000))
    base = {k: v for k, v in first.info["vocab"].items()}  # type: ignore[union-attr]
    again = load_census_income(CensusIncomeConfig(limit_rows=2000), base_vocab=base)
    for f in first.spec.sparse:  # its own vocabulary as base: the same ids
        assert np.array_equal(again.train.sparse[f.name].values, first.train.sparse[f.name].values)
    more = load_census_income(CensusIncomeConfig(limit_rows=20000), base_vocab=base)
    vocab = more.info["vocab"]["industry_code"].to_pylist()  # type: ignore[index]
    old = base["industry_code"].to_pylist()
    assert vocab[: len(old)] == old and len(vocab) > len(old)
