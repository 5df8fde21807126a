"""The `TRAINER_FAULTS` grammar and which rank / step / attempt each fault hits.

(The faults themselves are exercised through the launcher in test_reliability.py.)
"""

from __future__ import annotations

import pytest
import torch

from trainer.faults import Fault, FaultInjector, parse


def test_parse_items() -> None:
    assert parse("sigkill@12:1, nan_loss@3 ,sigkill@7:0/2,nan_loss@4/1") == [
        Fault("sigkill", 12, 1, None),
        Fault("nan_loss", 3, None, None),
        Fault("sigkill", 7, 0, 2),
        Fault("nan_loss", 4, None, 1),
    ]
    assert parse("") == []


@pytest.mark.parametrize("bad", ["sigkill", "sigkill@x", "sigkill@3:a", "sigkill@3/1:0", "oom@3", "sigkill@3/"])
def test_parse_errors_name_the_item(bad: str) -> None:
    with pytest.raises(ValueError, match="TRAINER_FAULTS item"):
        parse(bad)


def injector(monkeypatch: pytest.MonkeyPatch, spec: str, *, rank: int, world: int, attempt: int) -> FaultInjector:
    monkeypatch.setenv("TRAINER_FAULTS", spec)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", str(attempt))
    return FaultInjector(rank, world)


def kills(inj: FaultInjector, steps: range) -> list[int]:
    return [s for s in steps if inj._hits("sigkill", s, default_rank=1 if inj.world_size > 1 else 0, default_attempt=0)]


def test_each_kill_fires_on_its_attempt_only(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = "sigkill@5:0/0,sigkill@9:1/1,sigkill@9:0/2,sigkill@14"  # the last: rank 1, attempt 0
    want = {(0, 0): [5], (1, 0): [14], (1, 1): [9], (0, 1): [], (0, 2): [9], (1, 2): [], (0, 3): [], (1, 3): []}
    for (rank, attempt), steps in want.items():
        assert kills(injector(monkeypatch, spec, rank=rank, world=2, attempt=attempt), range(20)) == steps
    # in a world of one the default rank is 0
    assert kills(injector(monkeypatch, "sigkill@3", rank=0, world=1, attempt=0), range(5)) == [3]


def test_nan_loss_defaults_to_every_rank_and_attempt(monkeypatch: pytest.MonkeyPatch) -> None:
    for rank, attempt in ((0, 0), (1, 3)):
        inj = injector(monkeypatch, "nan_loss@2,nan_loss@4:1/3", rank=rank, world=2, attempt=attempt)
        hit = [s for s in range(6) if torch.isnan(inj.loss(s, torch.ones(()))).item()]
        assert hit == ([2] if (rank, attempt) == (0, 0) else [2, 4])
