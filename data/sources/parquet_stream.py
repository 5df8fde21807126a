"""Streaming Parquet source (`data=parquet_stream`): train rows are read while training.

For train sets that do not fit in memory. Validation and test are read fully into the
in-memory `Split`s that every other source produces (same evaluation path); train is a
`StreamTrain`: metadata only (its files' row groups), batched by
`data.loaders.stream.StreamLoader`, which reads row groups with pyarrow
(`ParquetFile.iter_batches(row_groups=[g], columns=...)`, only the role columns) through
a bounded shuffle buffer. Memory is bounded by the buffer plus one row group, never by
the data. Loader semantics (rank assignment, balance, shuffling, resume, another world
size) are documented in `data/loaders/stream.py`.

Config (`ParquetStreamConfig`): the column roles are those of the tabular source
(`data/sources/tabular.py`: `categorical`, `multi_hot`, `dense`, `log1p`, `user_id`, `tasks`
with optional rules like `>= 4`) and parsing is its code (`data.sources.tabular.parse_table`),
so cells convert and bad rows are detected exactly as there. On top:

- `train` / `val` / `test`: paths or globs (`**` allowed), expanded and sorted by path.
- Ids (`ids`): `hash` puts every categorical / multi-hot value into
  `num_embeddings[column]` rows by a stable text hash (id 0 = empty cell; collision rate
  about n / 2m for n values in m rows; `data/parsing/hashing.py`); `vocab` maps values through
  `vocab_file` (format in `data/parsing/prepare.py`; id 0 = empty or out of vocabulary);
  the vocabularies used are in `Dataset.info["vocab"]` (feature -> `pa.Array` of the
  values of ids 1..V, as the in-memory sources give). For continuous training extend the
  file each day (`python -m data.stream vocab --extend ...`): old values keep their ids.
- Dense standardisation: mean / std from `stats_file` (`data/parsing/prepare.py`) or, without
  one, from a bounded first pass: whole row groups drawn in a fixed seeded order over
  all train files until `stats_rows` rows are read (at most `stats_rows` plus one row
  group; non-finite and non-numeric cells are left out of the moments, the stream reports
  them when it reaches them). Never a full pass.
- Bad rows (`on_bad_row`): error names the file, row group, row (within the file, from 1)
  and column; skip drops the row and counts it by reason. Val / test counts are in
  `Dataset.skipped_rows` / `info["skipped"]` at load time; train counts grow as the
  stream reads (first epoch only, so each bad row counts once) and are on the loader
  (`skipped_rows`, `skipped_by_reason`, per rank: sum them over ranks). A column missing
  from a file is always an error naming the file and the column (checked on the footers
  of every file at load time, before any row is read).
- Latent clusters (`cluster_columns`, e.g. `[user_cluster, item_cluster]` of the
  capacity generator): val and test rows get `Split.clusters`, a code (0..C-1) for
  each row's combination of those columns, for the
  cluster-expert NMI that evaluation reports (`trainer.evaluation.experts`). Never a
  model input; train rows do not read them. An empty cell there is an error naming the
  file and column.
- In-memory limit: val and test are read fully; more than `max_eval_rows` rows in either
  (counted from the footers) is a ValueError naming that key.

Interface for the trainer (`data.build`):

    dataset = build_dataset(cfg)            # Dataset(spec, train, val, test, skipped_rows, info)
    len(dataset.train)                      # train rows, from Parquet metadata (no data read)
    loader = build_train_loader(dataset, *, batch_size, rank, world_size, seed, prefetch, pin_memory)
    # -> TrainLoader (in-memory) or StreamLoader, both `data.loaders.in_memory.TrainBatches`:
    #    iter(loader) endless Batch stream; state_dict() / load_state_dict(own) /
    #    load_resharded(all ranks' states); num_rows; built_rows, build_s; skipped_rows,
    #    skipped_by_reason (this rank)

`TrainLoader(dataset.train, ...)` on a streamed train split raises a TypeError pointing
at `build_train_loader`.

Preparing the vocabularies and dense statistics: `python -m data.stream vocab|stats ...`
(`data/parsing/prepare.py`); the loader's rows/s on real files: `python -m
benchmarks.stream_loader`.

Legend: N rows, Dn dense columns, U units ((file, row group) pairs).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data.columns import Dataset, SparseColumn, Split, concat_splits
from data.parsing.bad_rows import SkipLog, check_policy
from data.parsing.files import feature_name
from data.parsing.hashing import HashEncoder, VocabEncoder, hashed_group_ids
from data.parsing.prepare import DenseMoments, dense_values, expand_paths, read_stats, read_vocab
from data.sources.tabular import Parsed, Task, check_roles, parse_table, parse_tasks, role_columns
from data.spec import DatasetSpec, SparseFeature

log = logging.getLogger("data")
IDS = ("hash", "vocab")
STATS_SEED = 20260  # order of the row groups read by the first-pass statistics


@dataclass(kw_only=True)
class ParquetStreamConfig:
    """Config of the streaming Parquet source (see the module docstring).

    Attributes:
        train, val, test: Parquet paths or globs; val and test are read into memory.
        categorical, multi_hot, dense, log1p, user_id, tasks: column roles, as in
            `data.sources.tabular.TabularConfig`.
        ids: hash (into `num_embeddings[column]` rows) or vocab (`vocab_file`).
        vocab_file: vocabulary Parquet file (`data/parsing/prepare.py`), for ids=vocab.
        num_embeddings: column -> table size (id 0 included), for ids=hash.
        stats_file: dense statistics JSON (`data/parsing/prepare.py`); None = first pass.
        stats_rows: rows of the first pass when there is no stats file.
        shuffle: shuffle the units per epoch and the rows inside the buffer.
        shuffle_buffer: rows of the shuffle buffer (per rank).
        read_batch_rows: rows per pyarrow record batch when reading a row group.
        max_eval_rows: most rows of val or test (each is held in memory).
        on_bad_row: error or skip (see `data/parsing/bad_rows.py`).
        cluster_columns: columns whose combination is a row's latent cluster (val /
            test `Split.clusters`; empty = none).
    """

    name: str = "parquet_stream"
    train: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)
    categorical: list[str] = field(default_factory=list)
    multi_hot: dict[str, str] = field(default_factory=dict)
    dense: list[str] = field(default_factory=list)
    log1p: list[str] = field(default_factory=list)
    user_id: str | None = None
    tasks: list[dict[str, Any]] = field(default_factory=list)
    ids: str = "hash"
    vocab_file: str | None = None
    num_embeddings: dict[str, int] = field(default_factory=dict)
    stats_file: str | None = None
    stats_rows: int = 100_000
    shuffle: bool = True
    shuffle_buffer: int = 262_144
    read_batch_rows: int = 65_536
    max_eval_rows: int = 5_000_000
    on_bad_row: str = "error"
    cluster_columns: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------ units


@dataclass(frozen=True)
class Units:
    """The non-empty (file, row group) units of a split, in global order (files sorted).

    Attributes:
        files: the files.
        file_U, group_U: file index and row group of each unit.
        rows_U: rows of each unit (footer metadata); first_row_U: file rows before it.
    """

    files: tuple[str, ...]
    file_U: np.ndarray
    group_U: np.ndarray
    rows_U: np.ndarray
    first_row_U: np.ndarray

    def __len__(self) -> int:
        return len(self.rows_U)

    @property
    def num_rows(self) -> int:
        return int(self.rows_U.sum())

    def fingerprint(self) -> list[int]:
        """Changes when the files' row groups do (checked on resume)."""
        return [len(self), self.num_rows, len(self.files), int(self.rows_U.max(initial=0))]


