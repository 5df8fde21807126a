"""Source registry: `data.name` in the config picks the loader.

Each source module defines a config dataclass (with a `name` field) and a function
`cfg -> Dataset`; registering both here makes it selectable as `data=<name>`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from data.census import CensusIncomeConfig, census_names, load_census_income
from data.columns import Dataset, check_dataset
from data.kuairand import KuaiRandConfig, kuairand_names, load_kuairand
from data.synthetic import SyntheticConfig, load_synthetic, synthetic_names
from data.tabular import TabularConfig, load_tabular, tabular_names

# name -> (config dataclass, loader)
SOURCES: dict[str, tuple[type, Callable[[Any], Dataset]]] = {
    "census_income": (CensusIncomeConfig, load_census_income),
    "kuairand": (KuaiRandConfig, load_kuairand),
    "synthetic": (SyntheticConfig, load_synthetic),
    "tabular": (TabularConfig, load_tabular),
}


# name -> cfg -> (tasks, sparse feature names) the source can produce, without reading data
NAMES: dict[str, Callable[[Any], tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "census_income": census_names,
    "kuairand": kuairand_names,
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
