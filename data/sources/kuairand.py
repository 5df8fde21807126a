"""KuaiRand (Kuaishou, CIKM 2022) interaction logs joined with user and video features.

Takes the real files by path, CSV (any `data.delimiter`) or Parquet: KuaiRand-1K / -27K /
-Pure `log_standard_*.csv` and `log_random_*.csv` (several logs are concatenated; the
KuaiRand-Pure Parquet files shipped in data/files/kuairand-pure are read by the
`data=kuairand_pure` preset), `user_features_*.csv` (joined on
`user_id`), `video_features_basic_*.csv` and `video_features_statistic_*.csv` (each
joined on `video_id`; video files with the same header are parts of one table, like the
27K `..._part1/2/3.csv`, and are concatenated first). A log that already carries the
user and video columns, like the pre-joined 200-row sample in tests/fixtures/kuairand,
works without feature tables: every feature column is then read from the log.

Choices:

- Tasks: by default is_click, long_view, is_like, is_follow, is_comment, is_forward,
  is_profile_enter, keeping those the logs have or can derive. A task named explicitly
  in `data.tasks` that the logs lack is an error. Labels must be 0 / 1.
- `long_view`, when the log lacks it, is derived with the dataset's own definition
  (KuaiRand README, `long_view` / `long_time_play`): 1 iff
  `play_time_ms >= min(duration_ms, 18 s)`. `duration_ms <= 0` or empty means unknown
  (9% of the sample's rows); such a row counts as a long view iff it played >= 18 s.
- Features: each feature list defaults to None = the KuaiRand-1K columns below that the
  source has; a column listed explicitly must exist. User columns come from
  `user_features` when given, else from the log; video columns from the first video
  table that has them, else from the log. Outcome columns (play_time_ms, stay times,
  the is_* signals, and the columns the Pure Parquet files derive from them, listed in
  `data/sources/kuairand_schema.py`) and the task columns are never features, not even when
  listed explicitly (an error): they leak the labels. The video
  statistics are averages over the whole month, test dates included, as the dataset
  ships them; set `video_dense: []` to leave them out.
- Categorical values are matched as trimmed strings, vocabularies come from the train
  rows only, id 0 = empty or unseen. `tag` is multi-hot (comma-separated ids).
- Dense columns get `sign(x) * log1p(|x|)` (counts and durations are heavy-tailed; off
  with `log1p_dense: false`), then standardisation with train statistics.
- Join policy: a log row whose id is absent from a feature table (or a table cell that
  is empty / NaN) gets id 0 for that table's categorical columns and the train mean for
  its dense ones (0 after standardisation); `Dataset.info` counts such rows per table
  (`rows_without_user_features`, `rows_without_video_features`) and the imputed dense
  cells per column (`imputed_dense`). A table with a duplicated id is an error.
- Date window `dates: [first, last]` (inclusive; default null = every date): rows dated
  outside it are not used at all (in no split, and so in no vocabulary, imputation mean
  or dense statistic); `Dataset.info["rows_outside_dates"]` counts them. The bounds are
  compared like the dates themselves (below), and apply with either split.
- Split `date` (default): test = the last `test_days` dates of the log (of the window),
  val = the `val_days` dates before (or, with `val_days: 0`, a seeded `val_fraction` of
  the remaining rows), train = the rest. Dates are ordered as integers when they all are
  (yyyymmdd), else as text. Split `fraction`: seeded `val_fraction` and
  `test_fraction` of all rows (needed when the log has no `date`, like the sample).
  The window and the split are computed in `data/sources/kuairand_dates.py`.
- `Batch.user_id` is the log's user_id (GAUC groups by it).
- Scoring other logs (`score_files`, for `trainer.predict files=`): logs in the format
  of `log_files` (their outcome columns may be absent: those tasks are unlabelled
  there) are read after the configured logs, joined with the same feature tables and
  encoded with the train rows' vocabularies, imputation means and dense statistics
  (`Dataset.scored`); the split of the configured logs is computed before and without
  them, so training's splits are unchanged.

Legend: N log rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from data.columns import (
    SCORED,
    TRAIN,
    Dataset,
    SparseColumn,
    Split,
    scored_rows,
    split_rows,
    standardize_dense,
)
from data.parsing.bad_rows import SkipLog
from data.parsing.files import (
    binary_labels,
    category_dictionary,
    concat_keys,
    csv_delimiter,
    file_columns,
    file_keys,
    group_ids,
    key_values,
    signed_log1p,
    split_lists,
    train_vocab,
)
from data.sources.kuairand_dates import OUTSIDE, split_codes
from data.sources.kuairand_schema import (
    DEFAULT_LOG_CATEGORICAL,
    DEFAULT_LOG_DENSE,
    DEFAULT_TASKS,
    DEFAULT_USER_CATEGORICAL,
    DEFAULT_USER_DENSE,
    DEFAULT_VIDEO_CATEGORICAL,
    DEFAULT_VIDEO_DENSE,
    DEFAULT_VIDEO_MULTI_HOT,
    LONG_VIEW_INPUTS,
    NOT_FEATURES,
    long_view,
)
from data.sources.kuairand_tables import Feature, Read, Source, concat_reads, join_table, read_source
from data.spec import DatasetSpec, SparseFeature

KEY_COLUMNS = ("user_id", "video_id")  # log columns written out with predictions
_KIND_KEY = {"cat": "categorical", "dense": "dense", "multi": "multi_hot"}


@dataclass(kw_only=True)
class KuaiRandConfig:
    """Config of the KuaiRand source (see the module docstring for the policies).

    Attributes:
        log_files: interaction logs (CSV or Parquet), concatenated.
        user_features: user feature table keyed by user_id; None = user columns are in
            the log.
        video_features: video feature tables keyed by video_id (basic, statistic);
            [] = video columns are in the log.
        tasks: task columns; None = the default tasks the logs have.
        long_view_threshold_ms: the 18 s of the long_view definition.
        log_categorical, log_dense: feature columns of the log.
        user_categorical, user_dense: user columns; video_categorical, video_dense,
            video_multi_hot (column -> separator): video columns. None = defaults.
        log1p_dense: apply `sign(x) * log1p(|x|)` to every dense column.
        split: `date` or `fraction`.
        dates: `[first, last]` dates kept, inclusive (yyyymmdd, as the logs write them);
            rows outside are not used; None = every date.
        test_days, val_days: date split sizes (val_days 0: val is a val_fraction carve).
        val_fraction, test_fraction, seed: the seeded carve-outs.
        limit_rows: read only the first N rows of each log file; 0 = all.
        on_bad_row: error (raise naming file, row, column) or skip: a bad log row is
            dropped, a bad feature-table row too (its ids then count as unknown and are
            imputed like any other missing row); see `data/parsing/bad_rows.py`.
        format: auto (by extension: .parquet / .pq, else CSV), csv or parquet; for
            every file (logs and tables).
        delimiter: CSV field separator: one character, or `tab` / `\\t` for a tab.
        dataset_name: the data set's name (`DatasetSpec.name`, summary.json `dataset`).
    """

    name: str = "kuairand"
    log_files: list[str] = field(default_factory=list)
    user_features: str | None = None
    video_features: list[str] = field(default_factory=list)
    tasks: list[str] | None = None
    long_view_threshold_ms: int = 18_000
    log_categorical: list[str] | None = None
    log_dense: list[str] | None = None
    user_categorical: list[str] | None = None
    user_dense: list[str] | None = None
    video_categorical: list[str] | None = None
    video_multi_hot: dict[str, str] | None = None
    video_dense: list[str] | None = None
    log1p_dense: bool = True
    split: str = "date"
    dates: list[str | int] | None = None
    test_days: int = 1
    val_days: int = 1
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 2026
    limit_rows: int = 0
    on_bad_row: str = "error"
    format: str = "auto"
    delimiter: str = ","
    dataset_name: str = "kuairand"


def _log_source(cfg: KuaiRandConfig) -> Source:
    """The log files as one `Source`, with the columns every file has (headers only)."""
    if not cfg.log_files:
        raise ValueError("data.log_files names no file")
    read = {"fmt": cfg.format, "delimiter": csv_delimiter(cfg.delimiter)}
    headers = [file_columns(p, **read) for p in cfg.log_files]  # type: ignore[arg-type]
    common = [c for c in headers[0] if all(c in h for h in headers[1:])]
    return Source(name="log", paths=list(cfg.log_files), columns=common, key=None, **read)  # type: ignore[arg-type]


def _sources(cfg: KuaiRandConfig) -> dict[str, Source]:
    read = {"fmt": cfg.format, "delimiter": csv_delimiter(cfg.delimiter)}

    def columns(path: str) -> list[str]:
        return file_columns(path, **read)  # type: ignore[arg-type]

    sources = {"log": _log_source(cfg)}
    if cfg.user_features:
        cols = columns(cfg.user_features)
        sources["user"] = Source(name="user", paths=[cfg.user_features], columns=cols, key="user_id", **read)
    parts: dict[tuple[str, ...], list[str]] = {}
    for path in cfg.video_features:
        parts.setdefault(tuple(columns(path)), []).append(path)
    for i, (header, paths) in enumerate(parts.items()):
        sources[f"video{i}"] = Source(name=f"video{i}", paths=paths, columns=list(header), key="video_id", **read)
    log = sources["log"]
    for s in sources.values():
        if s.key is not None and s.key not in s.columns:
            raise ValueError(f"{s.paths[0]}: no {s.key!r} column to join on; the file has {s.columns}{s.hint()}")
        if s.key is not None and s.key not in log.columns:
            raise ValueError(
                f"{cfg.log_files[0]}: no {s.key!r} column to join {s.paths[0]} on; "
                f"the log files have {log.columns}{log.hint()}"
            )
    return sources


def _candidates(group: str, sources: dict[str, Source]) -> list[str]:
    """Sources searched for a feature group's columns: its tables, else the log."""
    if group == "user" and "user" in sources:
        return ["user"]
    videos = [k for k in sources if k.startswith("video")]
    if group == "video" and videos:
        return videos
    return ["log"]


