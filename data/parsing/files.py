"""Reading CSV / Parquet files and converting their cells: shared by the file sources
(`data/sources/tabular.py`, `data/sources/kuairand.py`).

- CSV is read with every column as a string (no type guessing from the first block,
  which breaks on files whose column turns non-integer after a million rows); each role
  then converts its columns, so a bad value is reported with file, row and column.
  Rows are numbered from 1, header excluded. Only an empty cell is null.
- Bad cells (non-numeric, non-finite dense, labels other than 0 / 1) and CSV lines with
  the wrong field count are bad rows under the `data.on_bad_row` policy
  (`data/parsing/bad_rows.py`): an error naming file, row and column, or skipped and counted.
- Encoding: dictionary codes, train-only vocabularies (id 0 = empty or unseen), user ids.
- `data.delimiter` accepts one character, or `tab` / the two characters `\\t` (what a
  shell passes for `data.delimiter='\\t'`) for a tab; a file that reads as one column
  gets a hint in the error that the delimiter may be wrong.

Legend: N rows, nnz ids of a multi-hot column.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from data.parsing.bad_rows import BadRows, SkipLog, first_ragged_line

FORMATS = ("auto", "csv", "parquet")
NAME_RE = re.compile(r"[^A-Za-z0-9_]")
DELIMITER_ALIASES = {"\\t": "\t", "tab": "\t"}  # how a tab is spelled in a config -> the character
LIKELY_DELIMITERS = {"\t": "'\\t'", ";": "';'", "|": "'|'", ",": "','"}  # character -> how to spell it
NOT_DELIMITERS = ('"', "\n", "\r")


def csv_delimiter(value: object, *, key: str = "data.delimiter") -> str:
    """The CSV field separator meant by `value`: one character, or `tab` / `\\t` (two
    characters, as Hydra receives `data.delimiter='\\t'`) for a tab.

    Raises:
        ValueError: naming `key`, for anything else.
    """
    text = DELIMITER_ALIASES.get(value.lower(), value) if isinstance(value, str) else value
    if not isinstance(text, str) or len(text) != 1 or text in NOT_DELIMITERS:
        raise ValueError(
            f"{key}={value!r} is not a field separator; give one character (',', ';', '|'), or 'tab' / '\\t' for a tab"
        )
    return text


def delimiter_hint(columns: list[str], delimiter: str) -> str:
    """Text to add to a "column not found" error when the header read as a single column:
    the usual sign of a wrong `data.delimiter` ('' otherwise)."""
    if len(columns) != 1:
        return ""
    for char, spelled in LIKELY_DELIMITERS.items():
        if char != delimiter and char in columns[0]:
            return f"; the header reads as one column: is the file separated by {spelled}? set data.delimiter={spelled}"
    return f"; the header reads as one column: is data.delimiter={delimiter!r} the file's separator?"


# ----------------------------------------------------------------------------- reading


def file_format(path: str | Path, fmt: str = "auto") -> str:
    if fmt not in FORMATS:
        raise ValueError(f"data.format={fmt!r}; choose one of {FORMATS}")
    if fmt != "auto":
        return fmt
    return "parquet" if str(path).lower().endswith((".parquet", ".pq")) else "csv"


def read_columns(
    path: str | Path,
    *,
    columns: list[str],
    fmt: str = "auto",
    delimiter: str = ",",
    column_names: list[str] | None = None,
    limit_rows: int = 0,
    skips: SkipLog | None = None,
) -> pa.Table:
    """Read `columns` of one file (CSV: all as strings); missing file / column -> error.

    A CSV line with the wrong number of fields is an error, or is skipped and counted
    when `skips` has the skip policy.
    """
    path = Path(path)
    present = file_columns(path, fmt=fmt, delimiter=delimiter, column_names=column_names)
    missing = [c for c in columns if c not in present]
    if missing:
        hint = delimiter_hint(present, delimiter) if file_format(path, fmt) == "csv" else ""
        raise ValueError(f"{path}: no column(s) {missing}; the file has {present}{hint}")
    columns = list(dict.fromkeys(columns))
    try:
        if file_format(path, fmt) == "parquet":
            table = pq.read_table(path, columns=columns)
            return table.slice(0, limit_rows) if limit_rows else table
        skipping = skips is not None and skips.skip  # single-threaded: skipped lines get numbers
        read = pacsv.ReadOptions(column_names=column_names, block_size=1 << 24, use_threads=not skipping)
        handler = (
            skips.ragged_line_handler(path, header=column_names is None) if skips is not None and skips.skip else None
        )
        parse = pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=handler)
        convert = pacsv.ConvertOptions(
            include_columns=columns,
            column_types={c: pa.string() for c in columns},
            strings_can_be_null=True,
            null_values=[""],
        )
        if not limit_rows:
            return pacsv.read_csv(path, read_options=read, parse_options=parse, convert_options=convert)
        batches, num_rows = [], 0
        with pacsv.open_csv(path, read_options=read, parse_options=parse, convert_options=convert) as reader:
            for batch in reader:
                batches.append(batch)
                num_rows += batch.num_rows
                if num_rows >= limit_rows:
                    break
        return pa.Table.from_batches(batches, schema=reader.schema).slice(0, limit_rows)
    except (pa.ArrowInvalid, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        if file_format(path, fmt) == "csv" and "columns" in str(e):

            def reread(handler: Any) -> Any:
                options = pacsv.ReadOptions(column_names=column_names, use_threads=False, block_size=1 << 24)
                parse = pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=handler)
                return pacsv.read_csv(path, read_options=options, parse_options=parse, convert_options=convert)

            ragged = first_ragged_line(reread, path, header=column_names is None)
            if ragged is not None:
                raise ValueError(f"{ragged} (data.on_bad_row=skip drops such rows)") from e
        raise ValueError(f"{path}: cannot be read as {file_format(path, fmt)}: {e}") from e


def file_columns(
    path: str | Path, *, fmt: str = "auto", delimiter: str = ",", column_names: list[str] | None = None
) -> list[str]:
    """Column names of a file (CSV: its header line or `column_names`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if column_names is not None:
        return list(column_names)
    try:
        if file_format(path, fmt) == "parquet":
            return list(pq.read_schema(path).names)
        read = pacsv.ReadOptions(block_size=1 << 20)
        # only the header matters here: rows are checked (and counted) by read_columns
        parse = pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=lambda row: "skip")
        with pacsv.open_csv(path, read_options=read, parse_options=parse) as r:
            return list(r.schema.names)
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{path}: cannot be read as {file_format(path, fmt)}: {e}") from e


