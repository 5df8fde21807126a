"""UCI Census-Income (KDD): the classic two-task benchmark (income > 50K, never married).

Files are headerless, `, `-separated, 42 columns (see data/files/census-income/README.md).
Choices, following the MMoE / PLE papers' setup:

- tasks: `income` (col 41 == `50000+.`) and `never_married` (col 7 == `Never married`);
  marital status is therefore not a feature;
- col 24 (instance weight) is dropped;
- 7 continuous columns become dense features; the money-valued ones are `log1p`-ed
  (heavy tails), then all are standardised with train-split statistics;
- the other 32 columns are single-hot categorical features; vocabularies come from the
  train split (after the validation carve-out), id 0 = unseen / missing.

The official test file is the test split; validation is a seeded fraction of train.
Other files in the same 42-column format can be scored (`score_files`, for
`trainer.predict files=`): they are encoded with the vocabularies and dense statistics
of this train split (`Dataset.scored`; the format always carries both labels).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from data.columns import Dataset, SparseColumn, Split, concat_splits, standardize_dense, validation_rows
from data.parsing.bad_rows import BadRows, SkipLog, first_ragged_line
from data.parsing.files import file_keys
from data.spec import DatasetSpec, SparseFeature

DEFAULT_DIR = Path(__file__).resolve().parents[1] / "files" / "census-income"
NUM_COLUMNS = 42
LABEL_COL, MARITAL_COL, WEIGHT_COL = 41, 7, 24
CONTINUOUS = {
    0: "age",
    5: "wage_per_hour",
    16: "capital_gains",
    17: "capital_losses",
    18: "dividends",
    30: "num_persons_worked_for_employer",
    39: "weeks_worked_in_year",
}
LOG1P = {5, 16, 17, 18}
CATEGORICAL = {
    1: "class_of_worker",
    2: "industry_code",
    3: "occupation_code",
    4: "education",
    6: "enroll_in_edu",
    8: "major_industry",
    9: "major_occupation",
    10: "race",
    11: "hispanic_origin",
    12: "sex",
    13: "union_member",
    14: "unemployment_reason",
    15: "employment_status",
    19: "tax_filer_status",
    20: "region_prev_residence",
    21: "state_prev_residence",
    22: "household_family_stat",
    23: "household_summary",
    25: "migration_msa",
    26: "migration_reg",
    27: "migration_within_reg",
    28: "same_house_1y_ago",
    29: "migration_sunbelt",
    31: "family_members_under_18",
    32: "country_father",
    33: "country_mother",
    34: "country_self",
    35: "citizenship",
    36: "own_business",
    37: "veterans_questionnaire",
    38: "veterans_benefits",
    40: "year",
}
POSITIVE_INCOME, NEGATIVE_INCOME = "50000+.", "- 50000."
LABEL_SOURCES = {
    "income": f"column {LABEL_COL} (income) == {POSITIVE_INCOME!r}",
    "never_married": f"column {MARITAL_COL} (marital status) == 'Never married'",
}


@dataclass(kw_only=True)
class CensusIncomeConfig:
    """Config of the Census-Income source.

    Attributes:
        root: folder with `census-income.data.gz` / `.test.gz` (default: shipped copy).
        val_fraction: share of the official train file held out for validation.
        seed: seed of the validation carve-out.
        limit_rows: read only the first N rows of each file (tests, smoke runs); 0 = all.
        on_bad_row: error (raise naming file, row, column) or skip (drop and count; see
            `data/parsing/bad_rows.py`). With `limit_rows`, lines with a wrong field count are
            counted over the whole file.
    """

    name: str = "census_income"
    root: str | None = None
    val_fraction: float = 0.1
    seed: int = 2026
    limit_rows: int = 0
    on_bad_row: str = "error"


def read_raw(path: Path, *, limit_rows: int = 0, skips: SkipLog | None = None) -> pa.Table:
    """Read one file as 42 string columns; raise naming the file on a bad layout
    (a line with another field count is skipped and counted under the skip policy)."""
    if not path.exists():
        raise FileNotFoundError(f"Census-Income file not found: {path}")
    names = [f"c{i}" for i in range(NUM_COLUMNS)]
    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(
                column_names=names, block_size=1 << 22, use_threads=not (skips is not None and skips.skip)
            ),
            parse_options=pacsv.ParseOptions(
                delimiter=",",
                invalid_row_handler=skips.ragged_line_handler(path, header=False)
                if skips is not None and skips.skip
                else None,
            ),
            convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names}),
        )
    except pa.ArrowInvalid as e:

        def reread(handler: Any) -> Any:
            options = pacsv.ReadOptions(column_names=names, use_threads=False, block_size=1 << 22)
            return pacsv.read_csv(
                path, read_options=options, parse_options=pacsv.ParseOptions(invalid_row_handler=handler)
            )

        ragged = first_ragged_line(reread, path, header=False)
        detail = ragged if ragged is not None else str(e)
        raise ValueError(f"{path}: not a {NUM_COLUMNS}-column Census-Income file: {detail}") from e
    return table.slice(0, limit_rows) if limit_rows else table


def _strings(table: pa.Table, col: int) -> np.ndarray:
    return np.asarray(pc.utf8_trim_whitespace(table.column(col)).to_numpy(zero_copy_only=False))


def _numeric(table: pa.Table, col: int, bad: BadRows) -> np.ndarray:
    raw = _strings(table, col)
    try:
        values = raw.astype(np.float64)
    except ValueError:
        ok = np.array([_is_float(v) for v in raw], dtype=bool)
        hint = "" if bad.skips.skip else " (data.on_bad_row=skip drops such rows)"
        bad.flag(~ok, column=CONTINUOUS[col], label=f"{col} ({CONTINUOUS[col]})", reason="non-numeric value",
                 detail=lambda r: f"non-numeric value {raw[r]!r}{hint}")  # fmt: skip
        values = np.where(ok, raw, "nan").astype(np.float64)
    finite = np.isfinite(values)
    bad.flag(~finite & ~bad.bad_N, column=CONTINUOUS[col], label=f"{col} ({CONTINUOUS[col]})",
             reason="non-finite dense value", detail=lambda r: "non-finite value")  # fmt: skip
    values = np.where(finite, values, 0.0)  # flagged rows are dropped; keep the arithmetic clean
    return np.log1p(np.maximum(values, 0.0)) if col in LOG1P else values


def _is_float(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return False
    return True


def _labels(table: pa.Table, bad: BadRows) -> dict[str, np.ndarray]:
    income = _strings(table, LABEL_COL)
    known = (income == POSITIVE_INCOME) | (income == NEGATIVE_INCOME)
    bad.flag(
        ~known,
        column="income",
        label=f"{LABEL_COL} (income)",
        reason="label not 0 or 1",
        detail=lambda r: f"label {income[r]!r} is neither {POSITIVE_INCOME!r} nor {NEGATIVE_INCOME!r}",
    )
    marital = _strings(table, MARITAL_COL)
    return {
        "income": (income == POSITIVE_INCOME).astype(np.float32),
        "never_married": (marital == "Never married").astype(np.float32),
    }


@dataclass(slots=True)
class _Parsed:
    """One file's kept rows: dense `[N, 7]`, categorical strings, labels, keys."""

    dense: np.ndarray
    cats: dict[int, np.ndarray]
    labels: dict[str, np.ndarray]
    keys: dict[str, np.ndarray]


