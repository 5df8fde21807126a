"""Batching a columnar `Split` into `Batch`es, sharded by rank.

Training order is a seeded global permutation per epoch; global batch i holds rows
`perm[i*G:(i+1)*G]` (G = local batch x world size) and rank r takes its slice
`[r*b:(r+1)*b]`. The concatenation of all ranks' batches is therefore the same global
batch whatever the world size, which is what the parity tests and checkpoint resharding
rely on. Incomplete global batches at the end of an epoch are dropped.

The epoch's permutation is computed once per epoch and cached (under a lock: the
prefetch thread builds while the consumer may start a new iterator); each batch then
costs O(B). With `pin_memory=True` batches are pinned in host memory where they are
built (the prefetch thread, when on), so the trainer can copy them to the GPU with
`non_blocking=True`; that needs CUDA.

Evaluation covers every row exactly once: rank r takes a contiguous chunk of
`ceil(N / world)` rows; every rank runs the same number of batches (sharded embeddings
run collectives), so the last ones are padded with weight-0 rows that metrics ignore.

Legend: B local batch, G global batch, N rows.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data.batch import Batch
from data.columns import Split
from data.spec import DatasetSpec

T = TypeVar("T")


def make_batch(split: Split, rows_B: np.ndarray, spec: DatasetSpec, num_valid: int | None = None) -> Batch:
    """Gather rows `rows_B` of `split` into a `Batch` (rows past `num_valid` get weight 0)."""
    lengths, values = [], []
    for name in spec.sparse_names:
        col = split.sparse[name].take(rows_B)
        lengths.append(np.diff(col.offsets))
        values.append(col.values)
    kjt = KeyedJaggedTensor(
        keys=list(spec.sparse_names),
        values=torch.from_numpy(np.concatenate(values)),
        lengths=torch.from_numpy(np.concatenate(lengths).astype(np.int32)),
    )
    weights = torch.ones(len(rows_B), dtype=torch.float32)
    if num_valid is not None:
        weights[num_valid:] = 0.0
    return Batch(
        dense=torch.from_numpy(split.dense[rows_B]),
        sparse=kjt,
        labels={t: torch.from_numpy(split.labels[t][rows_B]) for t in spec.tasks},
        weights=weights,
        user_id=None if split.user_id is None else torch.from_numpy(split.user_id[rows_B]),
        cluster_id=None if split.clusters is None else torch.from_numpy(split.clusters[rows_B]),
    )


class TrainBatches(Protocol):
    """What the trainer needs from a training loader (`TrainLoader`, `data.loaders.stream.StreamLoader`).

    Attributes:
        num_rows: train rows over all ranks (known without reading the data).
        built_rows, build_s: rows this rank built and the seconds spent building them.
        skipped_rows, skipped_by_reason: train rows this rank's loader dropped as bad
            (`data.on_bad_row=skip`); always 0 / {} for in-memory splits, whose bad rows
            are counted once in `Dataset.skipped_rows` at load time.
    """

    num_rows: int
    built_rows: int
    build_s: float

    @property
    def skipped_rows(self) -> int: ...

    @property
    def skipped_by_reason(self) -> dict[str, int]: ...

    def __iter__(self) -> Iterator[Batch]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """This rank's own state, written by a run of the same world size."""

    def load_resharded(self, states: list[dict[str, Any]]) -> None:
        """Every rank's state from a run of another world size (each loader's policy)."""


def check_pin_memory(pin_memory: bool) -> None:
    if pin_memory and not torch.cuda.is_available():
        raise ValueError("pin_memory=True needs CUDA (pinned host memory is for non_blocking copies to a GPU)")