# -------------------------------------------------------------------- column converters


def strings(arr: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray:
    """Column as trimmed strings; empty cells are null."""
    if isinstance(arr, pa.Array):
        arr = pa.chunked_array([arr])
    if arr.type != pa.string():
        arr = pc.cast(arr, pa.string())
    arr = pc.utf8_trim_whitespace(arr)
    return pc.if_else(pc.equal(arr, ""), pa.scalar(None, arr.type), arr)


def bad_rows_for(bad: BadRows | None, path: str | Path, num_rows: int) -> BadRows:
    """`bad`, or a raise-on-first one for callers outside a source's file parse."""
    return bad if bad is not None else SkipLog().file(path, num_rows)


def floats(arr: pa.ChunkedArray | pa.Array, *, path: str | Path, column: str, bad: BadRows | None = None) -> np.ndarray:
    """`[N]` float64; null -> NaN; a non-numeric cell is a bad row (NaN when skipped)."""
    if pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type) or pa.types.is_boolean(arr.type):
        return np.asarray(pc.cast(arr, pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
    text = strings(arr)
    try:
        values = pc.cast(text, pa.float64())
    except pa.ArrowInvalid:
        bad = bad_rows_for(bad, path, len(text))
        if not bad.skips.skip:  # O(log N) search for the first bad cell, then raise
            first = first_failing_cast(text, pa.float64())
            bad_N = np.zeros(len(text), dtype=bool)
            bad_N[first] = True
            bad.flag(
                bad_N,
                column=column,
                reason="non-numeric value",
                detail=lambda r: f"non-numeric value {text[r].as_py()!r} (data.on_bad_row=skip drops such rows)",
            )
        cells = text.to_pylist()
        parsed = [_parse_float(v) for v in cells]
        out = np.array([np.nan if v is None else v for v in parsed], dtype=np.float64)
        non_numeric = np.array([c is not None and v is None for c, v in zip(cells, parsed, strict=True)], dtype=bool)
        bad.flag(
            non_numeric, column=column, reason="non-numeric value", detail=lambda r: f"non-numeric value {cells[r]!r}"
        )
        return out
    return np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float64)


def _parse_float(text: str | None) -> float | None:
    """A cell as a float (NaN for an empty cell), None when it is not a number."""
    if text is None:
        return float("nan")
    if "_" in text:  # Python accepts 1_000; Arrow's cast, used for whole columns, does not
        return None
    try:
        return float(text)
    except ValueError:
        return None


def first_failing_cast(arr: pa.ChunkedArray, to: pa.DataType) -> int:
    """Index of the first cell that does not cast to `to` (bisection: O(log N) casts)."""
    lo, hi = 0, len(arr)  # invariant: arr[lo:hi] holds a failing cell
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            pc.cast(arr.slice(lo, mid - lo), to)
        except pa.ArrowInvalid:
            hi = mid
        else:
            lo = mid
    return lo


def finite_dense(values_N: np.ndarray, *, path: str | Path, column: str, bad: BadRows | None = None) -> np.ndarray:
    """Empty / NaN / Inf dense cells are bad rows."""
    bad = bad_rows_for(bad, path, len(values_N))
    bad.flag(
        ~np.isfinite(values_N),
        column=column,
        reason="non-finite dense value",
        detail=lambda r: f"{'empty or NaN' if np.isnan(values_N[r]) else 'non-finite'} dense value",
    )
    return values_N


def signed_log1p(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log1p(np.abs(x))


def binary_labels(values_N: np.ndarray, *, path: str | Path, column: str, bad: BadRows | None = None) -> np.ndarray:
    """`[N]` float32 labels; anything but 0 / 1 (empty included) is a bad row."""

    def detail(row: int) -> str:
        if np.isnan(values_N[row]):
            return "empty label value"
        return f"label {values_N[row]} is not 0 or 1 (give the task a rule, e.g. '>= 4', to derive a binary label)"

    bad = bad_rows_for(bad, path, len(values_N))
    bad.flag(~((values_N == 0.0) | (values_N == 1.0)), column=column, reason="label not 0 or 1", detail=detail)
    return values_N.astype(np.float32)


def category_codes(arr: pa.ChunkedArray) -> tuple[np.ndarray, int]:
    """Dictionary codes of a string column: `[N]` int64 in `[-1, K)` (-1 = null), and K."""
    codes, dictionary = category_dictionary(arr)
    return codes, len(dictionary)


def category_dictionary(arr: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, pa.Array]:
    """`category_codes` with the dictionary itself: `[N]` codes and the `[K]` values."""
    encoded = pc.dictionary_encode(arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr)
    codes = pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    return codes, encoded.dictionary


def train_vocab(
    codes: np.ndarray, dictionary: pa.Array, train_mask: np.ndarray, base: pa.Array | None = None
) -> tuple[np.ndarray, int, pa.Array]:
    """`train_vocab_ids`, plus the vocabulary: the values of ids 1..V in order (what a
    scorer needs to encode new rows as training did).

    With `base` (an earlier run's vocabulary, the values of ids 1..B in order; a warm
    start's, `data/ids.py`) the vocabulary extends it: every base value keeps its id, in
    every split (an id the earlier run trained keeps its row), and the train values it
    lacks follow as ids B+1.. in code order.
    """
    if base is None:
        ids, size = train_vocab_ids(codes, len(dictionary), train_mask)
        seen = np.zeros(len(dictionary), dtype=bool)
        seen[codes[train_mask & (codes >= 0)]] = True
        return ids, size, dictionary.take(pa.array(np.flatnonzero(seen)))
    return extend_vocab_ids(codes, dictionary, train_mask, base)


def extend_vocab_ids(
    codes: np.ndarray, dictionary: pa.Array, train_mask: np.ndarray, base: pa.Array
) -> tuple[np.ndarray, int, pa.Array]:
    """`train_vocab` over a `base` vocabulary: (`[M]` ids, table size, vocabulary)."""
    text = strings(dictionary).combine_chunks()
    base_text = strings(base).combine_chunks()
    found = pc.index_in(text, value_set=base_text)
    known_K = np.asarray(pc.fill_null(found, -1).to_numpy(zero_copy_only=False), dtype=np.int64) + 1
    seen = np.zeros(len(dictionary), dtype=bool)
    seen[codes[train_mask & (codes >= 0)]] = True
    new_codes = np.flatnonzero(seen & (known_K == 0))
    lut = np.zeros(len(dictionary) + 1, dtype=np.int64)  # slot 0: the null code -1
    lut[1:] = known_K
    lut[1 + new_codes] = len(base) + 1 + np.arange(len(new_codes))
    values = pa.concat_arrays([base_text, text.take(pa.array(new_codes, pa.int64()))])
    return lut[codes + 1], len(values) + 1, values


def split_lists(arr: pa.ChunkedArray, sep: str, *, text: bool = True) -> tuple[np.ndarray, pa.Array]:
    """Cells holding `sep`-separated tokens (or a list column) -> (`[N]` lengths, `[nnz]` tokens).

    Empty tokens and null cells contribute nothing. `text=False` keeps the tokens of an
    integer list column as integers (no string conversion).
    """
    combined = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    if not (pa.types.is_list(combined.type) or pa.types.is_large_list(combined.type)):
        combined = pc.split_pattern(strings(combined).combine_chunks(), sep)
    lengths = pc.fill_null(pc.list_value_length(combined), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.list_flatten(combined)
    tokens = flat if not text and pa.types.is_integer(flat.type) else strings(flat).combine_chunks()
    keep = np.asarray(tokens.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    if not keep.all():
        rows = np.repeat(np.arange(len(lengths)), lengths)
        lengths = np.bincount(rows[keep], minlength=len(lengths)).astype(np.int64)
        tokens = tokens.filter(pa.array(keep))
    return lengths, tokens


def train_vocab_ids(codes: np.ndarray, num_codes: int, train_mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Map codes to ids 1..V for codes seen in train rows (in code order); others -> 0.

    Args:
        codes: `[M]` int64 codes in `[-1, num_codes)`.
        num_codes: dictionary size.
        train_mask: `[M]` bool, the entries that belong to the train split.

    Returns:
        `[M]` int64 ids and the table size `V + 1`.
    """
    seen = np.zeros(num_codes + 1, dtype=bool)  # slot 0 is the null code -1
    seen[codes[train_mask] + 1] = True
    seen[0] = False
    lut = np.zeros(num_codes + 1, dtype=np.int64)
    lut[seen] = np.arange(1, int(seen.sum()) + 1)
    return lut[codes + 1], int(seen.sum()) + 1


def group_ids(arr: pa.ChunkedArray) -> np.ndarray:
    """`[N]` int64 user ids: the values when they are integers, else dictionary codes."""
    text = strings(arr)
    try:
        values = pc.cast(text, pa.int64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return category_codes(text)[0]
    return np.asarray(pc.fill_null(values, -1).to_numpy(zero_copy_only=False), dtype=np.int64)


def key_values(arr: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """`[N]` values of a key column (e.g. user_id) as written out with predictions:
    int64 when every cell is an integer, else the trimmed strings (None = empty)."""
    text = strings(arr)
    try:
        values = pc.cast(text, pa.int64())
        if values.null_count == 0:
            return np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.int64)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    return np.asarray(text.to_numpy(zero_copy_only=False), dtype=object)


def file_keys(path: str | Path, rows_N: np.ndarray) -> dict[str, np.ndarray]:
    """`file` (the path, as given) and `row` (row number in it, from 1, header excluded,
    as in data errors) of `[N]` rows read from one file."""
    name = np.empty(len(rows_N), dtype=object)
    name[:] = str(path)
    return {"file": name, "row": np.asarray(rows_N, dtype=np.int64)}


def concat_keys(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Row-wise concatenation of per-file key dicts (same keys in each)."""
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}


def feature_name(column: str) -> str:
    return NAME_RE.sub("_", column)