def scan_units(files: list[str], columns: list[str]) -> Units:
    """Units of `files` from their footers; a missing column is an error naming the file."""
    file_u, group_u, rows_u, first_u = [], [], [], []
    for i, path in enumerate(files):
        pf = pq.ParquetFile(path)
        check_columns(pf, path, columns)
        first = 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if n:
                file_u.append(i)
                group_u.append(g)
                rows_u.append(n)
                first_u.append(first)
            first += n
    return Units(
        files=tuple(files),
        file_U=np.asarray(file_u, dtype=np.int64),
        group_U=np.asarray(group_u, dtype=np.int64),
        rows_U=np.asarray(rows_u, dtype=np.int64),
        first_row_U=np.asarray(first_u, dtype=np.int64),
    )


def check_columns(pf: pq.ParquetFile, path: str, columns: list[str]) -> None:
    names = pf.schema_arrow.names
    missing = [c for c in columns if c not in names]
    if missing:
        raise ValueError(f"{path}: no column(s) {missing}; the file has {names}")


class FileCache:
    """A few open `ParquetFile`s (footers parsed once), least recently used closed first."""

    def __init__(self, size: int = 16) -> None:
        self.size = size
        self._open: OrderedDict[str, pq.ParquetFile] = OrderedDict()

    def get(self, path: str) -> pq.ParquetFile:
        if path in self._open:
            self._open.move_to_end(path)
            return self._open[path]
        pf = pq.ParquetFile(path)
        self._open[path] = pf
        if len(self._open) > self.size:
            self._open.popitem(last=False)[1].close()
        return pf


