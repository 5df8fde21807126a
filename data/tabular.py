"""Generic CSV / Parquet source described entirely by config (no code per dataset).

The config names the files of each split and the role of each column: single-hot
`categorical`, `multi_hot` (one string cell holding ids separated by a per-column
separator, or a Parquet list column), `dense`, an optional `user_id` (for GAUC) and the
tasks. Choices:

- CSV is read with every column as a string (no type guessing from the first block,
  which breaks on files whose column turns non-integer after a million rows); each role
  then converts its columns, so a bad value is reported with file, row and column.
  Rows are numbered from 1, header excluded. Only an empty cell is null.
- Several files per split are concatenated. When `val` / `test` files are not given,
  seeded fractions of the train rows are carved out instead (disjoint, reproducible).
- Vocabularies come from the train split only (after the carve-out); id 0 = empty cell
  or a value never seen in train. Ids follow the order of first appearance.
- Dense values must be finite numbers (an empty cell, NaN or Inf is a bad row: impute
  upstream); bad rows raise, or are skipped and counted with `data.on_bad_row=skip`
  (`data/bad_rows.py`); `log1p` columns get `sign(x) * log1p(|x|)`; all dense columns are then
  standardised with train statistics.
- A task is `{name, column, rule}`. Without a rule the column must hold 0 / 1. A rule
  is a tiny comparison parsed here (never `eval`-ed): `>= 4`, `> 0.5`, `== 1`,
  `!= 0`, `== "buy"`, `in [a, b]`, `not in [1, 2]`. Numbers compare numerically,
  anything else compares as trimmed strings.
- Sparse feature names are the column names with characters outside `[A-Za-z0-9_]`
  replaced by `_` (they become TorchRec table / module names).

The helpers below (reading, encoding, rules) are shared with `data/kuairand.py`.

Legend: N rows, Dn dense columns, nnz ids of a multi-hot column.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from data.bad_rows import BadRows, SkipLog, first_ragged_line
from data.columns import Dataset, SparseColumn, Split, standardize_dense
from data.spec import DatasetSpec, SparseFeature

FORMATS = ("auto", "csv", "parquet")
TRAIN, VAL, TEST = 0, 1, 2
RULE_OPS = (">=", "<=", "==", "!=", ">", "<")
NAME_RE = re.compile(r"[^A-Za-z0-9_]")


@dataclass(kw_only=True)
class TabularConfig:
    """Config of the generic tabular source.

    Attributes:
        train: train file(s), concatenated.
        val: validation file(s); None or [] = carve `val_fraction` of the train rows.
        test: test file(s); None or [] = carve `test_fraction` of the train rows.
        val_fraction, test_fraction, seed: the seeded carve-out.
        format: auto (by extension: .parquet / .pq, else CSV), csv or parquet.
        delimiter: CSV field separator.
        column_names: names for headerless CSV files; None = the first line is a header.
        categorical: single-hot id columns.
        multi_hot: column -> separator of the ids inside one cell (ignored for Parquet
            list columns).
        dense: numeric columns.
        log1p: dense columns transformed by `sign(x) * log1p(|x|)` (heavy tails).
        user_id: column grouping rows by user (for GAUC); None = no user ids. List it in
            `categorical` too to use it as a feature.
        tasks: `{"name": ..., "column": ..., "rule": ...}` per task; `name` defaults to
            the column, `rule` to None (column must hold 0 / 1).
        limit_rows: read only the first N rows of each file; 0 = all.
        on_bad_row: error (raise naming file, row, column) or skip (drop and count).
    """

    name: str = "tabular"
    train: list[str] = field(default_factory=list)
    val: list[str] | None = None
    test: list[str] | None = None
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 2026
    format: str = "auto"
    delimiter: str = ","
    column_names: list[str] | None = None
    categorical: list[str] = field(default_factory=list)
    multi_hot: dict[str, str] = field(default_factory=dict)
    dense: list[str] = field(default_factory=list)
    log1p: list[str] = field(default_factory=list)
    user_id: str | None = None
    tasks: list[dict[str, Any]] = field(default_factory=list)
    limit_rows: int = 0
    on_bad_row: str = "error"


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
        raise ValueError(f"{path}: no column(s) {missing}; the file has {present}")
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


def _bad_rows(bad: BadRows | None, path: str | Path, num_rows: int) -> BadRows:
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
        bad = _bad_rows(bad, path, len(text))
        if not bad.skips.skip:  # O(log N) search for the first bad cell, then raise
            first = first_failing_cast(text, pa.float64())
            bad_N = np.zeros(len(text), dtype=bool)
            bad_N[first] = True
            bad.flag(
                bad_N,
                column=column,
                reason="non-numeric value",
                detail=lambda r: f"non-numeric value {text[r].as_py()!r}",
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
    bad = _bad_rows(bad, path, len(values_N))
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

    bad = _bad_rows(bad, path, len(values_N))
    bad.flag(~((values_N == 0.0) | (values_N == 1.0)), column=column, reason="label not 0 or 1", detail=detail)
    return values_N.astype(np.float32)


def category_codes(arr: pa.ChunkedArray) -> tuple[np.ndarray, int]:
    """Dictionary codes of a string column: `[N]` int64 in `[-1, K)` (-1 = null), and K."""
    encoded = pc.dictionary_encode(arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr)
    codes = pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    return codes, len(encoded.dictionary)


def split_lists(arr: pa.ChunkedArray, sep: str) -> tuple[np.ndarray, pa.Array]:
    """Cells holding `sep`-separated tokens (or a list column) -> (`[N]` lengths, `[nnz]` tokens).

    Empty tokens and null cells contribute nothing.
    """
    combined = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    if not (pa.types.is_list(combined.type) or pa.types.is_large_list(combined.type)):
        combined = pc.split_pattern(strings(combined).combine_chunks(), sep)
    lengths = pc.fill_null(pc.list_value_length(combined), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    tokens = strings(pc.list_flatten(combined)).combine_chunks()
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


def feature_name(column: str) -> str:
    return NAME_RE.sub("_", column)


# ------------------------------------------------------------------------------- rules


@dataclass(frozen=True, slots=True)
class Rule:
    """A parsed label rule: `op` in RULE_OPS, `in` or `not in`, with its literals."""

    op: str
    values: tuple[float | str, ...]

    @property
    def numeric(self) -> bool:
        return all(isinstance(v, float) for v in self.values)


def _literal(token: str) -> float | str:
    token = token.strip()
    if len(token) >= 2 and token[0] == token[-1] and token[0] in "'\"":
        return token[1:-1]
    try:
        return float(token)
    except ValueError:
        return token


def parse_rule(rule: str) -> Rule:
    """Parse `>= 4`, `== "x"`, `in [a, b]`, `not in [1, 2]` (ValueError otherwise)."""
    text = rule.strip()
    m = re.fullmatch(r"(not\s+in|in)\s*\[(.*)\]", text, flags=re.DOTALL)
    if m:
        items = [t for t in m.group(2).split(",") if t.strip()]
        if not items:
            raise ValueError(f"label rule {rule!r}: empty list")
        return Rule(op=" ".join(m.group(1).split()), values=tuple(_literal(t) for t in items))
    for op in RULE_OPS:  # two-character operators first
        if text.startswith(op) and text[len(op) :].strip():
            value = _literal(text[len(op) :])
            if op in (">=", "<=", ">", "<") and not isinstance(value, float):
                raise ValueError(f"label rule {rule!r}: {op} needs a number")
            return Rule(op=op, values=(value,))
    raise ValueError(
        f"label rule {rule!r} is not understood; use a comparison with one literal "
        "('>= 4', '== 1', '!= 0', '== \"buy\"') or a list ('in [a, b]', 'not in [1, 2]')"
    )


def apply_rule(
    rule: Rule, arr: pa.ChunkedArray, *, path: str | Path, column: str, bad: BadRows | None = None
) -> np.ndarray:
    """`[N]` float32 labels from `rule` applied to a column; empty cells are bad rows."""
    bad = _bad_rows(bad, path, len(arr))
    if rule.numeric:
        x: np.ndarray = floats(arr, path=path, column=column, bad=bad)
        missing = np.isnan(x)
    else:
        text = strings(arr)
        missing = np.asarray(text.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        x = np.asarray(text.to_numpy(zero_copy_only=False), dtype=object)
    bad.flag(missing, column=column, reason="label not 0 or 1", detail=lambda r: "empty label value")
    values = rule.values if rule.numeric else tuple(str(v) for v in rule.values)
    if rule.op in ("in", "not in"):
        hit = np.isin(x, np.asarray(values, dtype=x.dtype))
        out = hit if rule.op == "in" else ~hit
    else:
        v = values[0]
        out = {
            ">=": lambda: x >= v,
            "<=": lambda: x <= v,
            ">": lambda: x > v,
            "<": lambda: x < v,
            "==": lambda: x == v,
            "!=": lambda: x != v,
        }[rule.op]()
    return np.asarray(out, dtype=np.float32)


# ---------------------------------------------------------------------------- assembly


def carve_splits(num_rows: int, *, val_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """`[N]` int8 split of each row (TRAIN / VAL / TEST): seeded, disjoint fractions."""
    if not (0.0 <= val_fraction < 1.0 and 0.0 <= test_fraction < 1.0 and val_fraction + test_fraction < 1.0):
        raise ValueError(
            f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} must be in [0, 1) "
            "and sum to less than 1"
        )
    perm = np.random.default_rng(seed).permutation(num_rows)
    num_test, num_val = round(num_rows * test_fraction), round(num_rows * val_fraction)
    split = np.full(num_rows, TRAIN, dtype=np.int8)
    split[perm[:num_test]] = TEST
    split[perm[num_test : num_test + num_val]] = VAL
    return split


def split_rows(full: Split, split_N: np.ndarray) -> tuple[Split, Split, Split]:
    """Partition a whole-data `Split` into (train, val, test) by the `[N]` split codes."""
    train, val, test = (full.take(np.flatnonzero(split_N == k)) for k in (TRAIN, VAL, TEST))
    if len(train) == 0:
        raise ValueError("the train split is empty")
    return train, val, test


# ------------------------------------------------------------------------------ source


def _tasks(cfg: TabularConfig) -> list[tuple[str, str, Rule | None]]:
    if not cfg.tasks:
        raise ValueError("data.tasks is empty; give at least one {name, column, rule}")
    out = []
    for i, task in enumerate(cfg.tasks):
        unknown = set(task) - {"name", "column", "rule"}
        if unknown or "column" not in task:
            raise ValueError(f"data.tasks[{i}]={dict(task)}: needs `column`, may have `name` and `rule`")
        name = str(task.get("name") or task["column"])
        if not re.fullmatch(r"[A-Za-z0-9_]+", name):
            raise ValueError(f"data.tasks[{i}].name={name!r}: use letters, digits and _ only")
        rule = task.get("rule")
        out.append((name, str(task["column"]), None if rule is None else parse_rule(str(rule))))
    if len({n for n, _, _ in out}) != len(out):
        raise ValueError(f"data.tasks: duplicate task names {[n for n, _, _ in out]}")
    return out


def _paths(value: list[str] | str | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


@dataclass(slots=True)
class _Parsed:
    """One file's columns after per-role conversion (checked there, where rows are known)."""

    dense: np.ndarray
    labels: dict[str, np.ndarray]
    cats: dict[str, pa.ChunkedArray]
    multi: dict[str, tuple[np.ndarray, pa.Array]]
    user: pa.ChunkedArray | None


