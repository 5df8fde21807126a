"""Growing a vocabulary for continuous training: `python -m data.stream vocab --extend`
keeps every old value at its id and appends the new day's values; the streaming source
encodes day 2 with the grown file and reports the vocabularies it used."""

from __future__ import annotations

import itertools
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.build import build_dataset, build_train_loader
from data.generators.logs import CATEGORICAL, DENSE, TASKS, generate, parse_args
from data.parsing import prepare as prepare_module
from data.parsing.files import feature_name
from data.parsing.hashing import VocabEncoder
from data.parsing.prepare import build_vocab, extend_vocab, main, read_vocab, read_vocab_table
from data.sources.parquet_stream import ParquetStreamConfig

SMALL = ["--rows", "3000", "--files", "2", "--row-group-size", "500", "--val-rows", "300", "--test-rows", "300"]
COLUMNS = list(CATEGORICAL)
MULTI = {"tag": ","}


@pytest.fixture(scope="module")
def days(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """day1/ (300 users, 100 videos) and day2/ (another seed, 400 users, 150 videos: ids
    0..299 / 0..99 partly shared with day 1, the rest new), each with its own vocab.parquet."""
    root = tmp_path_factory.mktemp("days")
    generate(parse_args([*SMALL, "--seed", "0", "--users", "300", "--videos", "100", "--out", str(root / "day1")]))
    generate(parse_args([*SMALL, "--seed", "1", "--users", "400", "--videos", "150", "--out", str(root / "day2")]))
    return root


def _train(root: Path, day: str) -> list[str]:
    return sorted(str(p) for p in (root / day / "train").glob("*.parquet"))


def _texts(root: Path, day: str, column: str) -> list[str]:
    """Every cell's text of `column` over the train files of `day` (tags flattened)."""
    table = pa.concat_tables([pq.read_table(p, columns=[column]) for p in _train(root, day)])
    col = table.column(column).combine_chunks()
    col = col.flatten() if column in MULTI else col
    return [str(v) for v in col.to_pylist()]


def _grow(days: Path, *, min_count: int = 1, columns: list[str] = COLUMNS, old: Any = None) -> tuple[pa.Table, dict]:
    counts = build_vocab(_train(days, "day2"), columns=columns, multi_hot=MULTI)
    return extend_vocab(days / "day1" / "vocab.parquet" if old is None else old, counts, min_count=min_count)


def _features(table: pa.Table) -> dict[str, tuple[list[str], list[int]]]:
    out: dict[str, tuple[list[str], list[int]]] = {}
    for row in table.to_pylist():
        values, counts = out.setdefault(row["feature"], ([], []))
        values.append(row["value"])
        counts.append(row["count"])
    return out


def test_extension_keeps_old_rows_and_appends_new_values_by_count(days: Path) -> None:
    old = _features(read_vocab_table(days / "day1" / "vocab.parquet"))
    table, sizes = _grow(days)
    new = _features(table)
    assert list(new) == list(old), "features in the old file's order, one block each"
    for f, (old_values, old_counts) in old.items():
        values, counts = new[f]
        n = len(old_values)
        assert values[:n] == old_values, f"{f}: old values keep their ids"
        day2 = Counter(_texts(days, "day2", f))
        assert counts[:n] == [c + day2.get(v, 0) for v, c in zip(old_values, old_counts, strict=True)], "summed"
        appended = {v: c for v, c in day2.items() if v not in set(old_values)}
        assert values[n:] == sorted(appended, key=lambda v: (-appended[v], v)), f"{f}: by count, then value"
        assert counts[n:] == [appended[v] for v in values[n:]]
        assert sizes[f] == (n, len(appended))
    assert sizes["user_id"][1] > 0 and sizes["video_id"][1] > 0, "day 2 brings new users and videos"
    assert sizes["upload_type"][1] == 0, "a closed category set does not grow"


def test_day2_encodes_old_values_to_old_ids_and_new_values_after(days: Path) -> None:
    table, _ = _grow(days)
    path = days / "grown.parquet"
    prepare_module.write_vocab_table(path, table)
    old, grown = read_vocab(days / "day1" / "vocab.parquet"), read_vocab(path)
    for f in ("user_id", "video_id", "tag"):
        cells = pa.array(_texts(days, "day2", f))
        old_ids = VocabEncoder(old[f], name=f).encode(cells)
        new_ids = VocabEncoder(grown[f], name=f).encode(cells)
        known = old_ids > 0
        assert (new_ids > 0).all(), f"{f}: every day-2 value has an id"
        assert np.array_equal(new_ids[known], old_ids[known]), f"{f}: old values keep their ids"
        assert (new_ids[~known] > len(old[f])).all(), f"{f}: new values get ids after the old ones"
    assert not (VocabEncoder(old["user_id"], name="u").encode(pa.array(_texts(days, "day2", "user_id"))) > 0).all()


def test_min_count_cuts_new_values_only(days: Path) -> None:
    old = read_vocab(days / "day1" / "vocab.parquet")
    table, sizes = _grow(days, min_count=5)
    grown = {f: v for f, (v, _) in _features(table).items()}
    day2 = Counter(_texts(days, "day2", "user_id"))
    n = len(old["user_id"])
    assert grown["user_id"][:n] == old["user_id"].to_pylist(), "rare old users are kept"
    assert any(day2.get(v, 0) < 5 for v in grown["user_id"][:n])
    appended = grown["user_id"][n:]
    assert appended and all(day2[v] >= 5 for v in appended)
    assert len(appended) == sum(1 for v, c in day2.items() if c >= 5 and v not in set(old["user_id"].to_pylist()))
    assert sizes["user_id"] == (n, len(appended))


def test_fresh_and_uncounted_features(days: Path) -> None:
    full = read_vocab_table(days / "day1" / "vocab.parquet")
    keep = pa.array([f in ("user_id", "author_id") for f in full.column("feature").to_pylist()])
    old = full.filter(keep)  # no video_id vocabulary
    table, sizes = _grow(days, columns=["user_id", "video_id"], old=old)
    got = _features(table)
    assert list(got) == ["user_id", "author_id", "video_id", "tag"], "old features first, then fresh ones"
    want = _features(old)["author_id"]
    assert got["author_id"] == want and sizes["author_id"] == (len(want[0]), 0), "not counted: copied unchanged"
    fresh = build_vocab(_train(days, "day2"), columns=["video_id"], multi_hot={})["video_id"].table()
    assert got["video_id"] == (fresh["value"].to_pylist(), fresh["count"].to_pylist()), "a fresh vocabulary"
    assert sizes["video_id"] == (0, fresh.num_rows)


def test_cli_extends_in_place_atomically(days: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    vocab = tmp_path / "vocab.parquet"
    shutil.copy(days / "day1" / "vocab.parquet", vocab)
    want, sizes = _grow(days)
    args = ["--columns", *COLUMNS, "--multi-hot", "tag=,", "--files", str(days / "day2" / "train" / "*.parquet")]
    main(["vocab", "--extend", str(vocab), "--out", str(vocab), *args])
    assert pq.read_table(vocab).equals(want)
    assert [p.name for p in tmp_path.iterdir()] == ["vocab.parquet"], "no temporary file left"
    lines = capsys.readouterr().out.splitlines()
    before, added = sizes["user_id"]
    assert f"  user_id: {before} old + {added} new = {before + added}" in lines
    assert len(lines) == 1 + len(sizes), "a header, then one line per feature"


def test_failed_write_leaves_the_old_file(days: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vocab = tmp_path / "vocab.parquet"
    shutil.copy(days / "day1" / "vocab.parquet", vocab)
    before = vocab.read_bytes()

    def broken(table: pa.Table, where: Any) -> None:
        where.write(b"PAR1 partial")
        raise OSError("disk full")

    monkeypatch.setattr(prepare_module.pq, "write_table", broken)
    args = ["--columns", "user_id", "--files", str(days / "day2" / "train" / "*.parquet")]
    with pytest.raises(OSError, match="disk full"):
        main(["vocab", "--extend", str(vocab), "--out", str(vocab), *args])
    assert vocab.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["vocab.parquet"], "the partial file is removed"


def test_extend_errors(days: Path, tmp_path: Path) -> None:
    files = ["--files", str(days / "day2" / "train" / "*.parquet")]
    missing = tmp_path / "nope" / "vocab.parquet"
    with pytest.raises(FileNotFoundError, match=f"--extend: vocabulary file not found: {missing}"):
        main(["vocab", "--extend", str(missing), "--out", str(tmp_path / "v.parquet"), "--columns", "user_id", *files])
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"feature": ["user_id"], "id": ["1"]}), wrong)
    with pytest.raises(
        ValueError, match=r"--extend=.*wrong\.parquet.*expected columns \['feature', 'value', 'count'\]"
    ):
        main(["vocab", "--extend", str(wrong), "--out", str(wrong), "--columns", "user_id", *files])
    text = tmp_path / "text.parquet"
    text.write_text("feature,value,count\n")
    with pytest.raises(ValueError, match="not a readable Parquet vocabulary file"):
        main(["vocab", "--extend", str(text), "--out", str(text), "--columns", "user_id", *files])
    with pytest.raises(SystemExit):
        main(["vocab", "--extend", str(wrong), "--out", str(wrong), "--max-size", "10", *files])
    assert not (tmp_path / "v.parquet").exists()


