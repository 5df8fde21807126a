"""`trainer.engine=deepspeed` trains like the native engine (DDP + torch optimizer).

On 2 gloo ranks, from the same weights and batches: per-step global losses and the
final network weights (experts included) of DeepSpeed ZeRO 0 / 1 / 2 equal the native engine's,
with experts replicated (ep = 1) and sharded (ep = 2), with and without grad clipping (by the
global norm: replicated weights stay identical on every rank; at ep = 2
DeepSpeed reduces expert gradients over the expert-data-parallel group only). SGD is
used for parity because its update is linear in the gradient, so a wrong gradient
scale shows. With Adam: the ZeRO-partitioned optimizer state, gathered per parameter
for checkpoints, equals the native optimizer's state, and a checkpoint written with
`trainer.checkpoint.save` and loaded into a fresh engine continues with the same losses.
Config validation of `trainer.engine` / `trainer.deepspeed` runs without processes.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torchrec.optim.keyed import KeyedOptimizerWrapper

from parallel.deepspeed_engine import DeepSpeedConfig, DeepSpeedEngine
from parallel.dist import DistInfo
from parallel.embedding_sharding import EmbeddingShardingConfig, SparseOptimizerConfig
from parallel.expert.params import expert_parameter_names
from parallel.parallelize import ParallelConfig, network_parameters, parallelize
from parallel.state import load_full_state
from tests._dist import run_ranks
from tests.parallel.test_expert_parallel import build, loader, reference, total_loss
from tests.trainer.test_config import compose_run
from trainer import checkpoint
from trainer.checkpoint import TrainState
from trainer.engine import NativeEngine

WORLD, GLOBAL_BATCH, STEPS, LR = 2, 16, 4, 0.05


def build_parallel(init: dict, *, ep: int, engine: str, sparse: str = "sgd"):
    rank = dist.get_rank()
    info = DistInfo(rank=rank, world_size=WORLD, local_rank=rank, device=torch.device("cpu"), backend="gloo")
    model = build("meta")
    model.load_state_dict({k: v for k, v in init.items() if not k.startswith("ebc.")}, strict=False)
    cfg = ParallelConfig(
        embedding=EmbeddingShardingConfig(sharding_type="table_wise"),
        sparse_optimizer=SparseOptimizerConfig(name=sparse, lr=LR),
        ep=ep,
    )
    pm = parallelize(model, cfg, info, engine=engine)
    load_full_state(pm.dmp, {k: v for k, v in init.items() if k.startswith("ebc.")}, strict=False)
    return pm


def build_engine(init: dict, *, ep: int, stage: int | None, opt: str, clip: float = 0.0, sparse: str = "sgd"):
    """(parallel model, engine, keyed network optimizer, optimizer the schedule steps);
    `stage=None` = the native engine."""

    def make_opt(params: list) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=LR) if opt == "sgd" else torch.optim.Adam(params, lr=LR)

    pm = build_parallel(init, ep=ep, engine="native" if stage is None else "deepspeed", sparse=sparse)
    if stage is None:
        named = dict(network_parameters(pm.dmp))
        keyed = KeyedOptimizerWrapper(named, lambda ps: make_opt(list(ps)))
        return pm, NativeEngine(pm, [keyed], list(named.values()), clip), keyed, keyed
    ds = DeepSpeedEngine(
        pm,
        cfg=DeepSpeedConfig(zero_stage=stage),
        build_optimizer=make_opt,
        global_batch=GLOBAL_BATCH,
        grad_clip=clip,
    )
    return pm, ds, ds.keyed_optimizer, ds.base_optimizer


def train_steps(pm, engine, batches) -> list[float]:
    """The trainer's step (forward, backward, expert sync, step); global mean losses."""
    losses = []
    for batch in batches:
        out = engine(batch)
        loss = total_loss(out, batch)
        engine.zero_grad()
        engine.backward(loss)
        pm.after_backward()
        engine.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / WORLD)
    return losses


def network_weights(pm) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in network_parameters(pm.dmp)}


