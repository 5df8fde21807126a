"""`trainer.router_lr_scale`: the SMES routers' parameters train at `lr * scale`, every
other network parameter at `lr`; the key is checked."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from parallel.dist import DistInfo
from tests._dist import run_ranks
from trainer.config import build_run_config, validate
from trainer.trainer import Trainer

CONF = Path(__file__).resolve().parents[2] / "conf"
BASE = (
    "data=synthetic", "data.num_train=800", "data.num_val=200", "data.num_test=200", "data.num_tasks=2",
    "model=smes", "model.num_experts=4", "model.expert_hidden=[16]", "model.tower.hidden=[8]",
    "model.embedding_dim=8", "trainer.batch_size=64", "trainer.progress=false", "logger=none",
    "trainer.pipeline=none", "trainer.optimizer=sgd", "trainer.lr=0.1", "trainer.steps=1",
)  # fmt: skip


def _run(overrides: tuple[str, ...]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return build_run_config(compose(config_name="config", overrides=[*BASE, *overrides]))


def _one_step(rank: int, world: int, run_dir: str, overrides: tuple[str, ...]) -> dict:
    """Per parameter name: (its optimizer lr, the change of one SGD step)."""
    info = DistInfo(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"), backend="gloo")
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    trainer = Trainer(_run(overrides), Path(run_dir), info=info)
    named = {n: p for n, p in trainer.pm.dmp.named_parameters() if "router" in n or "towers" in n}
    before = {n: p.detach().clone() for n, p in named.items()}
    lrs = {id(p): g["lr"] for g in trainer.state.network_optim.param_groups for p in g["params"]}
    trainer.train()
    return {n: (lrs[id(p)], (p.detach() - before[n]).clone()) for n, p in named.items()}


def test_routers_step_at_the_scaled_learning_rate(tmp_path: Path) -> None:
    (plain,) = run_ranks(_one_step, 1, str(tmp_path / "a"), ())
    (scaled,) = run_ranks(_one_step, 1, str(tmp_path / "b"), ("trainer.router_lr_scale=10",))
    routers = [n for n in plain if ".router." in n]
    assert routers and len(routers) < len(plain)
    for name, (lr, delta) in scaled.items():
        lr0, delta0 = plain[name]
        assert lr0 == pytest.approx(0.1)
        if name in routers:
            assert lr == pytest.approx(1.0)
            assert delta0.abs().max() > 0
            torch.testing.assert_close(delta, 10 * delta0, rtol=1e-4, atol=1e-7)  # same gradient, 10x the step
        else:
            assert lr == pytest.approx(0.1)
            torch.testing.assert_close(delta, delta0)


def test_router_lr_scale_is_checked() -> None:
    with pytest.raises(ValueError, match="trainer.router_lr_scale must be > 0"):
        validate(_run(("trainer.router_lr_scale=0",)))
    with pytest.raises(ValueError, match="trainer.router_lr_scale applies to trainer.engine=native"):
        validate(_run(("trainer.router_lr_scale=2", "trainer.engine=deepspeed")))
