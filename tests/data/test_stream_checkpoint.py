"""Per-rank streaming loader state through a real checkpoint on 2 gloo ranks
(`trainer.checkpoint` gathers every rank's state): each rank resumes exactly its own
stream at the same world size; 1 rank resumes the documented next epoch."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from torch import nn
from torchrec.optim.keyed import KeyedOptimizerWrapper

from data.build import build_train_loader
from data.loaders.stream import StreamLoader
from tests._dist import run_ranks
from tests.data._stream_files import dataset, write_layout
from trainer import checkpoint
from trainer.checkpoint import TrainState

CONSUMED, AFTER = 9, 5


def _state(data_root: str, rank: int, world: int) -> TrainState:
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    named = dict(model.named_parameters())
    network = KeyedOptimizerWrapper(named, lambda ps: torch.optim.SGD(list(ps), lr=0.1))
    sparse = KeyedOptimizerWrapper({"bias": named["bias"]}, lambda ps: torch.optim.SGD(list(ps), lr=0.0))
    scheduler = torch.optim.lr_scheduler.LambdaLR(network, lambda s: 1.0)
    loader = build_train_loader(dataset(Path(data_root)), batch_size=64, rank=rank, world_size=world, seed=4)
    return TrainState(
        model=model, sparse_optim=sparse, network_optim=network, table_optim=None, scheduler=scheduler, loader=loader
    )


def _rids(loader: StreamLoader, n: int) -> list[int]:
    it = iter(loader)
    out = [r for b in itertools.islice(it, n) for r in b.user_id.tolist()]
    it.close()
    return out


def save_worker(rank: int, world: int, data_root: str, ckpt_root: str) -> list[int]:
    state = _state(data_root, rank, world)
    _rids(state.loader, CONSUMED)
    state.step = CONSUMED
    checkpoint.save(state, Path(ckpt_root), keep_last=1)
    return _rids(state.loader, AFTER)  # the uninterrupted continuation


def load_worker(rank: int, world: int, data_root: str, ckpt_root: str) -> tuple[list[int], int]:
    state = _state(data_root, rank, world)
    checkpoint.load(state, checkpoint.step_dir(Path(ckpt_root), CONSUMED))
    return _rids(state.loader, AFTER), state.loader.epoch


@pytest.mark.slow
def test_each_rank_resumes_its_own_stream(tmp_path: Path) -> None:
    write_layout(tmp_path / "data")
    data, ckpt = str(tmp_path / "data"), str(tmp_path / "ckpt")
    straight = run_ranks(save_worker, 2, data, ckpt)
    assert straight[0] != straight[1]
    resumed = run_ranks(load_worker, 2, data, ckpt)
    assert [rids for rids, _ in resumed] == straight
    # another world size: the documented policy, the epoch after the old ranks' newest
    [(rids, epoch)] = run_ranks(load_worker, 1, data, ckpt)
    assert epoch == 1 and len(rids) == AFTER * 64
