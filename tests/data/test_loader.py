"""TrainLoader / eval_batches: sharding invariance, epochs, resume, prefetch, eval coverage."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data.batch import Batch
from data.columns import SparseColumn, Split
from data.loaders.in_memory import TrainLoader, eval_batches
from data.spec import DatasetSpec, SparseFeature

NUM_ROWS = 50


def _split(num_rows: int = NUM_ROWS) -> tuple[Split, DatasetSpec]:
    """Rows whose every column encodes the row index, so batches can be traced to rows."""
    rows = np.arange(num_rows)
    lengths = rows % 3  # multi-hot bags of 0, 1, 2 ids
    spec = DatasetSpec(
        name="toy",
        sparse=(
            SparseFeature(name="item", num_embeddings=num_rows + 1),
            SparseFeature(name="tags", num_embeddings=1000, multi_hot=True),
        ),
        dense_names=("row", "twice"),
        tasks=("a", "b"),
        has_user_id=True,
    )
    split = Split(
        dense=np.stack([rows, 2 * rows], axis=1).astype(np.float32),
        sparse={
            "item": SparseColumn.single_hot(rows + 1),
            "tags": SparseColumn.from_lists(
                [[10 * r + j for j in range(n)] for r, n in zip(rows, lengths, strict=True)]
            ),
        },
        labels={"a": (rows % 2).astype(np.float32), "b": (rows % 5 == 0).astype(np.float32)},
        user_id=rows // 4,
    )
    return split, spec


def _rows(batch: Batch) -> list[int]:
    return batch.dense[:, 0].long().tolist()


def _assert_same(x: Batch, y: Batch) -> None:
    torch.testing.assert_close(x.dense, y.dense)
    assert x.sparse.keys() == y.sparse.keys()
    torch.testing.assert_close(x.sparse.values(), y.sparse.values())
    torch.testing.assert_close(x.sparse.lengths(), y.sparse.lengths())
    for t in x.labels:
        torch.testing.assert_close(x.labels[t], y.labels[t])
    torch.testing.assert_close(x.weights, y.weights)
    assert x.user_id is not None and y.user_id is not None
    torch.testing.assert_close(x.user_id, y.user_id)


def _concat(parts: list[Batch]) -> Batch:
    """Concatenate rank batches (per-key KJT concat, like an all-gather would)."""
    keys = parts[0].sparse.keys()
    values, lengths = [], []
    for key in keys:
        for p in parts:
            jt = p.sparse[key]
            values.append(jt.values())
            lengths.append(jt.lengths())
    return Batch(
        dense=torch.cat([p.dense for p in parts]),
        sparse=KeyedJaggedTensor(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths)),
        labels={t: torch.cat([p.labels[t] for p in parts]) for t in parts[0].labels},
        weights=torch.cat([p.weights for p in parts]),
        user_id=torch.cat([p.user_id for p in parts]),  # type: ignore[misc]
    )


def _take(loader: TrainLoader, n: int) -> list[Batch]:
    return list(itertools.islice(iter(loader), n))


def test_batch_contents_follow_rows() -> None:
    split, spec = _split()
    batch = _take(TrainLoader(split, spec=spec, batch_size=8, seed=3, prefetch=0), 1)[0]
    rows = _rows(batch)
    assert batch.sparse["item"].values().tolist() == [r + 1 for r in rows]
    assert batch.sparse["tags"].lengths().tolist() == [r % 3 for r in rows]
    assert batch.sparse["tags"].values().tolist() == [10 * r + j for r in rows for j in range(r % 3)]
    assert batch.labels["a"].tolist() == [float(r % 2) for r in rows]
    assert batch.user_id.tolist() == [r // 4 for r in rows]  # type: ignore[union-attr]
    assert batch.weights.tolist() == [1.0] * 8


@pytest.mark.parametrize("prefetch", [0, 2])
def test_global_batch_same_for_world_1_and_2(prefetch: int) -> None:
    split, spec = _split()
    steps = 9  # crosses the epoch boundary (6 global batches of 8 per epoch)
    single = _take(TrainLoader(split, spec=spec, batch_size=8, seed=1, prefetch=prefetch), steps)
    ranks = [
        _take(
            TrainLoader(split, spec=spec, batch_size=4, rank=r, world_size=2, seed=1, prefetch=prefetch),
            steps,
        )
        for r in range(2)
    ]
    for step in range(steps):
        assert _rows(ranks[0][step]) != _rows(ranks[1][step])
        _assert_same(_concat([ranks[0][step], ranks[1][step]]), single[step])


def test_epoch_wrap_and_reshuffle() -> None:
    split, spec = _split()
    loader = TrainLoader(split, spec=spec, batch_size=8, seed=0, prefetch=0)
    assert loader.batches_per_epoch == NUM_ROWS // 8
    batches = _take(loader, 2 * loader.batches_per_epoch + 1)
    epochs = [sum((_rows(b) for b in batches[e * 6 : (e + 1) * 6]), []) for e in range(2)]
    for rows in epochs:
        assert len(set(rows)) == len(rows) == 48  # no row twice; the 2 leftover rows dropped
    assert epochs[0] != epochs[1]  # a new permutation every epoch
    assert loader.state_dict() == {"epoch": 2, "index": 1, "global_batch": 8}


def test_no_shuffle_is_sequential() -> None:
    split, spec = _split()
    batches = _take(TrainLoader(split, spec=spec, batch_size=4, rank=1, world_size=2, shuffle=False, prefetch=0), 2)
    assert [_rows(b) for b in batches] == [[4, 5, 6, 7], [12, 13, 14, 15]]


@pytest.mark.parametrize("prefetch", [0, 3])
@pytest.mark.parametrize("consumed", [1, 5, 6, 8])
def test_resume_continues_with_next_batch(prefetch: int, consumed: int) -> None:
    split, spec = _split()
    reference = _take(TrainLoader(split, spec=spec, batch_size=8, seed=7, prefetch=0), consumed + 3)
    loader = TrainLoader(split, spec=spec, batch_size=8, seed=7, prefetch=prefetch)
    it = iter(loader)
    for _ in range(consumed):
        next(it)
    state = loader.state_dict()  # the prefetch thread may be ahead; the state must not be
    it.close()
    resumed = TrainLoader(split, spec=spec, batch_size=8, seed=7, prefetch=prefetch)
    resumed.load_state_dict(state)
    for got, want in zip(_take(resumed, 3), reference[consumed:], strict=True):
        _assert_same(got, want)


def test_resume_with_other_world_size_same_global_batch() -> None:
    split, spec = _split()
    single = TrainLoader(split, spec=spec, batch_size=8, seed=2, prefetch=0)
    reference = _take(single, 4)
    state = TrainLoader(split, spec=spec, batch_size=8, seed=2, prefetch=0)
    _take(state, 2)
    parts = []
    for r in range(2):
        loader = TrainLoader(split, spec=spec, batch_size=4, rank=r, world_size=2, seed=2, prefetch=0)
        loader.load_state_dict(state.state_dict())
        parts.append(_take(loader, 1)[0])
    _assert_same(_concat(parts), reference[2])


def test_resume_rejects_other_global_batch() -> None:
    split, spec = _split()
    loader = TrainLoader(split, spec=spec, batch_size=8, prefetch=0)
    with pytest.raises(ValueError, match="global batch"):
        loader.load_state_dict({"epoch": 0, "index": 1, "global_batch": 16})


def test_prefetch_gives_same_batches() -> None:
    split, spec = _split()
    sync = _take(TrainLoader(split, spec=spec, batch_size=4, rank=1, world_size=2, seed=5, prefetch=0), 20)
    ahead = _take(TrainLoader(split, spec=spec, batch_size=4, rank=1, world_size=2, seed=5, prefetch=4), 20)
    for x, y in zip(sync, ahead, strict=True):
        _assert_same(x, y)


def test_split_smaller_than_global_batch_is_an_error() -> None:
    split, spec = _split(num_rows=10)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        TrainLoader(split, spec=spec, batch_size=8, world_size=2)


@pytest.mark.parametrize(("num_rows", "world_size", "batch_size"), [(23, 1, 4), (23, 2, 4), (23, 3, 5), (3, 4, 2)])
def test_eval_covers_every_row_once(num_rows: int, world_size: int, batch_size: int) -> None:
    split, spec = _split(num_rows)
    per_rank = [
        list(eval_batches(split, spec=spec, batch_size=batch_size, rank=r, world_size=world_size))
        for r in range(world_size)
    ]
    assert len({len(b) for b in per_rank}) == 1, "every rank must run the same number of batches"
    seen = []
    for batches in per_rank:
        for batch in batches:
            assert batch.batch_size == batch_size
            w = batch.weights
            assert set(w.tolist()) <= {0.0, 1.0}
            valid = w.bool()
            # padding sits at the end of a batch and is weight 0
            assert valid.tolist() == sorted(valid.tolist(), reverse=True)
            seen += batch.dense[valid, 0].long().tolist()
            assert batch.sparse["item"].values()[valid].tolist() == [r + 1 for r in batch.dense[valid, 0].long()]
    assert sorted(seen) == list(range(num_rows))


@pytest.mark.parametrize("prefetch", [0, 3])
def test_rows_follow_the_seeded_epoch_permutation(prefetch: int) -> None:
    """Batch b of epoch e on rank r holds `permutation(N)[b*G + r*B:][:B]` of rng([seed, e])."""
    split, spec = _split()
    loader = TrainLoader(split, spec=spec, batch_size=4, rank=1, world_size=2, seed=11, prefetch=prefetch)
    batches = _take(loader, 2 * loader.batches_per_epoch + 2)
    for i, batch in enumerate(batches):
        epoch, index = divmod(i, loader.batches_per_epoch)
        perm = np.random.default_rng([11, epoch]).permutation(NUM_ROWS)
        assert _rows(batch) == perm[index * 8 + 4 : index * 8 + 8].tolist()


@pytest.mark.parametrize("prefetch", [0, 3])
def test_permutation_computed_once_per_epoch(prefetch: int) -> None:
    split, spec = _split()
    loader = TrainLoader(split, spec=spec, batch_size=4, seed=1, prefetch=prefetch)
    calls: list[int] = []
    compute = loader._epoch_permutation

    def counting(epoch: int) -> np.ndarray:
        calls.append(epoch)
        return compute(epoch)

    loader._epoch_permutation = counting  # type: ignore[method-assign]
    it = iter(loader)
    for _ in range(2 * loader.batches_per_epoch + 1):  # into the third epoch
        next(it)
    it.close()
    assert calls == [0, 1, 2]


def test_pin_memory_needs_cuda() -> None:
    split, spec = _split()
    if torch.cuda.is_available():
        batch = _take(TrainLoader(split, spec=spec, batch_size=4, pin_memory=True, prefetch=2), 1)[0]
        assert batch.dense.is_pinned() and batch.sparse.values().is_pinned() and batch.labels["a"].is_pinned()
    else:
        with pytest.raises(ValueError, match="pin_memory=True needs CUDA"):
            TrainLoader(split, spec=spec, batch_size=4, pin_memory=True)


def test_streaming_train_is_refused() -> None:
    _, spec = _split()
    with pytest.raises(TypeError, match="build_train_loader"):
        TrainLoader(object(), spec=spec, batch_size=4)  # type: ignore[arg-type]