def _parse(path: Path, limit_rows: int, skips: SkipLog) -> _Parsed:
    table = read_raw(path, limit_rows=limit_rows, skips=skips)
    bad = skips.file(path, table.num_rows)
    dense = np.stack([_numeric(table, c, bad) for c in CONTINUOUS], axis=1).astype(np.float32)
    labels = _labels(table, bad)
    keep_N = bad.keep()
    cats = {c: _strings(table, c)[keep_N] for c in CATEGORICAL}
    keys = file_keys(path, bad.file_rows(np.flatnonzero(keep_N)))
    return _Parsed(dense[keep_N], cats, {k: v[keep_N] for k, v in labels.items()}, keys)


def _encode(vocab: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Map strings to ids 1..len(vocab) (sorted vocab); unseen -> 0."""
    pos = np.searchsorted(vocab, values)
    pos = np.minimum(pos, len(vocab) - 1)
    found = vocab[pos] == values
    return np.where(found, pos + 1, 0).astype(np.int64)


def _encode_extended(vocab: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Map strings to ids 1..len(vocab) (vocab in id order, not sorted); unseen -> 0."""
    order = np.argsort(vocab, kind="stable")
    pos = _encode(vocab[order], values)  # 1 + position in the sorted vocabulary, 0 = unseen
    return np.where(pos > 0, order[np.maximum(pos, 1) - 1] + 1, 0).astype(np.int64)


def census_names(cfg: CensusIncomeConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(tasks, sparse features) from the config alone (see `data.build.declared_names`)."""
    return ("income", "never_married"), tuple(CATEGORICAL.values())


def load_census_income(
    cfg: CensusIncomeConfig,
    *,
    score_files: list[str] | None = None,
    keep_keys: bool = False,
    base_vocab: dict[str, pa.Array] | None = None,
) -> Dataset:
    """Parse, encode and split Census-Income into train / val / test.

    Args:
        cfg: the source config.
        score_files: other Census-Income files to encode as `Dataset.scored`.
        keep_keys: keep `Split.keys` (`file`, `row`).
        base_vocab: feature -> an earlier run's vocabulary, which the vocabularies
            extend (its values keep their ids, new train values follow, sorted);
            None = the sorted train values.
    """
    root = Path(cfg.root) if cfg.root else DEFAULT_DIR
    skips = SkipLog(cfg.on_bad_row)
    train_file = _parse(root / "census-income.data.gz", cfg.limit_rows, skips)
    test_file = _parse(root / "census-income.test.gz", cfg.limit_rows, skips)
    scored = [_parse(Path(p), 0, skips) for p in score_files or []]

    # carve validation on row indices first so vocabularies see only the train rows
    tr_rows, va_rows = validation_rows(len(train_file.dense), fraction=cfg.val_fraction, seed=cfg.seed)
    parts = [(train_file, tr_rows), (train_file, va_rows), (test_file, None), *((p, None) for p in scored)]
    features, vocab = [], {}
    sparse_parts: list[dict[str, SparseColumn]] = [{} for _ in parts]
    for col, name in CATEGORICAL.items():
        train_values = np.unique(train_file.cats[col][tr_rows])
        base = (base_vocab or {}).get(name)
        if base is None:
            vocab[name] = train_values
            encode = lambda values, v=vocab[name]: _encode(v, values)  # noqa: E731
        else:  # base values keep their ids, new train values follow (sorted)
            known = np.asarray(base.to_pylist(), dtype=train_values.dtype)
            vocab[name] = np.concatenate([known, np.setdiff1d(train_values, known)])
            encode = lambda values, v=vocab[name]: _encode_extended(v, values)  # noqa: E731
        features.append(SparseFeature(name=name, num_embeddings=len(vocab[name]) + 1))
        for sparse, (p, rows) in zip(sparse_parts, parts, strict=True):
            values = p.cats[col] if rows is None else p.cats[col][rows]
            sparse[name] = SparseColumn.single_hot(encode(values))

    def split(i: int) -> Split:
        p, rows = parts[i]
        pick = lambda v: v if rows is None else v[rows]  # noqa: E731
        keys = {k: pick(v) for k, v in p.keys.items()} if keep_keys or i > 2 else None
        labels = {k: pick(v) for k, v in p.labels.items()}
        return Split(dense=pick(p.dense), sparse=sparse_parts[i], labels=labels, keys=keys)

    train, val, test = split(0), split(1), split(2)
    extra = concat_splits([split(3 + i) for i in range(len(scored))]) if scored else None
    stats = standardize_dense(train, val, test, *([extra] if extra is not None else []))
    spec = DatasetSpec(
        name="census_income",
        sparse=tuple(features),
        dense_names=tuple(CONTINUOUS.values()),
        tasks=("income", "never_married"),
        has_user_id=False,
    )
    info: dict[str, object] = {
        "dense_stats": stats,
        "dense_transforms": ["log1p_clamped" if c in LOG1P else None for c in CONTINUOUS],
        "vocab": {name: pa.array(values.tolist(), pa.string()) for name, values in vocab.items()},
        "skipped": skips.as_dict(),
        "label_sources": LABEL_SOURCES,
    }
    return Dataset(
        spec=spec,
        train=train,
        val=val,
        test=test,
        skipped_rows=skips.total,
        info=info,
        scored=extra,
        scored_labels=spec.tasks if extra is not None else (),
    )
