"""Files a streaming source reads instead of a full pass: vocabularies and dense statistics.

Vocabulary file (`data.vocab_file`, written by `write_vocab`): one Parquet file with
columns `feature` (the source column name, string), `value` (the value's text as the
source reads it: `data.parsing.files.strings`, e.g. "123" for the integer 123; string) and
`count` (train occurrences, int64). The rows of one feature are in id order: the k-th
row of a feature is id k (from 1; id 0 = empty or out of vocabulary). `build_vocab`
orders by descending count, then value, and can cut by `min_count` / `max_size`, so the
most frequent values get the smallest ids.

Extending a vocabulary (continuous training: day 2 brings new users and items): `extend_vocab`
keeps every row of the old file at its id (per feature, the same values in the same
order) and appends the new files' values the old file lacks, ordered as `build_vocab`
orders (descending count in the new files, then value; `min_count` cuts new values
only, never an old row). Old rows' counts are updated: old count plus the value's
occurrences in the new files, so `count` stays the train occurrences over every file the
vocabulary has seen. A feature of the counts that the old file lacks gets a fresh
vocabulary; a feature of the old file that is not counted is copied unchanged. The file
keeps one block of rows per feature (old features in their order, then fresh ones), so
an embedding row trained for id k still belongs to the same value: a warm start
(`trainer.init_from`) keeps those rows and only the appended ids start fresh.

Every file here is written atomically (a temporary file in the same folder, then
`os.replace`), so `--out` may be the `--extend` file itself and a reader never sees a
partial file.

Dense statistics file (`data.stats_file`, JSON, written by `write_stats`):
`{"rows": N, "columns": {column: {"count", "mean", "std", "log1p_mean", "log1p_std"}}}`
with the moments of the raw values and of `sign(x) * log1p(|x|)` over the finite train
values; a source uses the `log1p_` pair for its `data.log1p` columns.

CLI (reads Parquet with `iter_batches`, memory bounded by the distinct values):

    python -m data.stream vocab --out vocab.parquet --columns user_id video_id \
        --multi-hot tag=, [--min-count 1] [--max-size 0] --files 'train/*.parquet'
    python -m data.stream vocab --extend vocab.parquet --out vocab.parquet --columns user_id video_id \
        --multi-hot tag=, [--min-count 1] --files 'day2/*.parquet'
    python -m data.stream stats --out stats.json --columns duration_ms [--rows 0] --files 'train/*.parquet'

Legend: N rows, Dn dense columns.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data.parsing.bad_rows import SkipLog
from data.parsing.files import floats, signed_log1p, split_lists, strings

VOCAB_SCHEMA = pa.schema([("feature", pa.string()), ("value", pa.string()), ("count", pa.int64())])


def expand_paths(patterns: Iterable[str], *, key: str) -> list[str]:
    """Paths and globs (`**` allowed) -> sorted, de-duplicated files; ValueError naming `key`."""
    out: set[str] = set()
    for pattern in patterns:
        if glob.has_magic(pattern):
            found = [p for p in glob.glob(pattern, recursive=True) if Path(p).is_file()]
            if not found:
                raise ValueError(f"{key}: {pattern!r} matches no file")
            out.update(found)
        elif Path(pattern).is_file():
            out.add(pattern)
        else:
            raise FileNotFoundError(f"{key}: data file not found: {pattern}")
    if not out:
        raise ValueError(f"{key} names no file")
    return sorted(out)


# ------------------------------------------------------------------------- vocabulary


class ValueCounts:
    """Running counts of one feature's values (pyarrow group-by; memory ~ distinct values)."""

    def __init__(self) -> None:
        self._parts: list[pa.Table] = []

    def add(self, values: pa.Array | pa.ChunkedArray) -> None:
        counts = pc.value_counts(strings(values).combine_chunks())
        table = pa.table({"value": counts.field("values"), "count": pc.cast(counts.field("counts"), pa.int64())})
        self._parts.append(table.filter(pc.is_valid(table["value"])))
        if len(self._parts) > 8:  # bound the pending per-batch counts
            self._parts = [self._merged()]

    def add_counts(self, values: pa.Array, counts: np.ndarray) -> None:
        """Values with known counts (the generator counts ids with `bincount`)."""
        keep = counts > 0
        self._parts.append(pa.table({"value": strings(values.filter(pa.array(keep))), "count": counts[keep]}))

    def _merged(self) -> pa.Table:
        if not self._parts:
            return pa.table({"value": pa.array([], pa.string()), "count": pa.array([], pa.int64())})
        table = pa.concat_tables(self._parts).group_by("value").aggregate([("count", "sum")])
        return table.rename_columns(["value", "count"])

    def table(self, *, min_count: int = 1, max_size: int = 0) -> pa.Table:
        """(value, count) by descending count, then value; cut by `min_count` / `max_size`."""
        table = self._merged().sort_by([("count", "descending"), ("value", "ascending")])
        table = table.filter(pc.greater_equal(table["count"], min_count))
        return table.slice(0, max_size) if max_size > 0 else table


