"""Source registry: `data.name` in the config picks the loader.

Each source module defines a config dataclass (with a `name` field) and a function
`cfg -> Dataset`; registering both here makes it selectable as `data=<name>`.
`build_train_loader` is the one way to batch a dataset's train split: in memory
(`data.loader.TrainLoader`) or streamed (`data.stream_loader.StreamLoader`), both
`data.loader.TrainBatches`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from data.census import CensusIncomeConfig, census_names, load_census_income
from data.columns import Dataset, check_dataset
from data.kuairand import KuaiRandConfig, kuairand_names, load_kuairand
from data.loader import TrainBatches, TrainLoader
from data.stream import ParquetStreamConfig, StreamTrain, load_parquet_stream, stream_names
from data.stream_loader import StreamLoader
from data.synthetic import SyntheticConfig, load_synthetic, synthetic_names
from data.tabular import TabularConfig, load_tabular, tabular_names

# name -> (config dataclass, loader)
SOURCES: dict[str, tuple[type, Callable[[Any], Dataset]]] = {
    "census_income": (CensusIncomeConfig, load_census_income),
    "kuairand": (KuaiRandConfig, load_kuairand),
    "parquet_stream": (ParquetStreamConfig, load_parquet_stream),
    "synthetic": (SyntheticConfig, load_synthetic),
    "tabular": (TabularConfig, load_tabular),
}


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


def build_dataset(cfg: Any) -> Dataset:
    name = getattr(cfg, "name", None)
    if name not in SOURCES:
        raise ValueError(f"data.name={name!r} is not a known source; choose one of {sorted(SOURCES)}")
    config_cls, load = SOURCES[name]
    if not isinstance(cfg, config_cls):
        raise ValueError(f"data config for {name!r} must be a {config_cls.__name__}, got {type(cfg).__name__}")
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