def parity_worker(rank: int, world: int, init: dict, ep: int, runs: list[tuple[int | None, float]]) -> dict:
    batches = [b for _, b in zip(range(STEPS), loader(rank, world), strict=False)]
    out = {}
    for stage, clip in runs:
        pm, engine, _, _ = build_engine(init, ep=ep, stage=stage, opt="sgd", clip=clip)
        losses = train_steps(pm, engine, batches)
        ddp = any(isinstance(m, DistributedDataParallel) for m in pm.dmp.modules())
        out[(stage, clip)] = {"losses": losses, "weights": network_weights(pm), "ddp": ddp}
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    ("ep", "runs"),
    [
        (1, [(None, 0.0), (1, 0.0), (None, 0.05), (2, 0.05)]),
        (2, [(None, 0.0), (0, 0.0), (1, 0.0), (2, 0.0), (None, 0.05), (1, 0.05)]),
    ],
)
def test_deepspeed_matches_native_engine(ep: int, runs: list[tuple[int | None, float]]) -> None:
    """Per-step losses and final weights: DeepSpeed ZeRO stage vs native, same clip."""
    ranks = run_ranks(parity_worker, WORLD, reference()["init"], ep, runs)
    experts = expert_parameter_names(build("meta"))
    for r in ranks:
        for stage, clip in runs:
            if stage is None:
                continue
            want, got = r[(None, clip)], r[(stage, clip)]
            assert want["ddp"] and not got["ddp"]  # DeepSpeed alone reduces the network gradients
            np.testing.assert_allclose(got["losses"], want["losses"], rtol=0, atol=1e-6, err_msg=f"stage {stage}")
            assert got["weights"].keys() == want["weights"].keys()
            for name, w in want["weights"].items():  # experts: this rank's slice
                torch.testing.assert_close(got["weights"][name], w, rtol=1e-5, atol=1e-6, msg=f"{stage} {name}")
    for stage, clip in runs:  # replicated (non-expert) weights stay identical on every rank
        for name, w in ranks[0][(stage, clip)]["weights"].items():
            if name not in experts:
                torch.testing.assert_close(ranks[1][(stage, clip)]["weights"][name], w, rtol=0, atol=0, msg=name)
    if ep == 2:  # ranks own different expert slices
        name = next(n for n in ranks[0][(1, 0.0)]["weights"] if n in experts)
        assert not torch.equal(ranks[0][(1, 0.0)]["weights"][name], ranks[1][(1, 0.0)]["weights"][name])


class _NoLoader:
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def checkpoint_worker(rank: int, world: int, init: dict, root: str) -> dict:
    batches = [b for _, b in zip(range(5), loader(rank, world), strict=False)]
    _, native, native_opt, _ = build_engine(init, ep=2, stage=None, opt="adam", sparse="adagrad")
    pm_n = native.pm
    train_steps(pm_n, native, batches[:2])
    native_state = native_opt.state_dict()["state"]

    def fresh() -> tuple:
        pm, ds, keyed, scheduled = build_engine(init, ep=2, stage=2, opt="adam", sparse="adagrad")
        state = TrainState(
            model=pm.dmp,
            sparse_optim=pm.dmp.fused_optimizer,
            network_optim=keyed,
            table_optim=None,
            scheduler=torch.optim.lr_scheduler.LambdaLR(scheduled, lambda s: 1.0),
            loader=_NoLoader(),
            expert_mesh=pm.mesh,
        )
        return pm, ds, state

    pm, ds, state = fresh()
    train_steps(pm, ds, batches[:2])
    ds_state = state.network_optim.state_dict()["state"]
    state.step = 2
    path = checkpoint.save(state, Path(root), keep_last=1)
    assert path is not None
    straight = train_steps(pm, ds, batches[2:])
    pm2, ds2, state2 = fresh()
    checkpoint.load(state2, path)
    resumed = train_steps(pm2, ds2, batches[2:])
    return {"native_state": native_state, "ds_state": ds_state, "straight": straight, "resumed": resumed}


@pytest.mark.slow
def test_deepspeed_optimizer_state_and_checkpoint_resume() -> None:
    """ep = 2, ZeRO-2, Adam: gathered state == native Adam state; save/load continues exactly."""
    with tempfile.TemporaryDirectory() as root:
        ranks = run_ranks(checkpoint_worker, WORLD, reference()["init"], root)
    for r in ranks:
        assert r["ds_state"].keys() == r["native_state"].keys()
        for name, want in r["native_state"].items():
            assert set(r["ds_state"][name]) == set(want) == {"step", "exp_avg", "exp_avg_sq"}, name
            for key, value in want.items():
                torch.testing.assert_close(r["ds_state"][name][key], value, rtol=1e-5, atol=1e-7, msg=f"{name} {key}")
        np.testing.assert_allclose(r["resumed"], r["straight"], rtol=0, atol=1e-7)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.engine=megatron"], "trainer.engine"),
        (["trainer.engine=deepspeed", "trainer.deepspeed.zero_stage=3"], "zero_stage=3 is not supported"),
        (["trainer.engine=deepspeed", "trainer.deepspeed.zero_stage=4"], "trainer.deepspeed.zero_stage"),
        (["trainer.engine=deepspeed", "trainer.deepspeed.bf16=true"], "needs trainer.device=cuda"),
        (["trainer.engine=deepspeed", "trainer.optimizer=adagrad"], "trainer.optimizer=adagrad"),
        (["trainer.engine=deepspeed", "parallel.embedding.sharding_type=data_parallel"], "data_parallel"),
    ],
)
def test_engine_config_errors_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compose_run(*overrides)


def test_engine_config_defaults_and_overrides() -> None:
    run = compose_run()
    assert run.trainer.engine == "native" and run.trainer.deepspeed == DeepSpeedConfig(zero_stage=1, bf16=False)
    run = compose_run("model=smes", "trainer.engine=deepspeed", "trainer.deepspeed.zero_stage=2")
    assert run.trainer.engine == "deepspeed" and run.trainer.deepspeed.zero_stage == 2
    compose_run("trainer.engine=deepspeed", "trainer.device=cuda", "trainer.deepspeed.bf16=true")
