"""Streaming Parquet loader: every row once per epoch over ranks, endless balanced
streams, bounded memory, exact resume at the same world size, the next-epoch policy at
another, and the trainer-facing factory."""

from __future__ import annotations

import itertools
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from data.build import build_train_loader
from data.columns import Dataset
from data.loaders.in_memory import TrainLoader
from data.loaders.stream import StreamLoader
from data.sources.parquet_stream import StreamTrain
from tests.data._stream_files import ROW_GROUP, TRAIN_FILE_ROWS, dataset, write_layout

NUM_ROWS = sum(TRAIN_FILE_ROWS)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("stream")
    write_layout(path)
    return path


@pytest.fixture(scope="module")
def ds(root: Path) -> Dataset:
    return dataset(root)


def _loader(ds: Dataset, *, rank: int = 0, world: int = 1, batch: int = 64, prefetch: int = 0) -> StreamLoader:
    loader = build_train_loader(ds, batch_size=batch, rank=rank, world_size=world, seed=5, prefetch=prefetch)
    assert isinstance(loader, StreamLoader)
    return loader


def _take(loader: StreamLoader, n: int) -> list:
    it = iter(loader)
    out = list(itertools.islice(it, n))
    it.close()
    return out


def _rids(batches: list) -> list[int]:
    return [r for b in batches for r in b.user_id.tolist()]


def _same(x: object, y: object) -> None:
    torch.testing.assert_close(x.dense, y.dense, rtol=0, atol=0)  # type: ignore[attr-defined]
    torch.testing.assert_close(x.sparse.values(), y.sparse.values())  # type: ignore[attr-defined]
    torch.testing.assert_close(x.sparse.lengths(), y.sparse.lengths())  # type: ignore[attr-defined]
    for t in x.labels:  # type: ignore[attr-defined]
        torch.testing.assert_close(x.labels[t], y.labels[t])  # type: ignore[attr-defined]
    torch.testing.assert_close(x.user_id, y.user_id)  # type: ignore[attr-defined]


