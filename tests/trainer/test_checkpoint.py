"""Checkpoint guards in one process: no checkpoint from non-finite weights, partial
checkpoints ignored, keep-last, an explicit resume path must be complete."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn
from torchrec.optim.keyed import KeyedOptimizerWrapper

from trainer import checkpoint
from trainer.checkpoint import MARKER, TrainState


class _Loader:
    def __init__(self) -> None:
        self.position = 0

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def _state() -> TrainState:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1))
    named = dict(model.named_parameters())
    network = KeyedOptimizerWrapper(named, lambda ps: torch.optim.Adam(list(ps), lr=0.1))
    # stands in for TorchRec's fused optimizer (a KeyedOptimizer over the tables)
    sparse = KeyedOptimizerWrapper({"0.weight": named["0.weight"]}, lambda ps: torch.optim.SGD(list(ps), lr=0.0))
    scheduler = torch.optim.lr_scheduler.LambdaLR(network, lambda s: min(1.0, (s + 1) / 4))
    return TrainState(
        model=model, sparse_optim=sparse, network_optim=network, table_optim=None, scheduler=scheduler, loader=_Loader()
    )


def _train(state: TrainState, steps: int) -> None:
    for _ in range(steps):
        state.network_optim.zero_grad()
        state.model(torch.ones(2, 4)).sum().backward()
        state.network_optim.step()
        state.scheduler.step()
        state.step += 1
        state.loader.position += 2


def test_no_checkpoint_from_non_finite_weights(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = _state()
    _train(state, 1)
    with torch.no_grad():
        state.model[0].weight[0, 0] = float("nan")
    with caplog.at_level(logging.ERROR):
        assert checkpoint.save(state, tmp_path, keep_last=2) is None
    assert not any(tmp_path.iterdir()) and "non-finite weights" in caplog.text


def test_round_trip_keep_last_and_partial_checkpoints(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = _state()
    for _ in range(3):
        _train(state, 2)
        checkpoint.save(state, tmp_path, keep_last=2)
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step_00000004", "step_00000006"]
    # a crash mid-write leaves a folder without the marker: ignored (with a warning) by auto-resume
    partial = checkpoint.step_dir(tmp_path, 8)
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"torn")
    with caplog.at_level(logging.WARNING):
        assert checkpoint.resolve("auto", tmp_path) == checkpoint.step_dir(tmp_path, 6)
    assert "ignoring incomplete checkpoint" in caplog.text
    with pytest.raises(ValueError, match=f"no {MARKER} marker"):
        checkpoint.resolve(str(partial), tmp_path)

    want = {k: v.clone() for k, v in state.model.state_dict().items()}
    want_lr = state.scheduler.get_last_lr()
    fresh = _state()
    checkpoint.load(fresh, checkpoint.step_dir(tmp_path, 6))
    assert fresh.step == 6 and fresh.loader.position == 12
    for k, v in fresh.model.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=0)
    # the optimizer runs at the scheduled lr of step 6, not of step 0
    assert [g["lr"] for g in fresh.network_optim.param_groups] == pytest.approx(want_lr)
    _train(fresh, 1)
    _train(state, 1)
    for k, v in fresh.model.state_dict().items():
        torch.testing.assert_close(v, state.model.state_dict()[k], rtol=0, atol=0)
