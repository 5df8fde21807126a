"""Source registry: `data.name` in the config picks the loader.

Each source module defines a config dataclass (with a `name` field) and a function
`cfg -> Dataset`; registering both here makes it selectable as `data=<name>`. The file
sources in `SCORABLE` also take `score_files` (other files with the source's schema,
encoded like its train split: `Dataset.scored`) and `keep_keys` (keep the rows' key
columns, `Split.keys`); both serve `trainer.predict`.
`build_train_loader` is the one way to batch a dataset's train split: in memory
(`data.loaders.in_memory.TrainLoader`) or streamed (`data.loaders.stream.StreamLoader`), both
`data.loaders.in_memory.TrainBatches`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from data.columns import Dataset, check_dataset
from data.loaders.in_memory import TrainBatches, TrainLoader
from data.loaders.stream import StreamLoader
from data.sources.census import CensusIncomeConfig, census_names, load_census_income
from data.sources.kuairand import KuaiRandConfig, kuairand_names, kuairand_tasks, load_kuairand
from data.sources.parquet_stream import ParquetStreamConfig, StreamTrain, load_parquet_stream, stream_names
from data.sources.synthetic import SyntheticConfig, load_synthetic, synthetic_names
from data.sources.tabular import TabularConfig, load_tabular, tabular_names

# name -> (config dataclass, loader)
SOURCES: dict[str, tuple[type, Callable[..., Dataset]]] = {
    "census_income": (CensusIncomeConfig, load_census_income),
    "kuairand": (KuaiRandConfig, load_kuairand),
    "parquet_stream": (ParquetStreamConfig, load_parquet_stream),
    "synthetic": (SyntheticConfig, load_synthetic),
    "tabular": (TabularConfig, load_tabular),
}
SCORABLE = ("census_income", "kuairand", "tabular")  # sources that can encode other files


# name -> cfg -> (tasks, sparse feature names) the source can produce, without reading data
NAMES: dict[str, Callable[[Any], tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "census_income": census_names,
    "kuairand": kuairand_names,
    "parquet_stream": stream_names,
    "synthetic": synthetic_names,
    "tabular": tabular_names,
}


def declared_names(cfg: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Task and sparse feature names that `cfg` can produce, known from the config alone,
    so names used elsewhere in the config are checked before any data work. KuaiRand
    returns a superset (its defaults depend on the files' columns); the exact names are
    checked again once the data is loaded."""
    return NAMES[cfg.name](cfg)


def task_names(cfg: Any) -> tuple[str, ...]:
    """The tasks `cfg` yields, exactly: `declared_names`' for every source but KuaiRand
    with `data.tasks=null`, whose default tasks are the ones its log files' headers have
    (read here, no rows)."""
    if cfg.name == "kuairand":
        return kuairand_tasks(cfg)
    return declared_names(cfg)[0]


def build_dataset(
    cfg: Any,
    *,
    score_files: list[str] | None = None,
    keep_keys: bool = False,
    base_vocab: dict[str, Any] | None = None,
) -> Dataset:
    """The source's `Dataset`, checked (`check_dataset`); see the module doc for the options.

    `base_vocab` (feature -> an earlier run's vocabulary, `data/ids.py`) makes the file
    sources extend that vocabulary instead of building one from the train rows alone:
    a warm-started run keeps every id its source trained. The streaming source's ids
    come from its vocabulary file (extend it with `python -m data.stream vocab
    --extend`) and the synthetic source's are positional: they ignore it.
    """
    name = getattr(cfg, "name", None)
    if name not in SOURCES:
        raise ValueError(f"data.name={name!r} is not a known source; choose one of {sorted(SOURCES)}")
    config_cls, load = SOURCES[name]
    if not isinstance(cfg, config_cls):
        raise ValueError(f"data config for {name!r} must be a {config_cls.__name__}, got {type(cfg).__name__}")
    if name in SCORABLE:
        dataset = load(cfg, score_files=score_files, keep_keys=keep_keys, base_vocab=base_vocab)
    elif score_files:
        raise ValueError(f"data.name={name!r} cannot score other files; sources that can: {list(SCORABLE)}")
    else:  # no key columns: predictions number the rows
        dataset = load(cfg)
    check_dataset(dataset, getattr(cfg, "on_bad_row", "error"))
    return dataset


def build_train_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    prefetch: int = 4,
    pin_memory: bool = False,
) -> TrainBatches:
    """This rank's endless training batches of `dataset` (in memory or streamed).

    Args:
        batch_size: local (per-rank) batch size.
        seed: data-order seed (the trainer's `trainer.seed`).
        prefetch: batches built ahead in a background thread (0 = synchronous).
        pin_memory: pin batches in host memory as they are built (needs CUDA; then copy
            them with `batch.to(device, non_blocking=True)`).
    """
    kwargs: dict[str, Any] = {
        "spec": dataset.spec,
        "batch_size": batch_size,
        "rank": rank,
        "world_size": world_size,
        "seed": seed,
        "prefetch": prefetch,
        "pin_memory": pin_memory,
    }
    if isinstance(dataset.train, StreamTrain):
        return StreamLoader(dataset.train, **kwargs)
    return TrainLoader(dataset.train, **kwargs)  # type: ignore[arg-type]