def write_vocab(path: str | Path, counts: dict[str, ValueCounts], *, min_count: int = 1, max_size: int = 0) -> None:
    tables = []
    for feature, c in counts.items():
        t = c.table(min_count=min_count, max_size=max_size)
        tables.append(pa.table({"feature": pa.array([feature] * t.num_rows, pa.string()), **t.to_pydict()}))
    write_vocab_table(path, pa.concat_tables(tables).cast(VOCAB_SCHEMA) if tables else VOCAB_SCHEMA.empty_table())


def write_vocab_table(path: str | Path, table: pa.Table) -> None:
    """Write a vocabulary table atomically (temporary file in the same folder, then `os.replace`)."""
    _write_atomic(path, lambda f: pq.write_table(table.cast(VOCAB_SCHEMA), f))


def _write_atomic(path: str | Path, write: Any) -> None:
    """`write(binary file)` into a temporary file beside `path`, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_vocab_table(path: str | Path, *, key: str = "data.vocab_file") -> pa.Table:
    """The whole vocabulary file as a `VOCAB_SCHEMA` table; errors name `key` and the path."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{key}: vocabulary file not found: {path}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{key}={str(path)!r} is not a readable Parquet vocabulary file: {e}") from e
    if set(VOCAB_SCHEMA.names) - set(table.column_names):
        raise ValueError(f"{key}={str(path)!r}: expected columns {VOCAB_SCHEMA.names}, has {table.column_names}")
    try:
        return table.select(VOCAB_SCHEMA.names).cast(VOCAB_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise ValueError(f"{key}={str(path)!r}: columns are not {VOCAB_SCHEMA}: {e}") from e


def read_vocab(path: str | Path) -> dict[str, pa.Array]:
    """Feature column -> its values in id order (ids 1..V)."""
    return _by_feature(read_vocab_table(path), "value")


def _by_feature(table: pa.Table, column: str) -> dict[str, pa.Array]:
    """Feature -> `column` of its rows in file order, features in order of first appearance."""
    features = table.column("feature").combine_chunks()
    values = table.column(column).combine_chunks()
    return {str(f): values.filter(pc.equal(features, f)) for f in pc.unique(features).drop_null().to_pylist()}


def extend_vocab(
    old: str | Path | pa.Table, counts: dict[str, ValueCounts], *, min_count: int = 1
) -> tuple[pa.Table, dict[str, tuple[int, int]]]:
    """The old vocabulary with the counted values it lacks appended (see the module doc).

    Args:
        old: the old vocabulary file (or its `read_vocab_table`).
        counts: feature -> counts of the new files (`build_vocab`).
        min_count: fewest occurrences in the new files for a new value to be appended.

    Returns:
        The new table (`VOCAB_SCHEMA`) and feature -> (old size, values appended).
    """
    table = old if isinstance(old, pa.Table) else read_vocab_table(old, key="--extend")
    if table.column("feature").null_count or table.column("value").null_count:
        where = "--extend" if isinstance(old, pa.Table) else f"--extend={str(old)!r}"
        raise ValueError(f"{where}: a row has an empty feature or value")
    table = table.set_column(2, "count", pc.fill_null(table.column("count"), 0))
    old_values, old_counts = _by_feature(table, "value"), _by_feature(table, "count")
    parts, sizes = [], {}
    for feature in [*old_values, *(f for f in counts if f not in old_values)]:
        values = old_values.get(feature, pa.array([], pa.string()))
        count = old_counts.get(feature, pa.array([], pa.int64()))
        n_old = len(values)
        if feature in counts:
            seen = counts[feature].table()  # all counted values, by descending count then value
            seen_values, seen_counts = seen["value"].combine_chunks(), seen["count"].combine_chunks()
            at = pc.index_in(values, value_set=seen_values)  # old value -> its row in `seen`
            count = pc.add(count, pc.fill_null(pc.take(seen_counts, at), 0))
            fresh = pc.and_(
                pc.invert(pc.is_in(seen_values, value_set=values)), pc.greater_equal(seen_counts, min_count)
            )
            values = pa.concat_arrays([values, seen_values.filter(fresh)])
            count = pa.concat_arrays([count, seen_counts.filter(fresh)])
        sizes[feature] = (n_old, len(values) - n_old)
        parts.append(
            pa.table(
                {"feature": pa.repeat(pa.scalar(feature, pa.string()), len(values)), "value": values, "count": count}
            )
        )
    out = pa.concat_tables(parts).cast(VOCAB_SCHEMA) if parts else VOCAB_SCHEMA.empty_table()
    return out, sizes


def build_vocab(
    files: list[str], *, columns: list[str], multi_hot: dict[str, str], min_count: int = 1, max_size: int = 0
) -> dict[str, ValueCounts]:
    """Count the values of `columns` (single-hot) and `multi_hot` (tokens) over `files`."""
    counts = {c: ValueCounts() for c in [*columns, *multi_hot]}
    for batch in _batches(files, list(counts)):
        for c in columns:
            counts[c].add(batch.column(c))
        for c, sep in multi_hot.items():
            counts[c].add(split_lists(batch.column(c), sep)[1])
    return counts


def _batches(files: list[str], columns: list[str], rows: int = 0) -> Iterator[pa.Table]:
    """Record batches of `columns` over `files` in order (the first `rows` rows; 0 = all)."""
    seen = 0
    for path in files:
        pf = pq.ParquetFile(path)
        missing = [c for c in columns if c not in pf.schema_arrow.names]
        if missing:
            raise ValueError(f"{path}: no column(s) {missing}; the file has {pf.schema_arrow.names}")
        for rb in pf.iter_batches(batch_size=65_536, columns=columns):
            table = pa.Table.from_batches([rb])
            if rows and seen + table.num_rows >= rows:
                yield table.slice(0, rows - seen)
                return
            seen += table.num_rows
            yield table


# ------------------------------------------------------------------------ dense stats


class DenseMoments:
    """Count / mean / M2 per column of raw and signed-log1p values (Chan's merge, float64).

    Non-finite values are left out (the source reports them as bad rows when it reads them).
    """

    def __init__(self, columns: list[str]) -> None:
        self.columns = list(columns)
        self.rows = 0
        d = 2 * len(columns)  # raw, then log1p
        self.n, self.mean, self.m2 = np.zeros(d), np.zeros(d), np.zeros(d)

    def add(self, x_ND: np.ndarray) -> None:
        self.rows += len(x_ND)
        both = np.concatenate([x_ND, signed_log1p(x_ND)], axis=1)
        ok = np.isfinite(both)
        n = ok.sum(axis=0).astype(np.float64)
        safe = np.where(ok, both, 0.0)
        mean = safe.sum(axis=0) / np.maximum(n, 1)
        m2 = (np.where(ok, safe - mean, 0.0) ** 2).sum(axis=0)
        total = self.n + n
        delta = mean - self.mean
        w = np.divide(n, total, out=np.zeros_like(n), where=total > 0)
        self.mean = self.mean + delta * w
        self.m2 = self.m2 + m2 + delta**2 * self.n * w
        self.n = total

    def as_dict(self) -> dict[str, Any]:
        std = np.sqrt(self.m2 / np.maximum(self.n, 1))
        k = len(self.columns)
        cols = {
            c: {
                "count": int(self.n[i]),
                "mean": float(self.mean[i]),
                "std": float(std[i]),
                "log1p_mean": float(self.mean[k + i]),
                "log1p_std": float(std[k + i]),
            }
            for i, c in enumerate(self.columns)
        }
        return {"rows": self.rows, "columns": cols}


def dense_values(table: pa.Table, columns: list[str], *, path: str) -> np.ndarray:
    """`[N, Dn]` float64 of `columns`; non-numeric cells become NaN (no error, no count)."""
    quiet = SkipLog("skip")  # flags are never committed (no keep()): nothing logged or counted
    cols = [floats(table.column(c), path=path, column=c, bad=quiet.file(path, table.num_rows)) for c in columns]
    return np.stack(cols, axis=1) if cols else np.zeros((table.num_rows, 0))


def write_stats(path: str | Path, moments: DenseMoments) -> None:
    text = (json.dumps(moments.as_dict(), indent=1) + "\n").encode()
    _write_atomic(path, lambda f: f.write(text))


def read_stats(path: str | Path, columns: list[str], log1p: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(`[Dn]` mean, `[Dn]` std) for `columns`, the log1p pair for `log1p` columns."""
    doc = json.loads(Path(path).read_text())
    have = doc.get("columns", {})
    missing = [c for c in columns if c not in have]
    if missing:
        raise ValueError(f"data.stats_file={str(path)!r} has no statistics for dense column(s) {missing}")
    pre = ["log1p_" if c in log1p else "" for c in columns]
    mean = np.array([have[c][p + "mean"] for c, p in zip(columns, pre, strict=True)], dtype=np.float64)
    std = np.array([have[c][p + "std"] for c, p in zip(columns, pre, strict=True)], dtype=np.float64)
    if not (np.isfinite(mean).all() and np.isfinite(std).all()):
        raise ValueError(f"data.stats_file={str(path)!r}: non-finite statistics for {columns}")
    return mean, std


def file_stats(files: list[str], columns: list[str], *, rows: int = 0) -> DenseMoments:
    moments = DenseMoments(columns)
    for table in _batches(files, columns, rows):
        moments.add(dense_values(table, columns, path="stats"))
    return moments


# -------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data.stream", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("vocab", help="write a vocabulary file from train Parquet files")
    v.add_argument("--files", nargs="+", required=True, help="train files or globs")
    v.add_argument("--out", required=True)
    v.add_argument("--columns", nargs="*", default=[], help="single-hot categorical columns")
    v.add_argument("--multi-hot", nargs="*", default=[], help="COLUMN=SEP (SEP ignored for list columns)")
    v.add_argument("--min-count", type=int, default=1)
    v.add_argument("--max-size", type=int, default=0, help="values kept per feature (0 = all; not with --extend)")
    v.add_argument(
        "--extend",
        metavar="OLD",
        help="keep every row of this vocabulary at its id and append the values of --files it lacks "
        "(--min-count cuts new values only); --out may be OLD (written atomically)",
    )
    s = sub.add_parser("stats", help="write a dense statistics file from train Parquet files")
    s.add_argument("--files", nargs="+", required=True, help="train files or globs")
    s.add_argument("--out", required=True)
    s.add_argument("--columns", nargs="+", required=True, help="dense columns")
    s.add_argument("--rows", type=int, default=0, help="first N rows only (0 = all)")
    args = parser.parse_args(argv)
    if args.command == "vocab" and args.extend and args.max_size:
        parser.error("--max-size cuts a fresh vocabulary; --extend never drops an old row")
    old = read_vocab_table(args.extend, key="--extend") if args.command == "vocab" and args.extend else None
    files = expand_paths(args.files, key="files")
    if args.command == "vocab":
        multi = dict(item.split("=", 1) if "=" in item else (item, ",") for item in args.multi_hot)
        counts = build_vocab(files, columns=args.columns, multi_hot=multi)
        if old is not None:
            table, grown = extend_vocab(old, counts, min_count=args.min_count)
            write_vocab_table(args.out, table)
            print(f"wrote {args.out}: {args.extend} extended with {len(files)} file(s)")
            in_old = set(pc.unique(old.column("feature")).to_pylist())
            for feature, (before, added) in grown.items():
                note = "" if feature in in_old else " (fresh vocabulary)"
                note = note if feature in counts else " (not in --columns / --multi-hot: copied)"
                print(f"  {feature}: {before} old + {added} new = {before + added}{note}")
            return
        write_vocab(args.out, counts, min_count=args.min_count, max_size=args.max_size)
        sizes = {c: vc.table(min_count=args.min_count, max_size=args.max_size).num_rows for c, vc in counts.items()}
        print(f"wrote {args.out}: {sizes}")
    else:
        moments = file_stats(files, args.columns, rows=args.rows)
        write_stats(args.out, moments)
        print(f"wrote {args.out}: {moments.rows} rows, {len(args.columns)} columns")