def _config(root: Path, day: str, **overrides: Any) -> ParquetStreamConfig:
    base: dict[str, Any] = {
        "train": [str(root / day / "train" / "*.parquet")],
        "val": [str(root / day / "val" / "*.parquet")],
        "test": [str(root / day / "test" / "*.parquet")],
        "categorical": COLUMNS,
        "multi_hot": MULTI,
        "dense": list(DENSE),
        "log1p": list(DENSE[:4]),
        "user_id": "user_id",
        "tasks": [{"name": t, "column": t} for t in TASKS],
        "ids": "vocab",
        "vocab_file": str(root / day / "vocab.parquet"),
        "stats_file": str(root / day / "stats.json"),
        "shuffle_buffer": 1000,
        "read_batch_rows": 500,
    }
    base.update(overrides)
    return ParquetStreamConfig(**base)


def test_stream_source_on_day2_with_the_grown_vocabulary(days: Path) -> None:
    grown = days / "grown_stream.parquet"
    prepare_module.write_vocab_table(grown, _grow(days)[0])
    day1 = build_dataset(_config(days, "day1"))
    day2 = build_dataset(_config(days, "day2", vocab_file=str(grown)))
    want = read_vocab(grown)
    vocab1: dict[str, pa.Array] = day1.info["vocab"]  # type: ignore[assignment]
    vocab2: dict[str, pa.Array] = day2.info["vocab"]  # type: ignore[assignment]
    assert list(vocab2) == [feature_name(c) for c in [*COLUMNS, *MULTI]]
    for c in [*COLUMNS, *MULTI]:
        got = vocab2[feature_name(c)]
        assert isinstance(got, pa.Array) and got.equals(want[c]), f"{c}: the file's values in id order"
        assert day2.spec.feature(feature_name(c)).num_embeddings == len(want[c]) + 1
        assert got[: len(vocab1[feature_name(c)])].equals(vocab1[feature_name(c)]), f"{c}: day 1's ids kept"
    for f in ("user_id", "video_id", "author_id", "music_id"):
        assert day2.spec.feature(f).num_embeddings > day1.spec.feature(f).num_embeddings, f
    loader = build_train_loader(day2, batch_size=500, rank=0, world_size=1, seed=0, prefetch=0)
    for batch in itertools.islice(iter(loader), 6):  # every day-2 train row
        for f in ("user_id", "video_id", "tag"):
            assert int((batch.sparse[f].values() == 0).sum()) == 0, f"{f}: every day-2 value has an id"
    hashed = build_dataset(
        _config(days, "day2", ids="hash", vocab_file=None, num_embeddings=dict.fromkeys([*COLUMNS, "tag"], 1000))
    )
    assert "vocab" not in hashed.info
