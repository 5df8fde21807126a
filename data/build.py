"""Source registry: `data.name` in the config picks the loader.

Each source module defines a config dataclass (with a `name` field) and a function
`(cfg, *, score_files=None, keep_keys=False) -> Dataset`; registering both here makes it
selectable as `data=<name>`. `score_files` are other files with the source's schema to
encode like its train split (`Dataset.scored`), `keep_keys` keeps the rows' key columns
(`Split.keys`); both serve `trainer.predict`.
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
SOURCES: dict[str, tuple[type, Callable[..., Dataset]]] = {
    "census_income": (CensusIncomeConfig, load_census_income),
    "kuairand": (KuaiRandConfig, load_kuairand),
    "synthetic": (SyntheticConfig, load_synthetic),
    "tabular": (TabularConfig, load_tabular),
}
SCORABLE = ("census_income", "kuairand", "tabular")  # sources that can encode other files


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


def build_dataset(cfg: Any, *, score_files: list[str] | None = None, keep_keys: bool = False) -> Dataset:
    """The source's `Dataset`, checked (`check_dataset`); see the module doc for the options."""
    name = getattr(cfg, "name", None)
    if name not in SOURCES:
        raise ValueError(f"data.name={name!r} is not a known source; choose one of {sorted(SOURCES)}")
    config_cls, load = SOURCES[name]
    if not isinstance(cfg, config_cls):
        raise ValueError(f"data config for {name!r} must be a {config_cls.__name__}, got {type(cfg).__name__}")
    if score_files and name not in SCORABLE:
        raise ValueError(f"data.name={name!r} cannot score other files; sources that can: {list(SCORABLE)}")
    dataset = load(cfg, score_files=score_files, keep_keys=keep_keys)
    check_dataset(dataset, getattr(cfg, "on_bad_row", "error"))
    return dataset