def _parse_file(path: str, cfg: TabularConfig, tasks: list[tuple[str, str, Rule | None]], skips: SkipLog) -> _Parsed:
    columns = [*cfg.categorical, *cfg.multi_hot, *cfg.dense, *(c for _, c, _ in tasks)]
    columns += [cfg.user_id] if cfg.user_id else []
    table = read_columns(
        path,
        columns=columns,
        fmt=cfg.format,
        delimiter=cfg.delimiter,
        column_names=cfg.column_names,
        limit_rows=cfg.limit_rows,
        skips=skips,
    )
    bad = skips.file(path, table.num_rows)
    dense_cols = []
    for c in cfg.dense:
        x = finite_dense(floats(table.column(c), path=path, column=c, bad=bad), path=path, column=c, bad=bad)
        dense_cols.append(signed_log1p(x) if c in cfg.log1p else x)
    labels = {}
    for name, col, rule in tasks:
        if rule is None:
            values = floats(table.column(col), path=path, column=col, bad=bad)
            labels[name] = binary_labels(values, path=path, column=col, bad=bad)
        else:
            labels[name] = apply_rule(rule, table.column(col), path=path, column=col, bad=bad)
    keep_N = bad.keep()
    dense_ND = np.stack(dense_cols, axis=1) if dense_cols else np.zeros((table.num_rows, 0))
    if not keep_N.all():  # skip policy: drop the flagged rows from every column
        table = table.filter(pa.array(keep_N))
        dense_ND = dense_ND[keep_N]
        labels = {k: v[keep_N] for k, v in labels.items()}
    return _Parsed(
        dense=dense_ND,
        labels=labels,
        cats={c: strings(table.column(c)) for c in cfg.categorical},
        multi={c: split_lists(table.column(c), sep) for c, sep in cfg.multi_hot.items()},
        user=strings(table.column(cfg.user_id)) if cfg.user_id else None,
    )


