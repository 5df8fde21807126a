"""Files a streaming source reads instead of a full pass: vocabularies and dense statistics.

Vocabulary file (`data.vocab_file`, written by `write_vocab`): one Parquet file with
columns `feature` (the source column name, string), `value` (the value's text as the
source reads it: `data.parsing.files.strings`, e.g. "123" for the integer 123; string) and
`count` (train occurrences, int64). The rows of one feature are in id order: the k-th
row of a feature is id k (from 1; id 0 = empty or out of vocabulary). `build_vocab`
orders by descending count, then value, and can cut by `min_count` / `max_size`, so the
most frequent values get the smallest ids.

Dense statistics file (`data.stats_file`, JSON, written by `write_stats`):
`{"rows": N, "columns": {column: {"count", "mean", "std", "log1p_mean", "log1p_std"}}}`
with the moments of the raw values and of `sign(x) * log1p(|x|)` over the finite train
values; a source uses the `log1p_` pair for its `data.log1p` columns.

CLI (reads Parquet with `iter_batches`, memory bounded by the distinct values):

    python -m data.stream vocab --out vocab.parquet --columns user_id video_id \
        --multi-hot tag=, [--min-count 1] [--max-size 0] --files 'train/*.parquet'
    python -m data.stream stats --out stats.json --columns duration_ms [--rows 0] --files 'train/*.parquet'

Legend: N rows, Dn dense columns.
"""

from __future__ import annotations

import argparse
import glob
import json
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
    table = pa.concat_tables(tables).cast(VOCAB_SCHEMA) if tables else VOCAB_SCHEMA.empty_table()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def read_vocab(path: str | Path) -> dict[str, pa.Array]:
    """Feature column -> its values in id order (ids 1..V)."""
    table = pq.read_table(path)
    if set(VOCAB_SCHEMA.names) - set(table.column_names):
        raise ValueError(
            f"data.vocab_file={str(path)!r}: expected columns {VOCAB_SCHEMA.names}, has {table.column_names}"
        )
    features = table.column("feature").combine_chunks()
    values = table.column("value").combine_chunks()
    return {str(f): values.filter(pc.equal(features, f)) for f in pc.unique(features).to_pylist()}


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
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(moments.as_dict(), indent=1) + "\n")


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
    v.add_argument("--max-size", type=int, default=0, help="values kept per feature (0 = all)")
    s = sub.add_parser("stats", help="write a dense statistics file from train Parquet files")
    s.add_argument("--files", nargs="+", required=True, help="train files or globs")
    s.add_argument("--out", required=True)
    s.add_argument("--columns", nargs="+", required=True, help="dense columns")
    s.add_argument("--rows", type=int, default=0, help="first N rows only (0 = all)")
    args = parser.parse_args(argv)
    files = expand_paths(args.files, key="files")
    if args.command == "vocab":
        multi = dict(item.split("=", 1) if "=" in item else (item, ",") for item in args.multi_hot)
        counts = build_vocab(files, columns=args.columns, multi_hot=multi)
        write_vocab(args.out, counts, min_count=args.min_count, max_size=args.max_size)
        sizes = {c: vc.table(min_count=args.min_count, max_size=args.max_size).num_rows for c, vc in counts.items()}
        print(f"wrote {args.out}: {sizes}")
    else:
        moments = file_stats(files, args.columns, rows=args.rows)
        write_stats(args.out, moments)
        print(f"wrote {args.out}: {moments.rows} rows, {len(args.columns)} columns")
