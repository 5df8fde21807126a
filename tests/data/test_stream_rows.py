"""Streaming Parquet source, row level: bad rows (error naming file, row group, row and
column; skip counting), hashed and vocabulary ids, dense statistics, the eval limit."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.build import build_train_loader
from data.columns import Dataset
from data.loaders.stream import StreamLoader
from data.parsing.files import signed_log1p
from data.parsing.hashing import HashEncoder, VocabEncoder, hashed_group_ids
from data.parsing.prepare import main as prepare
from data.parsing.prepare import read_vocab
from tests.data._stream_files import TRAIN_FILE_ROWS, dataset, rows_table, write_layout

NUM_ROWS = sum(TRAIN_FILE_ROWS)
P, M64 = 0x100000001B3, 2**64


def ref_hash(text: str) -> int:
    """The documented text hash, written out in plain Python (data/parsing/hashing.py docstring)."""
    b = text.encode()
    p = sum((x + 1) * pow(P, i, M64) for i, x in enumerate(b)) % M64
    z = ((p ^ (len(b) * 0x9E3779B97F4A7C15 % M64)) + 0x9E3779B97F4A7C15) % M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % M64
    return z ^ (z >> 31)


def _loader(ds: Dataset, *, rank: int = 0, world: int = 1, batch: int = 64, prefetch: int = 0) -> StreamLoader:
    loader = build_train_loader(ds, batch_size=batch, rank=rank, world_size=world, seed=1, prefetch=prefetch)
    assert isinstance(loader, StreamLoader)
    return loader


def _take(loader: StreamLoader, n: int) -> list:
    it = iter(loader)
    out = list(itertools.islice(it, n))
    it.close()
    return out


def _raw(root: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted((root / "train").glob("*.parquet"))])


# --------------------------------------------------------------------------- bad rows


def _spoil(root: Path, file: int, column: str, index: int, value: object, type_: pa.DataType) -> str:
    """Rewrite train file `file` with `column[index] = value` (the column cast to `type_`)."""
    path = root / "train" / f"part-{file:03d}.parquet"
    table = pq.read_table(path)
    cells = table.column(column).cast(type_).to_pylist()
    cells[index] = value
    table = table.set_column(table.schema.get_field_index(column), column, pa.array(cells, type_))
    pq.write_table(table, path, row_group_size=200)
    return str(path)


BAD = {  # name: (file, column, index in file, value, type, message after "row R, column 'C': ")
    "non_numeric": (1, "x", 345, "abc", pa.string(), "non-numeric value 'abc'"),
    "null_dense": (1, "x", 612, None, pa.float64(), "empty or NaN dense value"),
    "label": (2, "label", 5, 2, pa.int64(), "label 2.0 is not 0 or 1"),
}


@pytest.mark.parametrize("prefetch", [0, 2])
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_row_error_names_file_row_group_row_and_column(tmp_path: Path, case: str, prefetch: int) -> None:
    write_layout(tmp_path)
    file, column, index, value, type_, detail = BAD[case]
    path = _spoil(tmp_path, file, column, index, value, type_)
    loader = _loader(dataset(tmp_path), prefetch=prefetch)
    want = f"{path} (row group {index // 200}): row {index + 1}, column '{column}': {detail}"
    with pytest.raises(ValueError, match=re.escape(want)):
        _take(loader, 2 * NUM_ROWS // 64)


def _epoch_rows(loader: StreamLoader, epoch: int) -> set[int]:
    """Global row ids (`rid`) of the units this rank reads in `epoch`."""
    units, starts = loader.units, np.cumsum([0, *TRAIN_FILE_ROWS])
    out: set[int] = set()
    for u in loader.rank_units(epoch):
        first = int(starts[units.file_U[u]] + units.first_row_U[u])
        out.update(range(first, first + int(units.rows_U[u])))
    return out


def test_skip_counts_bad_rows_once_by_reason(tmp_path: Path) -> None:
    write_layout(tmp_path)
    starts = np.cumsum([0, *TRAIN_FILE_ROWS])
    spoiled = set()
    for file, column, index, value, _, _ in BAD.values():
        _spoil(tmp_path, file, column, index, value, pa.string() if column == "x" else pa.int64())  # both in one x
        spoiled.add(int(starts[file]) + index)
    ds = dataset(tmp_path, on_bad_row="skip")
    loaders = [_loader(ds, rank=r, world=2) for r in range(2)]
    for loader in loaders:
        mine = _epoch_rows(loader, 0)
        batches = _take(loader, 3 * len(mine) // 64)  # three epochs: bad rows counted in the first only
        rids = [r for b in batches for r in b.user_id.tolist()]
        assert set(rids[: len(mine - spoiled)]) == mine - spoiled, "epoch 0: every good row once"
        assert not spoiled & set(rids), "skipped rows never reach a batch"
        assert loader.skipped_rows == len(mine & spoiled)
    reasons: dict[str, int] = {}
    for loader in loaders:
        for k, v in loader.skipped_by_reason.items():
            reasons[k] = reasons.get(k, 0) + v
    assert reasons == {"non-numeric value": 1, "non-finite dense value": 1, "label not 0 or 1": 1}


def test_skip_counts_survive_a_resume(tmp_path: Path) -> None:
    write_layout(tmp_path)
    for file, column, index, value, _, _ in BAD.values():
        _spoil(tmp_path, file, column, index, value, pa.string() if column == "x" else pa.int64())
    ds = dataset(tmp_path, on_bad_row="skip")
    straight = _loader(ds)
    _take(straight, 2 * NUM_ROWS // 64)
    for consumed in (5, 20, 30):
        loader = _loader(ds)
        _take(loader, consumed)
        fresh = _loader(ds)
        fresh.load_state_dict(loader.state_dict())
        _take(fresh, 2 * NUM_ROWS // 64 - consumed)
        assert fresh.skipped_by_reason == straight.skipped_by_reason
    assert straight.skipped_rows == 3


def test_missing_column_names_the_file(tmp_path: Path) -> None:
    write_layout(tmp_path)
    path = tmp_path / "train" / "part-001.parquet"
    pq.write_table(pq.read_table(path).drop_columns(["x"]), path)
    with pytest.raises(ValueError, match=re.escape(f"{path}: no column(s) ['x']")):
        dataset(tmp_path)


def test_bad_eval_rows_are_counted_at_load(tmp_path: Path) -> None:
    write_layout(tmp_path)
    path = tmp_path / "val" / "part-000.parquet"
    table = pq.read_table(path)
    labels = table.column("label").to_pylist()
    labels[7] = 3
    pq.write_table(table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels)), path)
    ds = dataset(tmp_path, on_bad_row="skip")
    assert ds.skipped_rows == 1 and len(ds.val) == 299
    assert ds.info["skipped"]["by_reason"] == {"label not 0 or 1": 1}  # type: ignore[index]
    with pytest.raises(ValueError, match=re.escape(f"{path} (row group 0): row 8, column 'label'")):
        dataset(tmp_path)


# -------------------------------------------------------------------------------- ids


def _batch_rows(root: Path, ds: Dataset, n: int = 3) -> tuple[list, pa.Table]:
    batches = _take(_loader(ds, batch=128), n)
    raw = _raw(root)
    return batches, raw


def test_hashed_ids_follow_the_documented_hash(tmp_path: Path) -> None:
    write_layout(tmp_path)
    ds = dataset(tmp_path)
    batches, raw = _batch_rows(tmp_path, ds)
    sizes = {"cat": 101, "num": 61, "tags": 53}
    for b in batches:
        rows = b.user_id.numpy()
        for col in ("cat", "num"):
            want = [1 + ref_hash(str(v)) % (sizes[col] - 1) for v in raw.column(col).take(pa.array(rows)).to_pylist()]
            assert b.sparse[col].values().tolist() == want
        tokens = [t for cell in raw.column("tags").take(pa.array(rows)).to_pylist() for t in cell.split(",") if t]
        assert b.sparse["tags"].values().tolist() == [1 + ref_hash(t) % 52 for t in tokens]
    assert [f.num_embeddings for f in ds.spec.sparse] == [101, 61, 53]


def test_integers_and_their_text_hash_alike() -> None:
    enc = HashEncoder(1000)
    ints = enc.encode(pa.array([0, 7, -12, 123456789012, None], pa.int64()))
    text = enc.encode(pa.array(["0", " 7", "-12", "123456789012", ""]))
    assert ints.tolist() == text.tolist() and ints[-1] == 0 and (ints[:-1] > 0).all()
    assert enc.encode(pa.array([7], pa.int8())).tolist() == [ints[1]]


@pytest.mark.parametrize("kind", ["int", "text"])
def test_columns_with_repeats_encode_like_single_cells(kind: str) -> None:
    """Long columns with repeats are encoded per distinct value: same ids as cell by cell."""
    values = np.random.default_rng(0).integers(0, 40, 3000).tolist() + [None] * 5
    arr = pa.array(values, pa.int64()) if kind == "int" else pa.array([None if v is None else f" {v}" for v in values])
    vocab = VocabEncoder(pa.array([str(i) for i in range(0, 40, 3)]), name="v")
    for encode in (HashEncoder(97).encode, vocab.encode, hashed_group_ids):
        whole = encode(arr)
        assert whole.tolist() == [int(encode(arr.slice(i, 1))[0]) for i in range(len(arr))]


def test_hash_collision_rate_is_about_n_over_2m() -> None:
    n, m = 20_000, 1_000_001
    ids = HashEncoder(m).encode(pa.array([f"user-{i}" for i in range(n)]))
    collided = n - len(np.unique(ids))
    expected = n * n / (2 * (m - 1))  # = n * n/(2m): 200 values share a row
    assert abs(collided - expected) < 4 * np.sqrt(expected)


def test_vocabulary_ids_from_the_cli_file(tmp_path: Path) -> None:
    write_layout(tmp_path)
    vocab = tmp_path / "vocab.parquet"
    train = str(tmp_path / "train" / "*.parquet")
    args = ["--columns", "cat", "num", "--multi-hot", "tags=,", "--max-size=10", "--files", train]
    prepare(["vocab", "--out", str(vocab), *args])
    values = {k: v.to_pylist() for k, v in read_vocab(vocab).items()}
    raw = _raw(tmp_path)
    values_, counts_ = np.unique(raw.column("cat").to_numpy(zero_copy_only=False), return_counts=True)
    counts = dict(zip(values_.tolist(), counts_.tolist(), strict=True))
    assert values["cat"] == sorted(counts, key=lambda v: (-counts[v], v))[:10], "by count, then value; cut to 10"
    ds = dataset(tmp_path, ids="vocab", vocab_file=str(vocab), num_embeddings={})
    assert [f.num_embeddings for f in ds.spec.sparse] == [11, 11, 11]
    batches, _ = _batch_rows(tmp_path, ds)
    for b in batches:
        rows = pa.array(b.user_id.numpy())
        for col in ("cat", "num"):
            cells = [str(v) for v in raw.column(col).take(rows).to_pylist()]
            want = [values[col].index(v) + 1 if v in values[col] else 0 for v in cells]
            assert b.sparse[col].values().tolist() == want
        assert 0 in b.sparse["cat"].values().tolist(), "values outside the vocabulary are id 0"


def test_vocabulary_refuses_duplicates() -> None:
    with pytest.raises(ValueError, match="each value must appear once"):
        VocabEncoder(pa.array(["a", "b", "a"]), name="f")


def test_hash_needs_every_table_size(tmp_path: Path) -> None:
    write_layout(tmp_path)
    with pytest.raises(ValueError, match=r"data.num_embeddings.*missing \['tags'\]"):
        dataset(tmp_path, num_embeddings={"cat": 101, "num": 61})


# ------------------------------------------------------------------------ dense stats


def test_first_pass_statistics_are_bounded(tmp_path: Path) -> None:
    write_layout(tmp_path)
    ds = dataset(tmp_path, stats_rows=250)
    source = ds.info["dense_stats"]["source"]  # type: ignore[index]
    rows = int(re.search(r"over (\d+) train rows", source).group(1))  # type: ignore[union-attr]
    assert 250 <= rows < 250 + 200, "whole row groups until stats_rows, never a full pass"


@pytest.mark.parametrize("source", ["file", "first_pass"])
@pytest.mark.parametrize("log1p", [False, True])
def test_statistics_standardise_dense(tmp_path: Path, log1p: bool, source: str) -> None:
    write_layout(tmp_path)
    stats = tmp_path / "stats.json"
    prepare(["stats", "--out", str(stats), "--columns", "x", "--files", str(tmp_path / "train" / "*.parquet")])
    raw = _raw(tmp_path)
    x = raw.column("x").to_numpy()
    v = signed_log1p(x) if log1p else x
    by = {"stats_file": str(stats)} if source == "file" else {"stats_rows": 10**6}  # a first pass over every row
    ds = dataset(tmp_path, **by, log1p=["x"] if log1p else [])
    b = _take(_loader(ds, batch=128), 1)[0]
    want = (v[b.user_id.numpy()] - v.mean()) / v.std()
    np.testing.assert_allclose(b.dense[:, 0].numpy(), want, rtol=1e-5, atol=1e-5)


def test_eval_splits_have_a_row_limit(tmp_path: Path) -> None:
    write_layout(tmp_path)
    with pytest.raises(ValueError, match=r"data.val has 300 rows, more than data.max_eval_rows=299"):
        dataset(tmp_path, max_eval_rows=299)


def test_val_rows_match_the_files(tmp_path: Path) -> None:
    write_layout(tmp_path)
    ds = dataset(tmp_path)
    assert ds.val.user_id.tolist() == list(range(10**6, 10**6 + 300))  # type: ignore[union-attr]
    assert ds.val.labels["good"].tolist() == (rows_table(10**6, 300).column("score").to_numpy() >= 4).tolist()