def _features(cfg: KuaiRandConfig, sources: dict[str, Source], tasks: list[str]) -> list[Feature]:
    multi = cfg.video_multi_hot
    groups = [
        ("log", "cat", cfg.log_categorical, DEFAULT_LOG_CATEGORICAL, {}),
        ("log", "dense", cfg.log_dense, DEFAULT_LOG_DENSE, {}),
        ("user", "cat", cfg.user_categorical, DEFAULT_USER_CATEGORICAL, {}),
        ("user", "dense", cfg.user_dense, DEFAULT_USER_DENSE, {}),
        ("video", "cat", cfg.video_categorical, DEFAULT_VIDEO_CATEGORICAL, {}),
        (
            "video",
            "multi",
            None if multi is None else list(multi),
            tuple(DEFAULT_VIDEO_MULTI_HOT),
            multi or {},
        ),
        ("video", "dense", cfg.video_dense, DEFAULT_VIDEO_DENSE, {}),
    ]
    features: list[Feature] = []
    for group, kind, given, default, seps in groups:
        candidates = _candidates(group, sources)
        for column in default if given is None else given:
            source = next((k for k in candidates if column in sources[k].columns), None)
            if source is None and given is not None:
                where = [p for k in candidates for p in sources[k].paths]
                raise ValueError(f"data.{group}_{_KIND_KEY[kind]}: column {column!r} is in none of {where}")
            why = "a task label" if column in tasks else NOT_FEATURES.get(column)
            if why is not None:
                raise ValueError(f"data.{group}_{_KIND_KEY[kind]}: column {column!r} is {why}; it cannot be a feature")
            if source is not None:
                sep = seps.get(column, DEFAULT_VIDEO_MULTI_HOT.get(column, ","))
                features.append(Feature(column=column, kind=kind, source=source, sep=sep))
    names = [f.column for f in features]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"feature column(s) {dupes} are selected twice; feature names must be unique")
    if not features:
        raise ValueError("no feature column selected")
    return features