def _check_config(cfg: TabularConfig) -> None:
    if not _paths(cfg.train):
        raise ValueError("data.train names no file")
    features = [*cfg.categorical, *cfg.multi_hot]
    names = [feature_name(c) for c in features]
    if len(set(names)) != len(names):
        raise ValueError(f"data.categorical / data.multi_hot: duplicate feature names {names}")
    if not features and not cfg.dense:
        raise ValueError("data.categorical, data.multi_hot and data.dense are all empty")
    unknown = set(cfg.log1p) - set(cfg.dense)
    if unknown:
        raise ValueError(f"data.log1p names columns that are not in data.dense: {sorted(unknown)}")
    if len(set(cfg.dense)) != len(cfg.dense):
        raise ValueError(f"data.dense lists a column twice: {cfg.dense}")


def tabular_names(cfg: TabularConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(tasks, sparse features) from the config alone (see `data.build.declared_names`)."""
    _check_config(cfg)
    features = [feature_name(c) for c in (*cfg.categorical, *cfg.multi_hot)]
    return tuple(name for name, _, _ in _tasks(cfg)), tuple(features)


def load_tabular(cfg: TabularConfig) -> Dataset:
    """Read the configured files, carve missing splits, encode, standardise."""
    _check_config(cfg)
    tasks = _tasks(cfg)
    skips = SkipLog(cfg.on_bad_row)
    files = {"train": _paths(cfg.train), "val": _paths(cfg.val), "test": _paths(cfg.test)}
    parsed, split_parts = [], []
    for code, key in ((TRAIN, "train"), (VAL, "val"), (TEST, "test")):
        for path in files[key]:
            p = _parse_file(path, cfg, tasks, skips)
            parsed.append(p)
            split_parts.append(np.full(len(p.dense), code, dtype=np.int8))
    split_N = np.concatenate(split_parts)
    train_rows = np.flatnonzero(split_N == TRAIN)
    carved = carve_splits(
        len(train_rows),
        val_fraction=0.0 if files["val"] else cfg.val_fraction,
        test_fraction=0.0 if files["test"] else cfg.test_fraction,
        seed=cfg.seed,
    )
    split_N[train_rows] = carved
    is_train = split_N == TRAIN

    features, sparse = [], {}
    for c in cfg.categorical:
        codes, k = category_codes(pa.chunked_array([ch for p in parsed for ch in p.cats[c].chunks], pa.string()))
        ids, size = train_vocab_ids(codes, k, is_train)
        features.append(SparseFeature(name=feature_name(c), num_embeddings=size))
        sparse[feature_name(c)] = SparseColumn.single_hot(ids)
    for c in cfg.multi_hot:
        lengths = np.concatenate([p.multi[c][0] for p in parsed])
        tokens = pa.chunked_array([p.multi[c][1] for p in parsed], pa.string())
        codes, k = category_codes(tokens)
        ids, size = train_vocab_ids(codes, k, np.repeat(is_train, lengths))
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        features.append(SparseFeature(name=feature_name(c), num_embeddings=size, multi_hot=True))
        sparse[feature_name(c)] = SparseColumn(values=ids, offsets=offsets)

    user = None
    if cfg.user_id:
        user = group_ids(pa.chunked_array([ch for p in parsed for ch in p.user.chunks], pa.string()))  # type: ignore[union-attr]
    full = Split(
        dense=np.concatenate([p.dense for p in parsed]).astype(np.float32),
        sparse=sparse,
        labels={name: np.concatenate([p.labels[name] for p in parsed]) for name, _, _ in tasks},
        user_id=user,
    )
    train, val, test = split_rows(full, split_N)
    stats = standardize_dense(train, val, test)
    spec = DatasetSpec(
        name=cfg.name,
        sparse=tuple(features),
        dense_names=tuple(cfg.dense),
        tasks=tuple(name for name, _, _ in tasks),
        has_user_id=cfg.user_id is not None,
    )
    info: dict[str, object] = {
        "dense_stats": stats,
        "files": files,
        "positive_rates": {t: float(train.labels[t].mean()) for t in spec.tasks},
        "skipped": skips.as_dict(),
    }
    return Dataset(spec=spec, train=train, val=val, test=test, skipped_rows=skips.total, info=info)
