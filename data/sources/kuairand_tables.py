"""KuaiRand's files as tables (used by `data/sources/kuairand.py`): a `Source` (the log, the user
table or one video table, each one or more row-wise files), reading its columns under the
bad-row policy, and joining a feature table to the log rows by id.

Legend: N log rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data.parsing.bad_rows import SkipLog
from data.parsing.files import binary_labels, category_codes, delimiter_hint, file_format, floats, read_columns, strings


@dataclass(slots=True)
class Source:
    """One feature source (the log, the user table, or one video table).

    Attributes:
        name: `log`, `user` or `video<i>`.
        paths: its files (row-wise parts).
        columns: columns every one of its files has.
        key: join column (None for the log).
        fmt, delimiter: how its files are read (`data.format`, `data.delimiter`).
    """

    name: str
    paths: list[str]
    columns: list[str]
    key: str | None
    fmt: str = "auto"
    delimiter: str = ","

    def hint(self) -> str:
        """A wrong-delimiter hint for "column not found" errors ('' when none applies)."""
        csv = file_format(self.paths[0], self.fmt) == "csv"
        return delimiter_hint(self.columns, self.delimiter) if csv else ""


@dataclass(frozen=True, slots=True)
class Feature:
    column: str
    kind: str  # cat | multi | dense
    source: str
    sep: str = ","


@dataclass(slots=True)
class Read:
    """A source's columns: strings for ids, float64 (NaN = empty) for dense and labels."""

    text: dict[str, pa.ChunkedArray]
    numbers: dict[str, np.ndarray]
    file_rows: list[int]
    rows: list[np.ndarray] = field(default_factory=list)  # per file: file row number of each kept row


def read_source(
    source: Source,
    text_cols: list[str],
    number_cols: list[str],
    limit_rows: int = 0,
    *,
    skips: SkipLog | None = None,
    label_cols: tuple[str, ...] = (),
) -> Read:
    """Columns of every file of `source`; bad rows (ragged lines, non-numeric cells, labels
    in `label_cols` other than 0 / 1) raise or, under the skip policy, are dropped."""
    skips = skips or SkipLog()
    text: dict[str, list[pa.ChunkedArray]] = {c: [] for c in text_cols}
    numbers: dict[str, list[np.ndarray]] = {c: [] for c in number_cols}
    file_rows, rows = [], []
    for path in source.paths:
        table = read_columns(
            path,
            columns=[*text_cols, *number_cols],
            fmt=source.fmt,
            delimiter=source.delimiter,
            limit_rows=limit_rows,
            skips=skips,
        )
        bad = skips.file(path, table.num_rows)
        parsed = {c: floats(table.column(c), path=path, column=c, bad=bad) for c in number_cols}
        for c in label_cols:
            binary_labels(parsed[c], path=path, column=c, bad=bad)
        keep_N = bad.keep()
        if not keep_N.all():
            table = table.filter(pa.array(keep_N))
            parsed = {c: v[keep_N] for c, v in parsed.items()}
        file_rows.append(table.num_rows)
        rows.append(bad.file_rows(np.flatnonzero(keep_N)))
        for c in text_cols:
            text[c].append(strings(table.column(c)))
        for c in number_cols:
            numbers[c].append(parsed[c])
    return Read(
        text={c: pa.chunked_array([ch for a in v for ch in a.chunks], pa.string()) for c, v in text.items()},
        numbers={c: np.concatenate(v) for c, v in numbers.items()},
        file_rows=file_rows,
        rows=rows,
    )


def join_index(log_keys: pa.ChunkedArray, source: Source, keys: pa.ChunkedArray) -> np.ndarray:
    """`[N]` row of the table for each log row (-1 = id absent); duplicated ids -> error."""
    codes, _ = category_codes(keys)
    valid = codes >= 0
    _, first = np.unique(codes[valid], return_index=True)
    if len(first) != int(valid.sum()):
        rows = np.flatnonzero(valid)
        dup = int(np.setdiff1d(np.arange(len(rows)), first)[0])
        raise ValueError(f"{source.paths}: {source.key} {keys[int(rows[dup])].as_py()!r} appears twice")
    index = pc.index_in(log_keys, value_set=keys.combine_chunks(), skip_nulls=True)
    return np.asarray(pc.fill_null(index, -1).to_numpy(zero_copy_only=False), dtype=np.int64)


def join_table(
    source: Source,
    own: list[Feature],
    log_keys: pa.ChunkedArray,
    text: dict[str, pa.ChunkedArray],
    dense: dict[str, np.ndarray],
    skips: SkipLog,
) -> int:
    """Add the table's feature columns, aligned to log rows, to `text` / `dense`.

    Returns:
        The number of log rows whose id the table lacks.
    """
    key = str(source.key)
    table = read_source(
        source,
        [key, *(f.column for f in own if f.kind != "dense")],
        [f.column for f in own if f.kind == "dense"],
        skips=skips,
    )
    index = join_index(log_keys, source, table.text[key])
    missing = index < 0
    take = pa.array(index, mask=missing)
    for f in own:
        if f.kind == "dense":
            dense[f.column] = np.where(missing, np.nan, table.numbers[f.column][np.maximum(index, 0)])
        else:
            text[f.column] = pc.take(table.text[f.column], take)
    return int(missing.sum())


def concat_reads(first: Read, second: Read) -> Read:
    """Rows of `second` after those of `first`, for the columns `second` has."""
    return Read(
        text={c: pa.chunked_array([*first.text[c].chunks, *v.chunks], pa.string()) for c, v in second.text.items()},
        numbers={c: np.concatenate([first.numbers[c], v]) for c, v in second.numbers.items() if c in first.numbers},
        file_rows=[*first.file_rows, *second.file_rows],
        rows=[*first.rows, *second.rows],
    )