def _tasks(cfg: KuaiRandConfig, log: Source) -> list[tuple[str, bool]]:
    """(task, derived) pairs, in request order."""
    out = []
    for task in DEFAULT_TASKS if cfg.tasks is None else cfg.tasks:
        if task in log.columns:
            out.append((task, False))
        elif task == "long_view" and all(c in log.columns for c in LONG_VIEW_INPUTS):
            out.append((task, True))
        elif cfg.tasks is not None:
            hint = " (long_view needs play_time_ms and duration_ms)" if task == "long_view" else ""
            raise ValueError(
                f"task {task!r} is not a column of every log file {log.paths}{hint}; "
                f"the columns they all have are {log.columns}{log.hint()}"
            )
    if not out:
        raise ValueError(
            f"none of the tasks {list(DEFAULT_TASKS)} is in the log files {log.paths}; "
            f"the columns they all have are {log.columns}{log.hint()}"
        )
    return out


def kuairand_tasks(cfg: KuaiRandConfig) -> tuple[str, ...]:
    """The tasks this config yields, exactly: `data.tasks`, or with `data.tasks=null` the
    default tasks the log files have (read from their headers only)."""
    if cfg.tasks is not None:
        return tuple(cfg.tasks)
    return tuple(task for task, _ in _tasks(cfg, _log_source(cfg)))