def test_train_is_streamed_with_a_row_count(ds: Dataset) -> None:
    assert isinstance(ds.train, StreamTrain)
    assert len(ds.train) == NUM_ROWS
    assert len(ds.val) == len(ds.test) == 300  # in memory
    with pytest.raises(TypeError, match="build_train_loader"):
        TrainLoader(ds.train, spec=ds.spec, batch_size=8)  # type: ignore[arg-type]
    loader = _loader(ds)
    assert loader.num_rows == NUM_ROWS and loader.skipped_rows == 0 and loader.skipped_by_reason == {}


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_row_once_per_epoch_over_all_ranks(ds: Dataset, world: int) -> None:
    batch = 64
    loaders = [_loader(ds, rank=r, world=world, batch=batch) for r in range(world)]
    epochs: list[list[list[int]]] = [[], []]
    for loader in loaders:
        n0, n1 = loader.rows_in_epoch(0), loader.rows_in_epoch(1)
        rids = _rids(_take(loader, (n0 + n1) // batch + 1))
        epochs[0].append(rids[:n0])
        epochs[1].append(rids[n0 : n0 + n1])
    for per_rank in epochs:
        seen = sorted(r for rank_rows in per_rank for r in rank_rows)
        assert seen == list(range(NUM_ROWS)), "every row exactly once per epoch over the ranks"
    assert epochs[0][0] != sorted(epochs[0][0]), "rows are shuffled"
    assert epochs[0][0][:50] != epochs[1][0][:50], "a new order every epoch"
    # round-robin over units: ranks' epochs differ by at most about one row group
    sizes = [loader.rows_in_epoch(0) for loader in loaders]
    assert max(sizes) - min(sizes) <= 2 * ROW_GROUP


def test_streams_are_endless_and_equal_in_length(ds: Dataset) -> None:
    """More batches than an epoch holds, on ranks whose row counts differ: every rank
    still yields a full batch at every step (sharded embeddings need that)."""
    loaders = [_loader(ds, rank=r, world=3, batch=100) for r in range(3)]
    assert len({lo.rows_in_epoch(0) for lo in loaders}) > 1
    for loader in loaders:
        batches = _take(loader, 2 * NUM_ROWS // 3 // 100 + 5)
        assert all(b.batch_size == 100 for b in batches)
        assert loader.epoch >= 2


def test_no_shuffle_reads_in_file_order(root: Path) -> None:
    loader = _loader(dataset(root, shuffle=False), batch=50)
    assert _rids(_take(loader, 8)) == list(range(400))


@pytest.mark.parametrize("prefetch", [0, 3])
def test_memory_is_bounded_by_buffer_plus_one_row_group(ds: Dataset, prefetch: int) -> None:
    loader = _loader(ds, world=1, batch=64, prefetch=prefetch)
    _take(loader, 2 * NUM_ROWS // 64)  # two epochs
    buffer = 300
    assert loader.held_limit == buffer - 1 + ROW_GROUP
    assert buffer <= loader.peak_held_rows <= buffer + ROW_GROUP
    assert loader.peak_held_rows < min(TRAIN_FILE_ROWS), "never a whole file"


@pytest.mark.parametrize("prefetch", [0, 2])
@pytest.mark.parametrize("consumed", [1, 7, 40])  # 40 x 64 x 2 ranks crosses an epoch
def test_resume_continues_with_the_next_unseen_rows(ds: Dataset, consumed: int, prefetch: int) -> None:
    for rank in range(2):
        straight = _take(_loader(ds, rank=rank, world=2), consumed + 6)
        loader = _loader(ds, rank=rank, world=2, prefetch=prefetch)
        _take(loader, consumed)
        state = pickle.loads(pickle.dumps(loader.state_dict()))
        assert len(pickle.dumps(state)) < 1000, "the state is a few numbers"
        fresh = _loader(ds, rank=rank, world=2, prefetch=prefetch)
        fresh.load_state_dict(state)
        for got, want in zip(_take(fresh, 6), straight[consumed:], strict=True):
            _same(got, want)


def test_resume_rejects_other_settings(ds: Dataset) -> None:
    loader = _loader(ds, rank=0, world=2)
    _take(loader, 3)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        _loader(ds, rank=0, world=2, batch=32).load_state_dict(state)
    with pytest.raises(ValueError, match="load_resharded"):
        _loader(ds, rank=0, world=3).load_state_dict(state)


def test_another_world_size_starts_the_next_epoch(ds: Dataset, caplog: pytest.LogCaptureFixture) -> None:
    old = [_loader(ds, rank=r, world=2) for r in range(2)]
    _take(old[0], old[0].rows_in_epoch(0) // 64 + 3)  # rank 0 into epoch 1
    _take(old[1], old[1].rows_in_epoch(0) // 64 - 2)  # rank 1 still in epoch 0
    states = [lo.state_dict() for lo in old]
    assert [s["epoch"] for s in states] == [1, 0]
    new = [_loader(ds, rank=r, world=3) for r in range(3)]
    with caplog.at_level(logging.WARNING):
        for loader in new:
            loader.load_resharded(states)
    assert "starting epoch 2" in caplog.text
    seen = []
    for loader in new:
        n = loader.rows_in_epoch(2)
        seen += _rids(_take(loader, n // 64 + 1))[:n]
        assert loader.rows_in_epoch(2) == n
    assert sorted(seen) == list(range(NUM_ROWS)), "epoch 2 dealt over the 3 new ranks, each row once"


def test_fewer_row_groups_than_ranks_is_an_error(ds: Dataset) -> None:
    units = len(ds.train.units)  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="fewer than the"):
        _loader(ds, world=units + 1)


def test_factory_keeps_the_in_memory_loader() -> None:
    from data.build import build_dataset
    from data.sources.synthetic import SyntheticConfig

    mem = build_dataset(SyntheticConfig(num_train=400, num_val=50, num_test=50))
    loader = build_train_loader(mem, batch_size=16, rank=1, world_size=2, seed=3, prefetch=0)
    assert isinstance(loader, TrainLoader) and loader.num_rows == len(mem.train)
    want = TrainLoader(mem.train, spec=mem.spec, batch_size=16, rank=1, world_size=2, seed=3, prefetch=0)  # type: ignore[arg-type]
    got_b, want_b = next(iter(loader)), next(iter(want))
    torch.testing.assert_close(got_b.dense, want_b.dense)
    loader.load_resharded([{"epoch": 0, "index": 3, "global_batch": 32}] * 3)  # global position: any world size
    assert loader.state_dict()["index"] == 3


def test_batches_are_consistent_with_the_spec(ds: Dataset) -> None:
    batch = _take(_loader(ds, batch=128), 1)[0]
    assert batch.sparse.keys() == list(ds.spec.sparse_names)
    for f in ds.spec.sparse:
        ids = batch.sparse[f.name].values()
        assert int(ids.min()) >= 0 and int(ids.max()) < f.num_embeddings
    assert batch.dense.dtype == torch.float32 and batch.dense.shape == (128, 1)
    assert set(batch.labels) == {"y", "good"}
    assert np.isin(batch.labels["good"].numpy(), [0.0, 1.0]).all()
