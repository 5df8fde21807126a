"""The `data.on_bad_row` policy: what a source does with a row it cannot use.

- `error` (default): the first bad row raises a `ValueError` naming file, row and column
  (rows numbered from 1 in file order, header excluded).
- `skip`: every bad row is dropped, counted by reason, and the first example of each
  (file, column, reason) is logged as a warning. The total goes to `summary.json` as
  `skipped_rows`, the counts by reason to the dataset's `info["skipped"]`.

A row is bad when a CSV line has the wrong number of fields, a numeric cell does not
parse, a dense value is empty / NaN / Inf (sources that impute missing dense values,
KuaiRand's feature tables, keep imputing), a label is not 0 / 1, or, checked last on the
assembled splits, an id lies outside its embedding table. Sources flag rows with
`BadRows.flag` while parsing one file and drop them once the file is parsed, so a row is
counted once however many of its cells are bad.

Legend: N rows of the file being parsed.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("data")

ON_BAD_ROW = ("error", "skip")
MAX_EXAMPLES = 20  # warnings logged per source; the counts are always complete


def check_policy(policy: str) -> str:
    if policy not in ON_BAD_ROW:
        raise ValueError(f"data.on_bad_row={policy!r}; choose one of {ON_BAD_ROW}")
    return policy


@dataclass
class SkipLog:
    """Skipped rows of one source, over all its files."""

    policy: str = "error"
    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    ragged_rows: dict[str, list[int]] = field(default_factory=dict)  # path -> file rows dropped at read
    _seen: set[tuple[str, str, str]] = field(default_factory=set)

    def __post_init__(self) -> None:
        check_policy(self.policy)

    @property
    def skip(self) -> bool:
        return self.policy == "skip"

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, where: str, column: str, reason: str, count: int, example: str) -> None:
        self.counts[reason] += count
        key = (where, column, reason)
        if key not in self._seen and len(self.examples) < MAX_EXAMPLES:
            self._seen.add(key)
            self.examples.append(example)
            log.warning("data.on_bad_row=skip: skipping %d row(s), e.g. %s", count, example)

    def file(self, path: str | Path, num_rows: int, *, row_offset: int = 0) -> BadRows:
        """Bad rows of `num_rows` table rows of `path`, the first being file row `row_offset + 1`."""
        return BadRows(self, str(path), num_rows, row_offset=row_offset)

    def ragged_line_handler(self, path: str | Path, *, header: bool = True) -> Callable[[Any], str]:
        """pyarrow CSV `invalid_row_handler`: skip and count lines with a wrong field count."""

        def handle(row: Any) -> str:
            if not self.skip:
                return "error"
            example = describe_ragged(path, row, header=header)
            if row.number is not None:
                self.ragged_rows.setdefault(str(Path(path)), []).append(row.number - 1 if header else row.number)
            self.add(str(path), "*", "wrong number of fields", 1, example)
            return "skip"

        return handle

    def as_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "rows": self.total, "by_reason": dict(self.counts), "examples": self.examples}


class BadRows:
    """Bad rows of one file: `flag` raises (policy error) or marks them (policy skip)."""

    def __init__(self, skips: SkipLog, path: str, num_rows: int, *, row_offset: int = 0) -> None:
        self.skips, self.path, self.row_offset = skips, path, row_offset
        self.bad_N = np.zeros(num_rows, dtype=bool)
        self._dropped = sorted(skips.ragged_rows.get(str(Path(path)), []))
        self._pending: list[tuple[str, str, np.ndarray, str]] = []

    def flag(
        self,
        bad_N: np.ndarray,
        *,
        column: str,
        reason: str,
        detail: Callable[[int], str],
        label: str | None = None,
    ) -> None:
        """Rows where `bad_N` holds are bad because of `column`.

        Args:
            reason: short category for the counts, e.g. "non-numeric value".
            detail: row index -> the error text after "file: row R, column 'C': ".
            label: how the column is named in the message (default: its quoted name).

        Raises:
            ValueError: under the error policy, naming the first bad row.
        """
        if not bad_N.any():
            return
        row = int(np.flatnonzero(bad_N)[0])
        message = f"{self.path}: row {self.file_row(row)}, column {label or repr(column)}: {detail(row)}"
        if not self.skips.skip:
            raise ValueError(message)
        self._pending.append((column, reason, bad_N & ~self.bad_N, message))
        self.bad_N |= bad_N

    def file_row(self, index: int) -> int:
        """Row number in the file (from 1, header excluded) of table row `index`, counting
        the lines the reader already dropped."""
        row = self.row_offset + index + 1
        for dropped in self._dropped:
            if dropped <= row:
                row += 1
        return row

    def file_rows(self, indices_N: np.ndarray) -> np.ndarray:
        """`file_row` of many table rows at once: `[N]` int64 row numbers in the file."""
        rows_N = self.row_offset + np.asarray(indices_N, dtype=np.int64) + 1
        for dropped in self._dropped:  # ascending, as `file_row` walks them
            rows_N = rows_N + (rows_N >= dropped)
        return rows_N

    def keep(self) -> np.ndarray:
        """`[N]` rows to keep; records the skipped ones (each row once, under its first reason)."""
        for column, reason, new_N, message in self._pending:
            if new_N.any():
                self.skips.add(self.path, column, reason, int(new_N.sum()), message)
        self._pending.clear()
        return ~self.bad_N


def describe_ragged(path: str | Path, row: Any, *, header: bool) -> str:
    """Message for a pyarrow `InvalidRow` (its `number` is the file line, from 1)."""
    # multithreaded reads do not know the line; the skip policy reads single-threaded
    where = "a line" if row.number is None else f"row {row.number - 1 if header else row.number}"
    return f"{path}: {where}: {row.actual_columns} fields, expected {row.expected_columns}: {row.text!r}"


def first_ragged_line(read: Callable[[Callable[[Any], str]], Any], path: str | Path, *, header: bool) -> str | None:
    """Re-read a file that failed to parse with `read(handler)` (single-threaded, so line
    numbers are known) and describe its first line with a wrong field count."""
    found: list[Any] = []

    def handle(row: Any) -> str:
        found.append(row)
        return "skip"

    try:
        read(handle)
    except Exception:  # another problem: the caller reports the original error
        return None
    return describe_ragged(path, found[0], header=header) if found else None
