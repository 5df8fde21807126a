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
- Scoring other files (`score_files`, for `trainer.predict files=`): they are parsed
  like the configured ones and appended after them as `Dataset.scored`, so the
  train split, its carve-out, vocabularies and dense statistics are exactly the
  training run's. A task whose label column is missing from any of them is unlabelled
  there; so is the user id (no GAUC).
- Dense values must be finite numbers (an empty cell, NaN or Inf is a bad row: impute
  upstream); bad rows raise, or are skipped and counted with `data.on_bad_row=skip`
  (`data/parsing/bad_rows.py`); `log1p` columns get `sign(x) * log1p(|x|)`; all dense columns are then
  standardised with train statistics.
- A task is `{name, column, rule}`. Without a rule the column must hold 0 / 1. A rule
  is a tiny comparison parsed here (never `eval`-ed): `>= 4`, `> 0.5`, `== 1`,
  `!= 0`, `== "buy"`, `in [a, b]`, `not in [1, 2]`. Numbers compare numerically,
  anything else compares as trimmed strings.
- Sparse feature names are the column names with characters outside `[A-Za-z0-9_]`
  replaced by `_` (they become TorchRec table / module names).

Reading and cell conversion live in `data/parsing/files.py` (shared with `data/sources/kuairand.py`).

Legend: N rows, Dn dense columns, nnz ids of a multi-hot column.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from data.columns import (
    SCORED,
    TEST,
    TRAIN,
    VAL,
    Dataset,
    SparseColumn,
    Split,
    carve_splits,
    scored_rows,
    split_rows,
    standardize_dense,
)
from data.parsing.bad_rows import BadRows, SkipLog
from data.parsing.files import (
    bad_rows_for,
    binary_labels,
    category_dictionary,
    concat_keys,
    csv_delimiter,
    feature_name,
    file_columns,
    file_keys,
    finite_dense,
    floats,
    group_ids,
    key_values,
    read_columns,
    signed_log1p,
    split_lists,
    strings,
    train_vocab,
)
from data.spec import DatasetSpec, SparseFeature

RULE_OPS = (">=", "<=", "==", "!=", ">", "<")


@dataclass(kw_only=True)
class TabularConfig:
    """Config of the generic tabular source.

    Attributes:
        train: train file(s), concatenated.
        val: validation file(s); None or [] = carve `val_fraction` of the train rows.
        test: test file(s); None or [] = carve `test_fraction` of the train rows.
        val_fraction, test_fraction, seed: the seeded carve-out.
        format: auto (by extension: .parquet / .pq, else CSV), csv or parquet.
        delimiter: CSV field separator: one character, or `tab` / `\\t` for a tab.
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
        dataset_name: the data set's name (`DatasetSpec.name`, summary.json `dataset`);
            None = the first train file's name up to its first '.'.
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
    dataset_name: str | None = None


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
    bad = bad_rows_for(bad, path, len(arr))
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


# ------------------------------------------------------------------------------ source


class ColumnRoles(Protocol):
    """The column-role fields a source config shares with `TabularConfig` (see its docs)."""

    categorical: list[str]
    multi_hot: dict[str, str]
    dense: list[str]
    log1p: list[str]
    user_id: str | None
    tasks: list[dict[str, Any]]


Task = tuple[str, str, Rule | None]  # (name, column, rule)


def parse_tasks(cfg: ColumnRoles) -> list[Task]:
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


def _label_source(column: str, rule: object) -> str:
    """Where a task's label comes from, for warnings: `column 'c' rule '>= 4'`."""
    return f"column {column!r} " + ("(0 / 1)" if rule is None else f"rule {str(rule).strip()!r}")