class TrainLoader:
    """Endless, resumable iterator of this rank's training batches.

    Args:
        split: the training split.
        spec: dataset schema (fixes the KJT key order).
        batch_size: local (per-rank) batch size.
        rank: this rank; world_size: number of data-parallel ranks.
        seed: base seed for the per-epoch permutation.
        prefetch: batches built ahead in a background thread (0 = synchronous).
        pin_memory: pin each batch in host memory as it is built (needs CUDA).
    """

    def __init__(
        self,
        split: Split,
        *,
        spec: DatasetSpec,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        prefetch: int = 4,
        pin_memory: bool = False,
    ) -> None:
        if not isinstance(split, Split):
            raise TypeError(
                f"TrainLoader batches an in-memory Split, got {type(split).__name__}; build the loader with "
                "data.build.build_train_loader(dataset, ...), which picks the streaming loader for streaming sources"
            )
        check_pin_memory(pin_memory)
        self.split, self.spec = split, spec
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.shuffle, self.prefetch, self.pin_memory = seed, shuffle, prefetch, pin_memory
        self.num_rows = len(split)
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = len(split) // self.global_batch
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"train split has {len(split)} rows, fewer than one global batch "
                f"(trainer.batch_size={batch_size} x world {world_size})"
            )
        self.epoch, self.index = 0, 0  # position of the next batch to yield
        # time spent building batches and rows built (loader throughput, with or without
        # the prefetch thread); read by the trainer for `loader_samples_per_s`
        self.build_s, self.built_rows = 0.0, 0
        self.skipped_rows = 0  # bad rows were dropped (and counted) at load time
        self.skipped_by_reason: dict[str, int] = {}
        self._perm_lock = threading.Lock()
        self._perm: tuple[int, np.ndarray] | None = None  # (epoch, its permutation)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["global_batch"] != self.global_batch:
            raise ValueError(
                f"checkpoint was written with global batch {state['global_batch']}, this run "
                f"uses {self.global_batch}; resume needs the same global batch"
            )
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def load_resharded(self, states: list[dict[str, int]]) -> None:
        """The position is global (every rank holds the same one): any world size resumes it."""
        self.load_state_dict(states[0])

    def _epoch_permutation(self, epoch: int) -> np.ndarray:
        if self.shuffle:
            return np.random.default_rng([self.seed, epoch]).permutation(len(self.split))
        return np.arange(len(self.split))

    def _rows(self, epoch: int, index: int) -> np.ndarray:
        with self._perm_lock:  # one permutation per epoch, shared by the builder threads
            if self._perm is None or self._perm[0] != epoch:
                self._perm = (epoch, self._epoch_permutation(epoch))
            perm = self._perm[1]
        start = index * self.global_batch + self.rank * self.batch_size
        return perm[start : start + self.batch_size]

    def _positions(self) -> Iterator[tuple[int, int]]:
        epoch, index = self.epoch, self.index
        while True:
            yield epoch, index
            index += 1
            if index == self.batches_per_epoch:
                epoch, index = epoch + 1, 0

    def _build(self, epoch: int, index: int) -> Batch:
        start = time.perf_counter()
        batch = make_batch(self.split, self._rows(epoch, index), self.spec)
        if self.pin_memory:
            batch = batch.pin_memory()
        self.build_s += time.perf_counter() - start
        self.built_rows += batch.batch_size
        return batch

    def __iter__(self) -> Iterator[Batch]:
        positions = self._positions()
        if self.prefetch <= 0:
            for epoch, index in positions:
                batch = self._build(epoch, index)
                self._advance(epoch, index)
                yield batch
            return
        yield from self._prefetched(positions)

    def _advance(self, epoch: int, index: int) -> None:
        self.epoch, self.index = epoch, index + 1
        if self.index == self.batches_per_epoch:
            self.epoch, self.index = epoch + 1, 0

    def _prefetched(self, positions: Iterator[tuple[int, int]]) -> Iterator[Batch]:
        built = ((epoch, index, self._build(epoch, index)) for epoch, index in positions)
        for epoch, index, batch in prefetched(built, self.prefetch, "batch-prefetch"):
            self._advance(epoch, index)
            yield batch


def prefetched(items: Iterator[T], depth: int, name: str) -> Iterator[T]:
    """`items` produced by a background thread, up to `depth` ahead; its errors re-raise here.

    Closing the returned generator stops the thread after the item it is producing.
    """
    q: queue.Queue[tuple[T] | BaseException] = queue.Queue(depth)
    stop = threading.Event()

    def work() -> None:
        try:
            while not stop.is_set():  # checked before producing: nothing is built after close
                try:
                    item = next(items)
                except StopIteration:
                    return
                q.put((item,))
        except BaseException as e:  # surfaced in the consumer
            q.put(e)

    thread = threading.Thread(target=work, daemon=True, name=name)
    thread.start()
    try:
        while True:
            got = q.get()
            if isinstance(got, BaseException):
                raise got
            yield got[0]
    finally:
        stop.set()
        while not q.empty():  # unblock a producer waiting on a full queue
            q.get_nowait()


def eval_batches(
    split: Split, *, spec: DatasetSpec, batch_size: int, rank: int = 0, world_size: int = 1
) -> Iterator[Batch]:
    """This rank's evaluation batches: every row once over all ranks, padded to equal steps."""
    n = len(split)
    per_rank = math.ceil(n / world_size)
    lo, hi = min(rank * per_rank, n), min((rank + 1) * per_rank, n)
    num_batches = max(1, math.ceil(per_rank / batch_size))
    for i in range(num_batches):
        rows = np.arange(lo + i * batch_size, min(lo + (i + 1) * batch_size, hi))
        num_valid = len(rows)
        pad = np.zeros(batch_size - num_valid, dtype=np.int64)  # row 0, weight 0
        yield make_batch(split, np.concatenate([rows, pad]), spec, num_valid=num_valid)
