"""KuaiRand's split by date and its date window (`data.split`, `data.dates`,
`data.test_days`, `data.val_days`; the rules are in the `data/sources/kuairand.py`
module doc): per log row, a split code, or `OUTSIDE` for rows outside the window.

Legend: N log rows.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import pyarrow as pa

from data.columns import TEST, TRAIN, VAL, carve_splits
from data.parsing.files import category_dictionary


class DateSplitConfig(Protocol):
    """The fields of `data.sources.kuairand.KuaiRandConfig` the split reads."""

    log_files: list[str]
    split: str
    dates: list[str | int] | None
    test_days: int
    val_days: int
    val_fraction: float
    test_fraction: float
    seed: int


SPLITS = ("date", "fraction")
OUTSIDE = -1  # split code of rows outside `data.dates` (no split: `split_rows` ignores them)


def split_codes(cfg: DateSplitConfig, dates: pa.ChunkedArray | None, num_rows: int) -> tuple[np.ndarray, dict]:
    """`[N]` int8 split codes (TRAIN / VAL / TEST, `OUTSIDE` for rows outside `data.dates`)
    and the split's `info` entries."""
    if cfg.split not in SPLITS:
        raise ValueError(f"data.split={cfg.split!r}; choose one of {SPLITS}")
    if cfg.split == "date" or cfg.dates is not None:
        if dates is None:
            fixes = ["data.split=fraction"] * (cfg.split == "date") + ["data.dates=null"] * (cfg.dates is not None)
            raise ValueError(f"the log files {cfg.log_files} have no `date` column; set {' and '.join(fixes)}")
        if dates.null_count:
            row = int(np.flatnonzero(np.asarray(dates.is_null().to_numpy(zero_copy_only=False)))[0])
            raise ValueError(f"log row {row + 1} (files {cfg.log_files} concatenated): empty `date`")
    inside, info = np.ones(num_rows, dtype=bool), {"rows_outside_dates": 0}
    if cfg.dates is not None:
        inside = in_window(cfg, dates)  # type: ignore[arg-type]
        info["rows_outside_dates"] = int(num_rows - inside.sum())
    rows = np.flatnonzero(inside)
    split = np.full(num_rows, OUTSIDE, dtype=np.int8)
    if cfg.split == "fraction":
        carved = carve_splits(len(rows), val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=cfg.seed)
        split[rows] = carved
        return split, info
    if cfg.test_days < 1 or cfg.val_days < 0:
        raise ValueError(f"data.test_days must be >= 1 and data.val_days >= 0, got {cfg.test_days}, {cfg.val_days}")
    kept = dates.take(pa.array(rows)) if cfg.dates is not None else dates  # type: ignore[union-attr]
    codes, dictionary = category_dictionary(kept)
    values = np.asarray(dictionary.to_pylist())
    order = np.argsort(date_keys(values), kind="stable")
    if len(values) <= cfg.test_days + cfg.val_days:
        within = "" if cfg.dates is None else f" within data.dates={list(cfg.dates)}"
        raise ValueError(
            f"the logs span {len(values)} dates{within}; data.test_days={cfg.test_days} + "
            f"data.val_days={cfg.val_days} leave no train date"
        )
    rank = np.empty(len(values), dtype=np.int64)
    rank[order] = np.arange(len(values))  # 0 = earliest date
    row_rank = rank[codes]
    first_test = len(values) - cfg.test_days
    first_val = first_test - cfg.val_days
    codes_in = np.full(len(rows), TRAIN, dtype=np.int8)
    codes_in[row_rank >= first_test] = TEST
    codes_in[(row_rank >= first_val) & (row_rank < first_test)] = VAL
    if cfg.val_days == 0:
        rest = np.flatnonzero(codes_in == TRAIN)
        carved = carve_splits(len(rest), val_fraction=cfg.val_fraction, test_fraction=0.0, seed=cfg.seed)
        codes_in[rest] = carved
    split[rows] = codes_in
    info.update(
        train_dates=values[order[:first_val]].tolist(),
        val_dates=values[order[first_val:first_test]].tolist(),
        test_dates=values[order[first_test:]].tolist(),
    )
    return split, info


def in_window(cfg: DateSplitConfig, dates: pa.ChunkedArray) -> np.ndarray:
    """`[N]` bool: the rows whose date is within `data.dates` (inclusive), compared with
    the split's keys (`date_keys`: integers when every date is one, else text)."""
    window = cfg.dates
    if not isinstance(window, list | tuple) or len(window) != 2:
        raise ValueError(f"data.dates={window!r}; give [first, last] (inclusive), e.g. [20220501, 20220507]")
    codes, dictionary = category_dictionary(dates)
    values = np.asarray(dictionary.to_pylist())
    keys = date_keys(values)
    bounds = np.asarray([str(d).strip() for d in window])
    try:
        first, last = bounds.astype(keys.dtype) if keys.dtype.kind == "i" else bounds
    except ValueError:
        raise ValueError(
            f"data.dates={list(window)}: the logs' dates are integers (yyyymmdd, like {values[0]}); give the bounds so"
        ) from None
    if first > last:
        raise ValueError(f"data.dates={list(window)}: the first date is after the last")
    inside = ((keys >= first) & (keys <= last))[codes]
    if not inside.any():
        span = values[np.argsort(keys, kind="stable")[[0, -1]]].tolist()
        raise ValueError(f"data.dates={list(window)} holds no log row; the logs' dates are {span[0]} .. {span[1]}")
    return inside


def date_keys(values: np.ndarray) -> np.ndarray:
    """Sort keys of the distinct `date` strings: integers when they all are (yyyymmdd, as
    KuaiRand writes them; numeric order also holds for unpadded day numbers), else the
    strings (ISO dates sort as text)."""
    try:
        return values.astype(np.int64)
    except ValueError:
        return values