def kuairand_names(cfg: KuaiRandConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The tasks and sparse features this config can yield, from the config alone (see
    `data.build.declared_names`). A superset: defaults are kept only when the files have
    those columns, which is known after reading the headers."""
    tasks = tuple(cfg.tasks) if cfg.tasks is not None else DEFAULT_TASKS
    groups = [
        (cfg.log_categorical, DEFAULT_LOG_CATEGORICAL),
        (cfg.user_categorical, DEFAULT_USER_CATEGORICAL),
        (cfg.video_categorical, DEFAULT_VIDEO_CATEGORICAL),
        (cfg.video_multi_hot, DEFAULT_VIDEO_MULTI_HOT),
    ]
    features = [c for given, default in groups for c in (default if given is None else given)]
    return tasks, tuple(dict.fromkeys(features))


def load_kuairand(
    cfg: KuaiRandConfig,
    *,
    score_files: list[str] | None = None,
    keep_keys: bool = False,
    base_vocab: dict[str, pa.Array] | None = None,
) -> Dataset:
    """Read the logs, join the feature tables, derive labels, encode and split.

    Args:
        cfg: the source config.
        score_files: other logs to encode as `Dataset.scored` (see the module doc).
        keep_keys: keep `Split.keys` (`file`, `row`, `user_id`, `video_id`).
        base_vocab: feature -> an earlier run's vocabulary, which the vocabularies
            extend (`data.parsing.files.train_vocab`); None = train values only.
    """
    sources = _sources(cfg)
    log = sources["log"]
    tasks = _tasks(cfg, log)
    features = _features(cfg, sources, [t for t, _ in tasks])
    if "user_id" not in log.columns:
        raise ValueError(f"the log files {log.paths} have no `user_id` column")
    by_source: dict[str, list[Feature]] = {}
    for f in features:
        by_source.setdefault(f.source, []).append(f)

    skips = SkipLog(cfg.on_bad_row)
    key_cols = [c for c in KEY_COLUMNS if c in log.columns] if keep_keys or score_files else []
    read = _read_log(cfg, sources, tasks, by_source.get("log", []), skips, key_cols)
    labels = _labels(cfg, log, tasks, read)
    split_N, info = split_codes(cfg, read.text.get("date"), len(read.text["user_id"]))
    if info["rows_outside_dates"]:  # out of the window: gone before any join, vocabulary or statistic
        inside = split_N != OUTSIDE
        read, labels, split_N = _take_rows(read, inside), {t: v[inside] for t, v in labels.items()}, split_N[inside]
    paths = list(log.paths)
    scored_labels: tuple[str, ...] = ()
    if score_files:
        extra, extra_labels, scored_labels = _read_scored(cfg, sources, tasks, by_source.get("log", []), skips,
                                                          list(score_files), key_cols)  # fmt: skip
        read = concat_reads(read, extra)
        labels = {t: np.concatenate([v, extra_labels[t]]) for t, v in labels.items()}
        split_N = np.concatenate([split_N, np.full(len(extra.text["user_id"]), SCORED, dtype=np.int8)])
        paths += list(score_files)
    is_train = split_N == TRAIN

    text = dict(read.text)
    dense = {f.column: read.numbers[f.column] for f in by_source.get("log", []) if f.kind == "dense"}
    info["rows_without_user_features"], info["rows_without_video_features"] = 0, {}
    for name, source in sources.items():
        if name != "log" and name in by_source:
            missing = join_table(source, by_source[name], read.text[str(source.key)], text, dense, skips)
            if name == "user":
                info["rows_without_user_features"] = missing
            else:
                info["rows_without_video_features"][",".join(source.paths)] = missing

    specs, sparse, info["vocab"] = _sparse_columns(features, text, is_train, base_vocab or {})
    dense_names = [f.column for f in features if f.kind == "dense"]
    dense_ND, info["imputed_dense"] = _dense_matrix(dense_names, dense, is_train, log1p=cfg.log1p_dense)
    keys = None
    if key_cols:
        keys = concat_keys([file_keys(p, r) for p, r in zip(paths, read.rows, strict=True)])
        keys.update({c: key_values(read.text[c]) for c in key_cols})
    full = Split(dense=dense_ND, sparse=sparse, labels=labels, user_id=group_ids(read.text["user_id"]), keys=keys)
    train, val, test = split_rows(full, split_N)
    scored = scored_rows(full, split_N)
    if not keep_keys:
        for split in (train, val, test):
            split.keys = None
    info["dense_transforms"] = ["signed_log1p" if cfg.log1p_dense else None for _ in dense_names]
    info["dense_stats"] = standardize_dense(train, val, test, *([scored] if scored is not None else []))
    spec = DatasetSpec(
        name=cfg.dataset_name,
        sparse=tuple(specs),
        dense_names=tuple(dense_names),
        tasks=tuple(t for t, _ in tasks),
        has_user_id=True,
    )
    info["derived_tasks"] = [t for t, d in tasks if d]
    derived = f"play_time_ms >= min(duration_ms, {cfg.long_view_threshold_ms} ms) (derived; no long_view column)"
    info["label_sources"] = {t: derived if d else f"column {t!r} (0 / 1)" for t, d in tasks}
    info["feature_sources"] = {f.column: f.source for f in features}
    info["positive_rates"] = {t: float(train.labels[t].mean()) for t in spec.tasks}
    info["skipped"] = skips.as_dict()
    return Dataset(spec=spec, train=train, val=val, test=test, skipped_rows=skips.total, info=info,
                   scored=scored, scored_labels=scored_labels)  # fmt: skip


def _take_rows(read: Read, keep_N: np.ndarray) -> Read:
    """The rows of `read` where `keep_N`, with their file row numbers."""
    bounds = np.concatenate([[0], np.cumsum(read.file_rows)]).tolist()
    per_file = [keep_N[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    index = pa.array(np.flatnonzero(keep_N))
    return Read(
        text={c: v.take(index) for c, v in read.text.items()},
        numbers={c: v[keep_N] for c, v in read.numbers.items()},
        file_rows=[int(k.sum()) for k in per_file],
        rows=[r[k] for r, k in zip(read.rows, per_file, strict=True)],
    )


def _read_scored(
    cfg: KuaiRandConfig,
    sources: dict[str, Source],
    tasks: list[tuple[str, bool]],
    own: list[Feature],
    skips: SkipLog,
    files: list[str],
    key_cols: list[str],
) -> tuple[Read, dict[str, np.ndarray], tuple[str, ...]]:
    """The logs to score: their columns (those of the configured logs but `date` and the
    outcomes they lack), every task's labels (zeros where unlabelled) and the labelled tasks."""
    log = sources["log"]
    headers = [file_columns(p, fmt=log.fmt, delimiter=log.delimiter) for p in files]
    common = [c for c in headers[0] if all(c in h for h in headers[1:])]
    src = Source(name="scored", paths=files, columns=common, key=None, fmt=log.fmt, delimiter=log.delimiter)
    labelled = [(t, d) for t, d in tasks if (all(c in common for c in LONG_VIEW_INPUTS) if d else t in common)]
    text, numbers, label_cols = _log_columns(sources, labelled, own, key_cols)
    read = read_source(src, text, numbers, skips=skips, label_cols=label_cols)
    labels = _labels(cfg, src, labelled, read)
    n = len(read.text["user_id"])
    return read, {t: labels.get(t, np.zeros(n, dtype=np.float32)) for t, _ in tasks}, tuple(t for t, _ in labelled)


def _read_log(
    cfg: KuaiRandConfig,
    sources: dict[str, Source],
    tasks: list[tuple[str, bool]],
    own: list[Feature],
    skips: SkipLog,
    key_cols: list[str],
) -> Read:
    """The log columns needed: join keys, user_id, date, label inputs, its own features
    (and `key_cols`, kept for predictions)."""
    wants = cfg.split == "date" or cfg.dates is not None
    date = ["date"] if wants and "date" in sources["log"].columns else []
    text, numbers, label_cols = _log_columns(sources, tasks, own, [*key_cols, *date])
    return read_source(sources["log"], text, numbers, limit_rows=cfg.limit_rows, skips=skips, label_cols=label_cols)


def _log_columns(
    sources: dict[str, Source], tasks: list[tuple[str, bool]], own: list[Feature], extra_text: list[str]
) -> tuple[list[str], list[str], tuple[str, ...]]:
    """(text, number, label) columns to read from a log: join keys, user_id, its own
    features, `extra_text`, and the inputs of `tasks` (a derived task reads its inputs)."""
    keys = [s.key for s in sources.values() if s.key]
    text = [*keys, "user_id", *(f.column for f in own if f.kind != "dense"), *extra_text]
    numbers = [t for t, derived in tasks if not derived]
    numbers += list(LONG_VIEW_INPUTS) if any(d for _, d in tasks) else []
    numbers += [f.column for f in own if f.kind == "dense"]
    label_cols = tuple(t for t, derived in tasks if not derived)
    return list(dict.fromkeys(text)), list(dict.fromkeys(numbers)), label_cols


def _sparse_columns(
    features: list[Feature], text: dict[str, pa.ChunkedArray], is_train: np.ndarray, base: dict[str, pa.Array]
) -> tuple[list[SparseFeature], dict[str, SparseColumn], dict[str, pa.Array]]:
    """Encode the categorical and multi-hot columns with train-only vocabularies
    (returned too: feature -> values of ids 1, 2, ...)."""
    specs, sparse, vocab = [], {}, {}
    for f in features:
        if f.kind == "cat":
            codes, dictionary = category_dictionary(text[f.column])
            ids, size, vocab[f.column] = train_vocab(codes, dictionary, is_train, base.get(f.column))
            sparse[f.column] = SparseColumn.single_hot(ids)
        elif f.kind == "multi":
            lengths, tokens = split_lists(text[f.column], f.sep)
            codes, dictionary = category_dictionary(tokens)
            ids, size, vocab[f.column] = train_vocab(
                codes, dictionary, np.repeat(is_train, lengths), base.get(f.column)
            )
            offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            sparse[f.column] = SparseColumn(values=ids, offsets=offsets)
        else:
            continue
        specs.append(SparseFeature(name=f.column, num_embeddings=size, multi_hot=f.kind == "multi"))
    return specs, sparse, vocab


def _dense_matrix(
    names: list[str], dense: dict[str, np.ndarray], is_train: np.ndarray, *, log1p: bool
) -> tuple[np.ndarray, dict[str, int]]:
    """`[N, Dn]` float32 with empty / non-finite cells set to the train mean (and their counts)."""
    columns, imputed = [], {}
    for c in names:
        x = signed_log1p(dense[c]) if log1p else dense[c]
        bad = ~np.isfinite(x)
        known = is_train & ~bad
        columns.append(np.where(bad, float(x[known].mean()) if known.any() else 0.0, x))
        imputed[c] = int(bad.sum())
    return (np.stack(columns, axis=1) if columns else np.zeros((len(is_train), 0))).astype(np.float32), imputed


def _labels(cfg: KuaiRandConfig, log: Source, tasks: list[tuple[str, bool]], read: Read) -> dict[str, np.ndarray]:
    """Binary labels (errors name the log file and its row)."""
    sizes = np.concatenate([[0], np.cumsum(read.file_rows)]).tolist()
    labels = {}
    for task, derived in tasks:
        if derived:
            labels[task] = long_view(
                read.numbers["play_time_ms"],
                read.numbers["duration_ms"],
                threshold_ms=cfg.long_view_threshold_ms,
            )
            continue
        parts = [
            binary_labels(read.numbers[task][lo:hi], path=path, column=task)
            for path, lo, hi in zip(log.paths, sizes[:-1], sizes[1:], strict=True)
        ]
        labels[task] = np.concatenate(parts)
    return labels