# ----------------------------------------------------------------------------- reader


class UnitReader:
    """Reads one unit into an encoded, standardised `Split` (parse: `data.sources.tabular`)."""

    def __init__(
        self,
        cfg: ParquetStreamConfig,
        tasks: list[Task],
        encoders: dict[str, HashEncoder | VocabEncoder],
        mean_D: np.ndarray,
        std_D: np.ndarray,
    ) -> None:
        self.cfg, self.tasks, self.encoders = cfg, tasks, encoders
        self.mean_D, self.std_D = mean_D, std_D
        self.columns = role_columns(cfg, tasks)

    def read(self, units: Units, u: int, skips: SkipLog, files: FileCache, *, clusters: bool = False) -> Split:
        """Unit `u` of `units`; bad rows raise or are dropped and counted in `skips`.
        `clusters`: also read `cluster_columns` into `Split.clusters` (63-bit hashes of
        each row's combination; `_read_split` makes them codes 0..C-1)."""
        path, group = units.files[units.file_U[u]], int(units.group_U[u])
        pf = files.get(path)
        extra = [c for c in self.cfg.cluster_columns if c not in self.columns] if clusters else []
        columns = self.columns + extra
        check_columns(pf, path, columns)  # the file may have changed since the scan
        where = f"{path} (row group {group})"
        row, parts = int(units.first_row_U[u]), []
        for rb in pf.iter_batches(
            batch_size=self.cfg.read_batch_rows, row_groups=[group], columns=columns, use_threads=False
        ):
            table = pa.Table.from_batches([rb])
            parsed = parse_table(
                table, path=where, cfg=self.cfg, tasks=self.tasks, skips=skips, row_offset=row, raw_ids=True
            )
            part = self._encode(parsed)
            if clusters:  # the kept rows' cluster cells (parsed.rows: file rows from 1)
                part.clusters = cluster_hashes(table, self.cfg.cluster_columns, parsed.rows - row - 1, where)
            parts.append(part)
            row += rb.num_rows
        return concat_splits(parts)

    def _encode(self, parsed: Parsed) -> Split:
        sparse = {}
        for c in self.cfg.categorical:
            sparse[feature_name(c)] = SparseColumn.single_hot(self.encoders[c].encode(parsed.cats[c]))
        for c in self.cfg.multi_hot:
            lengths, tokens = parsed.multi[c]
            offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            sparse[feature_name(c)] = SparseColumn(values=self.encoders[c].encode(tokens), offsets=offsets)
        user = None
        if parsed.user is not None:  # integers as they are (like the tabular source), else hashed
            user = (
                np.asarray(pc.fill_null(pc.cast(parsed.user, pa.int64()), -1).to_numpy(), dtype=np.int64)
                if pa.types.is_integer(parsed.user.type)
                else hashed_group_ids(parsed.user)
            )
        return Split(
            dense=((parsed.dense - self.mean_D) / self.std_D).astype(np.float32),
            sparse=sparse,
            labels={k: v.astype(np.float32) for k, v in parsed.labels.items()},
            user_id=user,
        )


def cluster_hashes(table: pa.Table, columns: list[str], rows_N: np.ndarray, where: str) -> np.ndarray:
    """`[N]` int64: a 63-bit hash of each row's cluster cells (`columns`, as text,
    joined) at rows `rows_N` of `table`; an empty cell is an error naming the column."""
    cells = []
    for c in columns:
        col = table.column(c)
        if col.null_count:
            raise ValueError(f"{where}: data.cluster_columns: column {c!r} has {col.null_count} empty cell(s)")
        cells.append(pc.cast(col, pa.string()))
    joined = pc.binary_join_element_wise(*cells, "\x1f") if len(cells) > 1 else cells[0]
    return hashed_group_ids(joined.take(pa.array(rows_N)))


