"""Sharded embedding training on 2 gloo ranks equals single-process training.

Same initial weights, same global batches: per-step losses, embedding tables (gathered
from their shards) and network weights must match a plain single-process model trained
with the equivalent non-fused optimizers, for every sharding type. Two optimizer
setups: Adagrad tables + Adam network (the defaults), and SGD for both, since Adagrad and
Adam are invariant to a constant gradient scale and would pass a gradient that is W
times too large (e.g. sparse gradients summed instead of averaged over ranks).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from data.columns import SparseColumn, Split
from data.loaders.in_memory import TrainLoader
from data.spec import DatasetSpec, SparseFeature
from model.baselines import MMoEConfig
from model.build import MultiTaskModel, TowerConfig
from parallel.dist import DistInfo
from parallel.embedding_sharding import EmbeddingShardingConfig, SparseOptimizerConfig
from parallel.parallelize import ParallelConfig, network_parameters, parallelize
from parallel.state import gather_full_state, load_full_state
from tests._dist import run_ranks
from trainer.loss import task_losses

SPEC = DatasetSpec(
    name="tiny",
    sparse=(
        SparseFeature(name="a", num_embeddings=40),
        SparseFeature(name="b", num_embeddings=24, multi_hot=True),
        SparseFeature(name="c", num_embeddings=30),
    ),
    dense_names=("d0", "d1"),
    tasks=("x", "y"),
    has_user_id=False,
)
GLOBAL_BATCH, STEPS, LR = 16, 3, 0.1
TYPES = ["table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel"]
# (sparse optimizer, network optimizer, network lr)
OPTIMIZERS = {"adagrad_adam": ("adagrad", "adam", LR / 10), "sgd": ("sgd", "sgd", LR)}


def network_optimizer(name: str, params: list, lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr) if name == "adam" else torch.optim.SGD(params, lr=lr)


def tiny_split() -> Split:
    rng = np.random.default_rng(0)
    n = GLOBAL_BATCH * STEPS
    return Split(
        dense=rng.standard_normal((n, 2)).astype(np.float32),
        sparse={
            "a": SparseColumn.single_hot(rng.integers(0, 40, n)),
            "b": SparseColumn.from_lists([list(rng.integers(0, 24, rng.integers(0, 4))) for _ in range(n)]),
            "c": SparseColumn.single_hot(rng.integers(0, 30, n)),
        },
        labels={"x": rng.integers(0, 2, n).astype(np.float32), "y": rng.integers(0, 2, n).astype(np.float32)},
    )


def build(device: str) -> MultiTaskModel:
    torch.manual_seed(0)
    return MultiTaskModel(
        SPEC,
        core_cfg=MMoEConfig(num_experts=2, expert_hidden=[8]),
        embedding_dim=8,
        tower=TowerConfig(hidden=[4]),
        ebc_device=device,
    )


def reference(opts: str) -> tuple[dict[str, torch.Tensor], list[float], dict[str, torch.Tensor]]:
    sparse_name, network_name, network_lr = OPTIMIZERS[opts]
    model = build("cpu")
    init = {k: v.clone() for k, v in model.state_dict().items()}
    emb = [p for n, p in model.named_parameters() if n.startswith("ebc.")]
    network = [p for n, p in model.named_parameters() if not n.startswith("ebc.")]
    if sparse_name == "adagrad":
        emb_opt: torch.optim.Optimizer = torch.optim.Adagrad(emb, lr=LR, eps=1e-8)
    else:
        emb_opt = torch.optim.SGD(emb, lr=LR)
    network_opt = network_optimizer(network_name, network, network_lr)
    loader = TrainLoader(tiny_split(), spec=SPEC, batch_size=GLOBAL_BATCH, shuffle=False, prefetch=0)
    losses = []
    for _, batch in zip(range(STEPS), loader, strict=False):
        out = model(batch)
        loss = sum(task_losses(out, batch, SPEC.tasks).values())
        emb_opt.zero_grad()
        network_opt.zero_grad()
        loss.backward()
        emb_opt.step()
        network_opt.step()
        losses.append(loss.item())
    return init, losses, {k: v.clone() for k, v in model.state_dict().items()}


def sharded_worker(rank: int, world: int, init: dict[str, torch.Tensor]) -> dict[str, object]:
    info = DistInfo(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"), backend="gloo")
    results = {}
    for opts, (sparse_name, network_name, network_lr) in OPTIMIZERS.items():
        for stype in TYPES:
            cfg = ParallelConfig(
                embedding=EmbeddingShardingConfig(sharding_type=stype),
                sparse_optimizer=SparseOptimizerConfig(name=sparse_name, lr=LR, eps=1e-8),
            )
            pm = parallelize(build("meta"), cfg, info)
            load_full_state(pm.dmp, init)
            network_opt = network_optimizer(network_name, [p for _, p in network_parameters(pm.dmp)], network_lr)
            # data_parallel tables are plain replicated tensors with their own optimizer
            optimizers = [network_opt] + ([pm.replicated_table_optimizer] if pm.replicated_table_optimizer else [])
            loader = TrainLoader(
                tiny_split(), spec=SPEC, batch_size=GLOBAL_BATCH // world, rank=rank, world_size=world,
                shuffle=False, prefetch=0,
            )  # fmt: skip
            losses = []
            for _, batch in zip(range(STEPS), loader, strict=False):
                out = pm.dmp(batch)
                loss = sum(task_losses(out, batch, SPEC.tasks).values())
                for opt in optimizers:
                    opt.zero_grad()
                loss.backward()
                for opt in optimizers:
                    opt.step()
                mean = loss.detach().clone()
                dist.all_reduce(mean)
                losses.append(mean.item() / world)
            results[(opts, stype)] = {"plan": pm.plan, "losses": losses, "state": gather_full_state(pm.dmp)}
    return results


@pytest.mark.slow
def test_sharded_training_matches_single_process() -> None:
    refs = {opts: reference(opts) for opts in OPTIMIZERS}
    init = refs["sgd"][0]
    for opts in OPTIMIZERS:  # every setup starts from the same weights
        for key, value in refs[opts][0].items():
            assert torch.equal(value, init[key]), key
    per_rank = run_ranks(sharded_worker, 2, init)
    for opts, (_, ref_losses, ref_state) in refs.items():
        for stype in TYPES:
            got = per_rank[0][(opts, stype)]
            msg = f"{opts}/{stype}"
            assert all(v.startswith(stype) for v in got["plan"].values()), got["plan"]
            np.testing.assert_allclose(got["losses"], ref_losses, rtol=1e-5, atol=1e-6, err_msg=msg)
            for key, ref in ref_state.items():
                torch.testing.assert_close(got["state"][key], ref, rtol=1e-4, atol=1e-5, msg=f"{msg}: {key}")
            # training moved every table, so the comparison is not trivially initial == initial
            for key in ref_state:
                if key.startswith("ebc."):
                    assert not torch.equal(ref_state[key], init[key]), key
    # both ranks hold identical replicas of the network weights
    for key, value in per_rank[1][("sgd", "row_wise")]["state"].items():
        torch.testing.assert_close(value, per_rank[0][("sgd", "row_wise")]["state"][key])