def _paths(value: list[str] | str | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def role_columns(cfg: ColumnRoles, tasks: list[Task]) -> list[str]:
    """Every column the roles read, each once, in role order."""
    columns = [*cfg.categorical, *cfg.multi_hot, *cfg.dense, *(c for _, c, _ in tasks)]
    columns += [cfg.user_id] if cfg.user_id else []
    return list(dict.fromkeys(columns))


@dataclass(slots=True)
class Parsed:
    """One file's columns after per-role conversion (checked there, where rows are known).

    `rows`: the file row number (from 1, header excluded) of each kept row."""

    dense: np.ndarray
    labels: dict[str, np.ndarray]
    cats: dict[str, pa.ChunkedArray]
    multi: dict[str, tuple[np.ndarray, pa.Array]]
    user: pa.ChunkedArray | None
    rows: np.ndarray


def _parse_file(path: str, cfg: TabularConfig, tasks: list[Task], skips: SkipLog, *, limit_rows: int) -> Parsed:
    table = read_columns(
        path,
        columns=role_columns(cfg, tasks),
        fmt=cfg.format,
        delimiter=csv_delimiter(cfg.delimiter),
        column_names=cfg.column_names,
        limit_rows=limit_rows,
        skips=skips,
    )
    return parse_table(table, path=path, cfg=cfg, tasks=tasks, skips=skips)


def parse_table(
    table: pa.Table,
    *,
    path: str,
    cfg: ColumnRoles,
    tasks: list[Task],
    skips: SkipLog,
    row_offset: int = 0,
    raw_ids: bool = False,
) -> Parsed:
    """Convert each role's columns of `table`; bad rows raise or are dropped (`skips` policy).

    Args:
        path: how messages name the rows' origin (a file, or a file and row group).
        row_offset: file rows before the table's first row (messages number rows from 1).
        raw_ids: keep categorical, multi-hot (integer lists) and user id columns as read
            instead of as trimmed strings (`data.parsing.hashing` hashes integers' text directly).
    """
    bad = skips.file(path, table.num_rows, row_offset=row_offset)
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
    user = None
    if cfg.user_id:
        user = table.column(cfg.user_id) if raw_ids else strings(table.column(cfg.user_id))
    return Parsed(
        dense=dense_ND,
        labels=labels,
        cats={c: table.column(c) if raw_ids else strings(table.column(c)) for c in cfg.categorical},
        multi={c: split_lists(table.column(c), sep, text=not raw_ids) for c, sep in cfg.multi_hot.items()},
        user=user,
        rows=bad.file_rows(np.flatnonzero(keep_N)),
    )


def _scored_parts(
    cfg: TabularConfig, tasks: list[Task], files: list[str], skips: SkipLog
) -> tuple[list[Parsed], tuple[str, ...]]:
    """Parse the files to score; returns them (every task's labels, zeros where
    unlabelled) and the tasks all of them label. Without the user id column in all of
    them, none gets user ids."""
    read = {"fmt": cfg.format, "delimiter": csv_delimiter(cfg.delimiter), "column_names": cfg.column_names}
    headers = [set(file_columns(path, **read)) for path in files]  # type: ignore[arg-type]
    labelled = [t for t in tasks if all(t[1] in h for h in headers)]
    if cfg.user_id is not None and not all(cfg.user_id in h for h in headers):
        cfg = dataclasses.replace(cfg, user_id=None)
    parts = [_parse_file(path, cfg, labelled, skips, limit_rows=0) for path in files]
    for p in parts:
        p.labels = {name: p.labels.get(name, np.zeros(len(p.dense), dtype=np.float32)) for name, _, _ in tasks}
    return parts, tuple(name for name, _, _ in labelled)


def _check_config(cfg: TabularConfig) -> None:
    if not _paths(cfg.train):
        raise ValueError("data.train names no file")
    check_roles(cfg)
    csv_delimiter(cfg.delimiter)


def check_roles(cfg: ColumnRoles) -> None:
    """Config errors of the column roles (ValueError naming the key)."""
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


def dataset_name(cfg: TabularConfig) -> str:
    """`data.dataset_name`, else the first train file's name up to its first '.'."""
    if cfg.dataset_name:
        return cfg.dataset_name
    return Path(_paths(cfg.train)[0]).name.split(".")[0] or cfg.name


def tabular_names(cfg: TabularConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(tasks, sparse features) from the config alone (see `data.build.declared_names`)."""
    _check_config(cfg)
    features = [feature_name(c) for c in (*cfg.categorical, *cfg.multi_hot)]
    return tuple(name for name, _, _ in parse_tasks(cfg)), tuple(features)


def load_tabular(
    cfg: TabularConfig,
    *,
    score_files: list[str] | None = None,
    keep_keys: bool = False,
    base_vocab: dict[str, pa.Array] | None = None,
) -> Dataset:
    """Read the configured files, carve missing splits, encode, standardise.

    Args:
        cfg: the source config.
        score_files: other files with the same columns to encode as `Dataset.scored`
            (see the module doc); None = none.
        keep_keys: keep `Split.keys` (`file`, `row`, and the user id column).
        base_vocab: feature -> an earlier run's vocabulary, which the vocabularies
            extend (`data.parsing.files.train_vocab`); None = train values only.
    """
    _check_config(cfg)
    tasks = parse_tasks(cfg)
    skips = SkipLog(cfg.on_bad_row)
    files = {"train": _paths(cfg.train), "val": _paths(cfg.val), "test": _paths(cfg.test)}
    parsed, split_parts, paths = [], [], []
    for code, key in ((TRAIN, "train"), (VAL, "val"), (TEST, "test")):
        for path in files[key]:
            p = _parse_file(path, cfg, tasks, skips, limit_rows=cfg.limit_rows)
            parsed.append(p)
            paths.append(path)
            split_parts.append(np.full(len(p.dense), code, dtype=np.int8))
    scored_labels: tuple[str, ...] = ()
    if score_files:
        scored, scored_labels = _scored_parts(cfg, tasks, list(score_files), skips)
        parsed += scored
        paths += list(score_files)
        split_parts += [np.full(len(p.dense), SCORED, dtype=np.int8) for p in scored]
    split_N = np.concatenate(split_parts)
    train_rows = np.flatnonzero(split_N == TRAIN)
    carved = carve_splits(
        len(train_rows),
        val_fraction=0.0 if files["val"] else cfg.val_fraction,
        test_fraction=0.0 if files["test"] else cfg.test_fraction,
        seed=cfg.seed,
    )
    split_N[train_rows] = carved
    features, sparse, vocab = _encode(cfg, parsed, split_N == TRAIN, base_vocab or {})
    user = keys = None
    if cfg.user_id:
        nulls = lambda p: pa.chunked_array([pa.nulls(len(p.dense), pa.string())])  # noqa: E731
        users = pa.chunked_array([ch for p in parsed for ch in (p.user or nulls(p)).chunks], pa.string())
        user = group_ids(users)
    if keep_keys or score_files:
        keys = concat_keys([file_keys(path, p.rows) for path, p in zip(paths, parsed, strict=True)])
        if cfg.user_id:
            keys[cfg.user_id] = key_values(users)
    full = Split(
        dense=np.concatenate([p.dense for p in parsed]).astype(np.float32),
        sparse=sparse,
        labels={name: np.concatenate([p.labels[name] for p in parsed]) for name, _, _ in tasks},
        user_id=user,
        keys=keys,
    )
    train, val, test = split_rows(full, split_N)
    extra = scored_rows(full, split_N)
    if extra is not None and cfg.user_id and any(p.user is None for p in parsed):
        extra.user_id = None  # the scored files lack the user id column
        assert extra.keys is not None
        extra.keys.pop(cfg.user_id)
    if not keep_keys:
        for s in (train, val, test):
            s.keys = None
    stats = standardize_dense(train, val, test, *([extra] if extra is not None else []))
    spec = DatasetSpec(
        name=dataset_name(cfg),
        sparse=tuple(features),
        dense_names=tuple(cfg.dense),
        tasks=tuple(name for name, _, _ in tasks),
        has_user_id=cfg.user_id is not None,
    )
    info: dict[str, object] = {
        "dense_stats": stats,
        "dense_transforms": ["signed_log1p" if c in cfg.log1p else None for c in cfg.dense],
        "vocab": vocab,
        "files": files,
        "label_sources": {
            name: _label_source(col, task.get("rule")) for (name, col, _), task in zip(tasks, cfg.tasks, strict=True)
        },
        "positive_rates": {t: float(train.labels[t].mean()) for t in spec.tasks},
        "skipped": skips.as_dict(),
    }
    return Dataset(
        spec=spec,
        train=train,
        val=val,
        test=test,
        skipped_rows=skips.total,
        info=info,
        scored=extra,
        scored_labels=scored_labels,
    )


def _encode(
    cfg: TabularConfig, parsed: list[Parsed], is_train: np.ndarray, base: dict[str, pa.Array]
) -> tuple[list[SparseFeature], dict[str, SparseColumn], dict[str, pa.Array]]:
    """Sparse features with train-only vocabularies: specs, columns and vocabularies."""
    features, sparse, vocab = [], {}, {}
    for c in cfg.categorical:
        codes, dictionary = category_dictionary(
            pa.chunked_array([ch for p in parsed for ch in p.cats[c].chunks], pa.string())
        )
        ids, size, vocab[feature_name(c)] = train_vocab(codes, dictionary, is_train, base.get(feature_name(c)))
        features.append(SparseFeature(name=feature_name(c), num_embeddings=size))
        sparse[feature_name(c)] = SparseColumn.single_hot(ids)
    for c in cfg.multi_hot:
        lengths = np.concatenate([p.multi[c][0] for p in parsed])
        tokens = pa.chunked_array([p.multi[c][1] for p in parsed], pa.string())
        codes, dictionary = category_dictionary(tokens)
        ids, size, vocab[feature_name(c)] = train_vocab(
            codes, dictionary, np.repeat(is_train, lengths), base.get(feature_name(c))
        )
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        features.append(SparseFeature(name=feature_name(c), num_embeddings=size, multi_hot=True))
        sparse[feature_name(c)] = SparseColumn(values=ids, offsets=offsets)
    return features, sparse, vocab