def cluster_codes(hashes_N: np.ndarray) -> np.ndarray:
    """`[N]` int64 codes 0..C-1 of the distinct hashes (sorted order)."""
    return np.unique(hashes_N, return_inverse=True)[1].astype(np.int64).reshape(-1)


@dataclass
class StreamTrain:
    """The streamed train split: its units and reader; rows only through `StreamLoader`."""

    units: Units
    reader: UnitReader
    shuffle: bool
    shuffle_buffer: int
    on_bad_row: str

    def __len__(self) -> int:
        return self.units.num_rows


# ----------------------------------------------------------------------------- source


def _check(cfg: ParquetStreamConfig) -> None:
    check_roles(cfg)
    check_policy(cfg.on_bad_row)
    for key in ("train", "val", "test"):
        if not getattr(cfg, key):
            raise ValueError(f"data.{key} names no file (data=parquet_stream needs train, val and test files)")
    if cfg.ids not in IDS:
        raise ValueError(f"data.ids={cfg.ids!r}; choose one of {IDS}")
    if len(set(cfg.cluster_columns)) != len(cfg.cluster_columns):
        raise ValueError(f"data.cluster_columns names a column twice: {cfg.cluster_columns}")
    for key in ("shuffle_buffer", "read_batch_rows", "max_eval_rows"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"data.{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.dense and cfg.stats_file is None and cfg.stats_rows < 1:
        raise ValueError("data.stats_rows must be >= 1 when data.stats_file is null")


def stream_names(cfg: ParquetStreamConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(tasks, sparse features) from the config alone (see `data.build.declared_names`)."""
    _check(cfg)
    features = tuple(feature_name(c) for c in (*cfg.categorical, *cfg.multi_hot))
    return tuple(name for name, _, _ in parse_tasks(cfg)), features


def stream_vocab(cfg: ParquetStreamConfig) -> dict[str, pa.Array]:
    """Column -> its vocabulary values in id order (ids 1..V), for ids=vocab."""
    if not cfg.vocab_file:
        raise ValueError("data.ids=vocab needs data.vocab_file")
    vocab = read_vocab(cfg.vocab_file)
    features = [*cfg.categorical, *cfg.multi_hot]
    missing = [c for c in features if c not in vocab]
    if missing:
        raise ValueError(f"data.vocab_file={cfg.vocab_file!r} has no vocabulary for column(s) {missing}")
    return {c: vocab[c] for c in features}


def build_encoders(
    cfg: ParquetStreamConfig, vocab: dict[str, pa.Array] | None = None
) -> dict[str, HashEncoder | VocabEncoder]:
    """Encoders per column; ids=vocab uses `vocab` (`stream_vocab`, read when None)."""
    features = [*cfg.categorical, *cfg.multi_hot]
    if cfg.ids == "vocab":
        vocab = stream_vocab(cfg) if vocab is None else vocab
        return {c: VocabEncoder(vocab[c], name=c) for c in features}
    missing = [c for c in features if c not in cfg.num_embeddings]
    unknown = sorted(set(cfg.num_embeddings) - set(features))
    if missing or unknown:
        raise ValueError(
            f"data.num_embeddings (data.ids=hash) needs a table size for every categorical / multi-hot column: "
            f"missing {missing}, not a feature column {unknown}"
        )
    small = {c: m for c, m in cfg.num_embeddings.items() if m < 2}
    if small:
        raise ValueError(f"data.num_embeddings: table sizes must be >= 2 (id 0 is 'missing'), got {small}")
    return {c: HashEncoder(int(cfg.num_embeddings[c])) for c in features}


def dense_stats(cfg: ParquetStreamConfig, units: Units) -> tuple[np.ndarray, np.ndarray, str]:
    """(`[Dn]` mean, `[Dn]` std with tiny std -> 1, where they came from)."""
    if not cfg.dense:
        return np.zeros(0), np.ones(0), "no dense columns"
    if cfg.stats_file:
        mean, std = read_stats(cfg.stats_file, cfg.dense, cfg.log1p)
        source = f"file {cfg.stats_file}"
    else:
        moments = DenseMoments(cfg.dense)
        cache = FileCache()
        for u in np.random.default_rng(STATS_SEED).permutation(len(units)):
            if moments.rows >= cfg.stats_rows:
                break
            path = units.files[units.file_U[u]]
            table = cache.get(path).read_row_group(int(units.group_U[u]), columns=cfg.dense)
            moments.add(dense_values(table, cfg.dense, path=path))
        doc = moments.as_dict()["columns"]
        empty = [c for c in cfg.dense if doc[c]["count"] == 0]
        if empty:
            raise ValueError(f"data.dense: no finite value of {empty} in the first {moments.rows} train rows")
        pre = ["log1p_" if c in cfg.log1p else "" for c in cfg.dense]
        mean = np.array([doc[c][p + "mean"] for c, p in zip(cfg.dense, pre, strict=True)])
        std = np.array([doc[c][p + "std"] for c, p in zip(cfg.dense, pre, strict=True)])
        source = f"first pass over {moments.rows} train rows (data.stats_rows={cfg.stats_rows})"
    return mean, np.where(std < 1e-6, 1.0, std), source


def _read_split(cfg: ParquetStreamConfig, key: str, reader: UnitReader, skips: SkipLog) -> Split:
    columns = list(dict.fromkeys([*reader.columns, *cfg.cluster_columns]))
    units = scan_units(expand_paths(getattr(cfg, key), key=f"data.{key}"), columns)
    if units.num_rows > cfg.max_eval_rows:
        raise ValueError(
            f"data.{key} has {units.num_rows} rows, more than data.max_eval_rows={cfg.max_eval_rows}; "
            f"{key} is held in memory: use fewer rows, or raise the limit if the memory allows"
        )
    if not len(units):
        raise ValueError(f"data.{key}: the files hold no rows")
    cache = FileCache()
    clusters = bool(cfg.cluster_columns)
    split = concat_splits([reader.read(units, u, skips, cache, clusters=clusters) for u in range(len(units))])
    if split.clusters is not None:
        split.clusters = cluster_codes(split.clusters)
    return split


def load_parquet_stream(cfg: ParquetStreamConfig) -> Dataset:
    """Scan the train footers, load val / test into memory; train rows stay on disk."""
    _check(cfg)
    tasks = parse_tasks(cfg)
    vocab = stream_vocab(cfg) if cfg.ids == "vocab" else None
    encoders = build_encoders(cfg, vocab)
    units = scan_units(expand_paths(cfg.train, key="data.train"), role_columns(cfg, tasks))
    if not len(units):
        raise ValueError("data.train: the files hold no rows")
    mean, std, stats_source = dense_stats(cfg, units)
    reader = UnitReader(cfg, tasks, encoders, mean, std)
    skips = SkipLog(cfg.on_bad_row)
    val, test = _read_split(cfg, "val", reader, skips), _read_split(cfg, "test", reader, skips)
    spec = DatasetSpec(
        name=cfg.name,
        sparse=tuple(
            SparseFeature(name=feature_name(c), num_embeddings=encoders[c].num_embeddings, multi_hot=c in cfg.multi_hot)
            for c in (*cfg.categorical, *cfg.multi_hot)
        ),
        dense_names=tuple(cfg.dense),
        tasks=tuple(name for name, _, _ in tasks),
        has_user_id=cfg.user_id is not None,
    )
    train = StreamTrain(
        units=units, reader=reader, shuffle=cfg.shuffle, shuffle_buffer=cfg.shuffle_buffer, on_bad_row=cfg.on_bad_row
    )
    info: dict[str, object] = {
        "dense_stats": {"mean": mean, "std": std, "source": stats_source},
        "files": {"train": len(units.files), "val": list(cfg.val), "test": list(cfg.test)},
        "train_units": len(units),
        "ids": cfg.ids,
        "positive_rates": {t: float(val.labels[t].mean()) for t in spec.tasks},
        "positive_rates_split": "val",  # train is not read at load time
        "skipped": skips.as_dict(),  # val / test; train counts are on the loader
    }
    if vocab is not None:  # feature -> values of ids 1..V (export's vocab.json, a warm start's row carry-over)
        info["vocab"] = {feature_name(c): values for c, values in vocab.items()}
    log.info(
        "parquet_stream: %d train rows in %d row groups of %d files (streamed), %d val, %d test rows in memory; "
        "dense statistics from %s",
        len(train), len(units), len(units.files), len(val), len(test), stats_source,
    )  # fmt: skip
    return Dataset(spec=spec, train=train, val=val, test=test, skipped_rows=skips.total, info=info)
