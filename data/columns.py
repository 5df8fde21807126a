"""In-memory columnar splits that every source produces and the loader batches.

Sources parse their files into a `Split` (numpy arrays, one row per instance); the
loader (`data/loaders/in_memory.py`) slices rows into `Batch`es. Keeping one columnar layout means
each source only parses, and batching, sharding and normalisation are written once.

Legend: N rows, Dn dense columns, nnz total ids of a sparse feature.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from data.parsing.bad_rows import check_policy
from data.spec import DatasetSpec

log = logging.getLogger("data")

TRAIN, VAL, TEST = 0, 1, 2  # split codes of rows before they are partitioned (`split_rows`)
SCORED = 3  # rows of files scored with the train split's encoding (`trainer.predict files=`)


@dataclass(slots=True)
class SparseColumn:
    """Ids of one feature in CSR form: row i holds `values[offsets[i]:offsets[i+1]]`.

    Attributes:
        values: `[nnz]` int64 ids.
        offsets: `[N + 1]` int64, non-decreasing, `offsets[0] == 0`.
    """

    values: np.ndarray
    offsets: np.ndarray

    @classmethod
    def single_hot(cls, ids_N: np.ndarray) -> SparseColumn:
        ids_N = np.ascontiguousarray(ids_N, dtype=np.int64)
        return cls(values=ids_N, offsets=np.arange(len(ids_N) + 1, dtype=np.int64))

    @classmethod
    def from_lists(cls, rows: list[list[int]]) -> SparseColumn:
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        values = np.fromiter((v for r in rows for v in r), dtype=np.int64, count=int(offsets[-1]))
        return cls(values=values, offsets=offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def take(self, rows_N: np.ndarray) -> SparseColumn:
        """Rows `rows_N` (any order) as a new column."""
        starts = self.offsets[rows_N]
        lengths = self.offsets[rows_N + 1] - starts
        offsets = np.zeros(len(rows_N) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        if len(self.values) == len(self):  # single-hot fast path
            values = self.values[rows_N]
        else:
            idx = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
            values = self.values[idx]
        return SparseColumn(values=values, offsets=offsets)


@dataclass(slots=True)
class Split:
    """One split (train / val / test) of a dataset, row-aligned across columns.

    Attributes:
        dense: `[N, Dn]` float32.
        sparse: feature name -> ids.
        labels: task name -> `[N]` float32 in {0, 1}.
        user_id: `[N]` int64 or None.
        keys: column -> `[N]` raw values identifying each row (e.g. user_id, video_id;
            `file` / `row` for scored files), kept only when a source is asked to
            (`keep_keys`, for predictions); None otherwise. Never a model input.
        clusters: `[N]` int64 latent cluster code of each row, 0..C-1 (a source's
            `cluster_columns`, e.g. a generator's user x item clusters), for the
            cluster-expert NMI of evaluation; None without. Never a model input.
    """

    dense: np.ndarray
    sparse: dict[str, SparseColumn]
    labels: dict[str, np.ndarray]
    user_id: np.ndarray | None = None
    keys: dict[str, np.ndarray] | None = None
    clusters: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.dense)

    def take(self, rows_N: np.ndarray) -> Split:
        return Split(
            dense=self.dense[rows_N],
            sparse={k: v.take(rows_N) for k, v in self.sparse.items()},
            labels={k: v[rows_N] for k, v in self.labels.items()},
            user_id=None if self.user_id is None else self.user_id[rows_N],
            keys=None if self.keys is None else {k: v[rows_N] for k, v in self.keys.items()},
            clusters=None if self.clusters is None else self.clusters[rows_N],
        )


def concat_splits(parts: list[Split]) -> Split:
    """Rows of `parts` one after the other (same columns in every part)."""
    if len(parts) == 1:
        return parts[0]
    sparse = {}
    for name in parts[0].sparse:
        cols = [p.sparse[name] for p in parts]
        shifts = np.cumsum([0] + [len(c.values) for c in cols[:-1]])
        offsets = np.concatenate([[0]] + [c.offsets[1:] + s for c, s in zip(cols, shifts, strict=True)])
        sparse[name] = SparseColumn(values=np.concatenate([c.values for c in cols]), offsets=offsets.astype(np.int64))
    users = [p.user_id for p in parts]
    keys = [p.keys for p in parts]
    clusters = [p.clusters for p in parts]
    return Split(
        dense=np.concatenate([p.dense for p in parts]),
        sparse=sparse,
        labels={t: np.concatenate([p.labels[t] for p in parts]) for t in parts[0].labels},
        user_id=None if users[0] is None else np.concatenate(users),  # type: ignore[arg-type]
        keys=None if keys[0] is None else {k: np.concatenate([ks[k] for ks in keys]) for k in keys[0]},  # type: ignore[index]
        clusters=None if clusters[0] is None else np.concatenate(clusters),  # type: ignore[arg-type]
    )


class StreamedSplit(Protocol):
    """A split a source does not hold in memory (`data.sources.parquet_stream.StreamTrain`): a row count
    from metadata, and batches only through its own loader (`data.build.build_train_loader`)."""

    def __len__(self) -> int: ...


@dataclass(slots=True)
class Dataset:
    """A source's output: the schema plus its three splits (train may be streamed).

    Attributes:
        scored: rows of other files with the same schema, encoded with this data set's
            train vocabularies and dense statistics (the source's `score_files`), so
            their ids mean what they mean in training; None unless asked for.
        scored_labels: the tasks whose labels `scored` holds (the files had their
            label columns); the other tasks' labels there are zeros, not labels.
        info: source facts; every source records `dense_stats` (`mean`, `std`); the
            file sources also `vocab` (feature -> the train values of ids 1, 2, ... in
            order, id 0 = missing / unseen) and `dense_transforms` (per dense column,
            what comes before the standardisation: `signed_log1p`, `log1p_clamped` or
            None), what a scorer of raw rows needs.
    """

    spec: DatasetSpec
    train: Split | StreamedSplit
    val: Split
    test: Split
    skipped_rows: int = 0
    info: dict[str, object] = field(default_factory=dict)
    scored: Split | None = None
    scored_labels: tuple[str, ...] = ()

    def split(self, name: str) -> Split:
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split {name!r}; expected train, val or test")
        return getattr(self, name)


def standardize_dense(train: Split, *others: Split, eps: float = 1e-6) -> dict[str, np.ndarray]:
    """Normalise dense columns in place with mean / std of the train split.

    Returns:
        The statistics used (`mean`, `std`), so they can be stored with the run.
    """
    mean = train.dense.mean(axis=0, dtype=np.float64)
    std = train.dense.std(axis=0, dtype=np.float64)
    std = np.where(std < eps, 1.0, std)
    for s in (train, *others):
        s.dense = ((s.dense - mean) / std).astype(np.float32)
    return {"mean": mean, "std": std}


def validation_rows(num_rows: int, *, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train_rows, val_rows) partition of `range(num_rows)`, each sorted."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in (0, 1), got {fraction}")
    perm = np.random.default_rng(seed).permutation(num_rows)
    num_val = int(round(num_rows * fraction))
    return np.sort(perm[num_val:]), np.sort(perm[:num_val])


def carve_validation(split: Split, *, fraction: float, seed: int) -> tuple[Split, Split]:
    """Split off a random `fraction` of rows as validation (seeded, reproducible)."""
    train_rows, val_rows = validation_rows(len(split), fraction=fraction, seed=seed)
    return split.take(train_rows), split.take(val_rows)


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
    """Partition a whole-data `Split` into (train, val, test) by the `[N]` split codes
    (rows coded `SCORED` belong to none of them: `scored_rows`)."""
    train, val, test = (full.take(np.flatnonzero(split_N == k)) for k in (TRAIN, VAL, TEST))
    if len(train) == 0:
        raise ValueError("the train split is empty")
    return train, val, test


def scored_rows(full: Split, split_N: np.ndarray) -> Split | None:
    """The rows coded `SCORED`, in order, or None when there are none coded so."""
    rows = np.flatnonzero(split_N == SCORED)
    return full.take(rows) if len(rows) else None


def check_dataset(ds: Dataset, on_bad_row: str = "error") -> None:
    """Invariants every source must meet before training; ValueError naming split, column, row.

    Sources already report bad file contents with file / row / column; this is the last
    line of defence for what reaches the model: ids inside their table (an out-of-range
    id would read another table's memory in the fused kernels), finite dense values,
    labels in {0, 1}, aligned lengths. With `on_bad_row="skip"` rows breaking the first
    three are dropped from their split instead (in place), added to `ds.skipped_rows` and
    counted in `ds.info["skipped"]`; misaligned columns are a source bug and always raise.
    Then each task's rows and positive rate per split go to `ds.info["label_stats"]`,
    with a warning for a split holding one class (`label_stats`).
    """
    check_policy(on_bad_row)
    for split_name in ("train", "val", "test", *(("scored",) if ds.scored is not None else ())):
        if not isinstance(getattr(ds, split_name), Split):  # streamed: checked as its rows are read
            continue
        bad_N, reasons = _check_split(ds, split_name, on_bad_row)
        if bad_N.any():
            setattr(ds, split_name, getattr(ds, split_name).take(np.flatnonzero(~bad_N)))
            ds.skipped_rows += int(bad_N.sum())
            default: dict = {"policy": on_bad_row, "rows": 0, "by_reason": {}}
            skipped: dict = ds.info.setdefault("skipped", default)  # type: ignore[assignment]
            skipped["rows"] += int(bad_N.sum())
            for reason, count in reasons.items():
                skipped["by_reason"][reason] = skipped["by_reason"].get(reason, 0) + count
    ds.info["label_stats"] = label_stats(ds)


def label_stats(ds: Dataset) -> dict[str, dict[str, dict[str, object]]]:
    """`{split: {task: {"rows": n, "positive_rate": r}}}` (r None for an empty split), and a
    warning for every non-empty split where a task has a single class: its AUC and GAUC
    would be null. The warning names the label's origin, `ds.info["label_sources"][task]`
    (each source records one, e.g. `column 'income' rule '== 50000+.'`), since a label
    rule that never matches (a missed trailing '.') is the usual cause."""
    sources: dict = ds.info.get("label_sources", {})  # type: ignore[assignment]
    stats: dict[str, dict[str, dict[str, object]]] = {}
    for split_name in ("train", "val", "test"):
        split = ds.split(split_name)
        if not isinstance(split, Split):  # streamed: its labels are not in memory
            continue
        stats[split_name] = {}
        for task in ds.spec.tasks:
            n = len(split)
            rate = float(split.labels[task].mean()) if n else None
            stats[split_name][task] = {"rows": n, "positive_rate": rate}
            if rate in (0.0, 1.0):
                where = sources.get(task, f"source {ds.spec.name!r}")
                log.warning(
                    "data: task %r has a single class in the %s split of %r (all %d rows are %d; "
                    "label from %s): its AUC / GAUC will be null",
                    task, split_name, ds.spec.name, n, int(rate), where,
                )  # fmt: skip
    return stats


def _check_split(ds: Dataset, split_name: str, on_bad_row: str) -> tuple[np.ndarray, dict[str, int]]:
    """`[N]` rows of one split that break an invariant (raises under the error policy)."""
    split = getattr(ds, split_name)
    n = len(split)
    where = f"{ds.spec.name}/{split_name}"
    bad_N = np.zeros(n, dtype=bool)
    reasons: dict[str, int] = {}

    def found(rows_N: np.ndarray, reason: str, message: str) -> None:
        if on_bad_row == "error":
            raise ValueError(message)
        new = rows_N & ~bad_N
        reasons[reason] = reasons.get(reason, 0) + int(new.sum())
        bad_N[:] |= rows_N
        log.warning("data.on_bad_row=skip: skipping %d row(s), e.g. %s", int(new.sum()), message)

    non_finite = ~np.isfinite(split.dense)
    if non_finite.any():
        row, col = np.argwhere(non_finite)[0]
        message = f"{where}: row {row}, dense column {ds.spec.dense_names[col]!r}: non-finite value"
        found(non_finite.any(axis=1), "non-finite dense value", message)
    for feature in ds.spec.sparse:
        col_ = split.sparse.get(feature.name)
        if col_ is None or len(col_) != n:
            raise ValueError(f"{where}: sparse feature {feature.name!r} missing or misaligned")
        bad = (col_.values < 0) | (col_.values >= feature.num_embeddings)
        if bad.any():
            pos = int(np.flatnonzero(bad)[0])
            row = int(np.searchsorted(col_.offsets, pos, side="right") - 1)
            message = (
                f"{where}: row {row}, feature {feature.name!r}: id {int(col_.values[pos])} "
                f"outside the table [0, {feature.num_embeddings})"
            )
            rows = np.searchsorted(col_.offsets, np.flatnonzero(bad), side="right") - 1
            rows_N = np.zeros(n, dtype=bool)
            rows_N[rows] = True
            found(rows_N, "id outside its table", message)
    for task in ds.spec.tasks if split_name != "scored" else ds.scored_labels:
        labels = split.labels.get(task)
        if labels is None or len(labels) != n:
            raise ValueError(f"{where}: labels of task {task!r} missing or misaligned")
        bad = (labels != 0) & (labels != 1)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            found(bad, "label not 0 or 1", f"{where}: row {row}, task {task!r}: label {labels[row]} not in {{0, 1}}")
    if split.user_id is not None and len(split.user_id) != n:
        raise ValueError(f"{where}: user ids misaligned")
    return bad_N, reasons
