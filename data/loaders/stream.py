"""Batches of a streamed Parquet train split (`data.sources.parquet_stream.StreamTrain`), sharded by rank.

Order, per rank r of W, epoch e (every rank counts its own epochs):

1. The train units, (file, row group) pairs in global order (files sorted by path, row
   groups in file order, empty ones dropped), are permuted by `rng([seed, e])` (identity
   with `data.shuffle=false`) and dealt round-robin: rank r reads positions r, r + W,
   r + 2W, ... of that list. Over all ranks every unit, hence every row, is read exactly
   once per epoch.
2. A rank groups its units into windows: consecutive units taken while the rows held
   (the window plus the rows carried into the batch being assembled) stay under
   `shuffle_buffer`, at least one unit each. A window's rows are permuted by
   `rng([seed, e, r, lo])` (lo: its first unit) and emitted in that order.
3. Batches are consecutive chunks of `batch_size` rows of this endless row stream; a
   batch may span windows and epochs. No row is dropped, none repeats within an epoch.

Balance (sharded embeddings run collectives every step, so every rank must produce a
batch at every step, forever): the stream is endless on every rank, so each rank yields
exactly one batch per step whatever its row count; W ranks need at least W units
(ValueError otherwise). Rank row counts per epoch differ by at most about one row group
(round-robin dealing; exactly equal with equal-size row groups and W | U), so ranks'
epoch boundaries drift apart a little; nothing depends on them lining up.

Memory: at most `max(shuffle_buffer, batch_size) - 1 + largest row group` rows read and
held (window + carried rows; `held_rows`, `peak_held_rows`, `held_limit`), plus the
`prefetch` finished batches in the queue. Never a file, never the data set.

Resume (`state_dict` / `load_state_dict`, per rank, a few ints): the position is the
current window (epoch, units [lo, hi) of this rank's epoch list) and the rows of its
permutation already yielded. Loading it re-reads that window (the same units, the same
permutation), skips those rows and continues: exactly the next unseen rows of the
uninterrupted run. It needs the same world size, rank, batch size, shuffle settings,
seed and train row groups (ValueError naming what differs).

Another world size (`load_resharded(states)`, all old ranks' states): the dealing of
the interrupted epoch cannot be mapped onto the new ranks, so every rank starts epoch
`max(old epochs) + 1` from its beginning, with a warning; the rows the old ranks had not
yet reached in their current epoch are not seen in that epoch (nothing is seen twice).

Bad rows (`data.on_bad_row`): error raises in the consumer, naming file, row group, row
and column; skip drops and counts them in the first epoch only (each bad row once;
later epochs skip the same rows silently). `skipped_rows` / `skipped_by_reason` are this
rank's counts at the consumer's position; the state carries them over a resume.

Legend: B local batch, U units, W world size.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from data.batch import Batch
from data.columns import Split, concat_splits
from data.loaders.in_memory import check_pin_memory, make_batch, prefetched
from data.parsing.bad_rows import SkipLog
from data.spec import DatasetSpec

if TYPE_CHECKING:
    from data.sources.parquet_stream import StreamTrain

log = logging.getLogger("data")
KIND = "parquet_stream"


@dataclass(frozen=True)
class _Position:
    """Where the consumer is: window [lo, hi) of epoch's units (hi == lo: none read yet,
    the next starts at lo), `offset` rows of it yielded; skip counts before / after it."""

    epoch: int = 0
    lo: int = 0
    hi: int = 0
    offset: int = 0
    skipped_before: dict[str, int] = field(default_factory=dict)
    skipped_after: dict[str, int] = field(default_factory=dict)


class StreamLoader:
    """Endless, resumable iterator of this rank's batches of a streamed train split.

    Args:
        train: the streamed split (`Dataset.train` of `data=parquet_stream`).
        spec: dataset schema (fixes the KJT key order).
        batch_size: local (per-rank) batch size.
        rank, world_size: this rank among the data-parallel ranks.
        seed: seed of the unit dealing and the window permutations.
        prefetch: batches built ahead in a background thread (0 = synchronous).
        pin_memory: pin each batch in host memory as it is built (needs CUDA).
    """

    def __init__(
        self,
        train: StreamTrain,
        *,
        spec: DatasetSpec,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        prefetch: int = 4,
        pin_memory: bool = False,
    ) -> None:
        check_pin_memory(pin_memory)
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        if len(train.units) < world_size:
            raise ValueError(
                f"data.train has {len(train.units)} row groups, fewer than the {world_size} ranks (each rank reads "
                "whole row groups): write smaller row groups or more files"
            )
        self.train, self.spec, self.units = train, spec, train.units
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.prefetch, self.pin_memory = prefetch, pin_memory
        self.num_rows = train.units.num_rows
        self.held_limit = max(train.shuffle_buffer, batch_size) - 1 + int(train.units.rows_U.max())
        self.held_rows = self.peak_held_rows = 0  # rows read and held (window + carried)
        self.build_s, self.built_rows = 0.0, 0
        self._position = _Position()

    # ------------------------------------------------------------------ accounting

    @property
    def epoch(self) -> int:
        return self._position.epoch

    @property
    def skipped_rows(self) -> int:
        return sum(self._position.skipped_after.values())

    @property
    def skipped_by_reason(self) -> dict[str, int]:
        return dict(self._position.skipped_after)

    def rank_units(self, epoch: int) -> np.ndarray:
        """This rank's units of `epoch`, in reading order."""
        n = len(self.units)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.train.shuffle else np.arange(n)
        return order[self.rank :: self.world_size]

    def rows_in_epoch(self, epoch: int) -> int:
        """Rows this rank reads in `epoch` (footer counts, bad rows included)."""
        return int(self.units.rows_U[self.rank_units(epoch)].sum())

    # ----------------------------------------------------------------------- state

    def _settings(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size,
            "rank": self.rank,
            "batch_size": self.batch_size,
            "shuffle": self.train.shuffle,
            "shuffle_buffer": self.train.shuffle_buffer,
            "seed": self.seed,
            "units": self.units.fingerprint(),
        }

    def state_dict(self) -> dict[str, Any]:
        p = self._position
        position = {"epoch": p.epoch, "lo": p.lo, "hi": p.hi, "offset": p.offset, "skipped": dict(p.skipped_before)}
        return {"kind": KIND, **position, **self._settings()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != KIND:
            raise ValueError(f"not a {KIND} loader state: {sorted(state)}")
        differ = {k: (state.get(k), v) for k, v in self._settings().items() if state.get(k) != v}
        if differ:
            raise ValueError(
                f"the loader state was written under other settings (saved, now): {differ}; an exact resume needs "
                "the same world size, batch size, data.shuffle / data.shuffle_buffer, seed and train files "
                "(another world size: load_resharded)"
            )
        skipped = {str(k): int(v) for k, v in state["skipped"].items()}
        self._position = _Position(
            int(state["epoch"]), int(state["lo"]), int(state["hi"]), int(state["offset"]), skipped, skipped
        )

    def load_resharded(self, states: list[dict[str, Any]]) -> None:
        """Resume from a run of another world size: start epoch max(old epochs) + 1 (module doc)."""
        if not states or any(s.get("kind") != KIND for s in states):
            raise ValueError(f"not {KIND} loader states")
        epoch = max(int(s["epoch"]) for s in states) + 1
        skipped: dict[str, int] = {}
        if self.rank == 0:  # the old ranks' counts, once, so their sum over ranks is kept
            for s in states:
                for k, v in s["skipped"].items():
                    skipped[k] = skipped.get(k, 0) + int(v)
        log.warning(
            "data: resuming a %d-rank loader state on %d ranks: starting epoch %d from its beginning; rows the old "
            "ranks had not reached in their current epoch (%s) are not seen in that epoch",
            len(states), self.world_size, epoch, sorted({int(s["epoch"]) for s in states}),
        )  # fmt: skip
        self._position = _Position(epoch, 0, 0, 0, skipped, skipped)

    # ------------------------------------------------------------------- iteration

    def __iter__(self) -> Iterator[Batch]:
        items = self._stream(self._position)
        for batch, position in items if self.prefetch <= 0 else prefetched(items, self.prefetch, "stream-prefetch"):
            self._position = position
            yield batch

    def _window_end(self, mine: np.ndarray, lo: int, carried: int) -> int:
        hi, rows = lo, carried
        while hi < len(mine) and (hi == lo or rows < self.train.shuffle_buffer):
            rows += int(self.units.rows_U[mine[hi]])
            hi += 1
        return hi

    def _window(self, epoch: int, mine: np.ndarray, lo: int, hi: int, skips: SkipLog, files: Any) -> Split:
        read = self.train.reader.read
        return concat_splits([read(self.units, int(u), skips, files) for u in mine[lo:hi]])

    def _permutation(self, epoch: int, lo: int, n: int) -> np.ndarray:
        if not self.train.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch, self.rank, lo]).permutation(n)

    def _stream(self, start: _Position) -> Iterator[tuple[Batch, _Position]]:
        """(batch, position after it) from `start` on; runs in the prefetch thread if any."""
        from data.sources.parquet_stream import FileCache

        files = FileCache()
        first = SkipLog(self.train.on_bad_row)  # first epoch: counted
        first.counts.update(start.skipped_before)
        later = SkipLog(self.train.on_bad_row, examples=first.examples, _seen=first._seen)  # not counted
        epoch, lo, hi, offset = start.epoch, start.lo, start.hi, start.offset
        mine = self.rank_units(epoch)
        before = dict(start.skipped_before)
        window: Split | None = None
        perm = np.zeros(0, dtype=np.int64)
        if hi > lo:  # resume inside a window: read it again, skip what was yielded
            window = self._window(epoch, mine, lo, hi, first if epoch == 0 else later, files)
            perm = self._permutation(epoch, lo, len(window))
            self._hold(int(self.units.rows_U[mine[lo:hi]].sum()))
        rows_this_epoch = (1 if lo > 0 else 0) + (len(window) if window is not None else 0)  # empty-epoch guard
        while True:
            t0 = time.perf_counter()
            parts: list[Split] = []
            carried = 0
            batch: Batch | None = None
            while carried < self.batch_size:
                if window is None or offset == len(window):
                    window = None  # release it before reading the next
                    lo = hi
                    if lo >= len(mine):
                        if rows_this_epoch == 0:
                            raise ValueError(f"rank {self.rank}: no usable train row in epoch {epoch}")
                        epoch, lo, rows_this_epoch = epoch + 1, 0, 0
                        mine = self.rank_units(epoch)
                    hi = self._window_end(mine, lo, carried)
                    before = dict(first.counts)
                    window = self._window(epoch, mine, lo, hi, first if epoch == 0 else later, files)
                    perm, offset = self._permutation(epoch, lo, len(window)), 0
                    rows_this_epoch += len(window)
                    self._hold(carried + int(self.units.rows_U[mine[lo:hi]].sum()))
                    continue
                take = min(self.batch_size - carried, len(window) - offset)
                rows = perm[offset : offset + take]
                offset += take
                if take == self.batch_size:  # the common case: one gather, no copy
                    batch = make_batch(window, rows, self.spec)
                else:
                    parts.append(window.take(rows))
                carried += take
            if batch is None:
                batch = make_batch(concat_splits(parts), np.arange(self.batch_size), self.spec)
            if self.pin_memory:
                batch = batch.pin_memory()
            self.build_s += time.perf_counter() - t0
            self.built_rows += self.batch_size
            after = dict(first.counts)
            assert window is not None
            if offset == len(window):  # window done: resume reads none of it again
                yield batch, _Position(epoch, hi, hi, 0, after, after)
            else:
                yield batch, _Position(epoch, lo, hi, offset, before, after)

    def _hold(self, rows: int) -> None:
        self.held_rows = rows
        self.peak_held_rows = max(self.peak_held_rows, rows)
        assert rows <= self.held_limit, (rows, self.held_limit)
