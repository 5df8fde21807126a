"""Expert parallelism equals single-process training on the same global batch.

ep = 2 on 2 processes and ep = 2 on 4 processes (two expert-data-parallel replicas)
against one plain process: per-task logits, losses (task + balance), gradients of
experts, routers and towers after one step, and all weights (embeddings included)
after a few optimizer steps. Also: global balance counts equal the concatenated batch's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from benchmarks.host_syncs import count_host_syncs
from data.loaders.in_memory import TrainLoader
from model.build import MultiTaskModel, TowerConfig
from model.smes import SMES, SMESConfig
from parallel.dist import DistInfo
from parallel.embedding_sharding import EmbeddingShardingConfig, SparseOptimizerConfig
from parallel.expert.dispatcher import a2a_stats, apply_expert_parallel
from parallel.expert.mesh import build_mesh, check_ep
from parallel.expert.params import expert_parameter_names, smes_layers
from parallel.parallelize import ParallelConfig, network_parameters, parallelize
from parallel.state import gather_full_state, load_full_state
from tests._dist import run_ranks
from tests.parallel.test_embedding_parity import SPEC, tiny_split
from trainer.loss import task_losses

GLOBAL_BATCH, STEPS, LR = 16, 3, 0.05
E = 4


def core_cfg(mixing: str = "selected") -> SMESConfig:
    return SMESConfig(num_experts=E, shared_top_k=1, adaptive_top_k=1, expert_hidden=[8], balance_beta=0.1,
                      mixing=mixing)  # fmt: skip


def build(device: str, mixing: str = "selected") -> MultiTaskModel:
    torch.manual_seed(0)
    return MultiTaskModel(
        SPEC, core_cfg=core_cfg(mixing), embedding_dim=8, tower=TowerConfig(hidden=[4]), ebc_device=device
    )


def total_loss(out, batch) -> torch.Tensor:
    return sum(task_losses(out, batch, SPEC.tasks).values()) + sum(out.aux_losses.values())


def loader(rank: int, world: int) -> TrainLoader:
    return TrainLoader(
        tiny_split(),
        spec=SPEC,
        batch_size=GLOBAL_BATCH // world,
        rank=rank,
        world_size=world,
        shuffle=False,
        prefetch=0,
    )


def reference(mixing: str = "selected") -> dict:
    model = build("cpu", mixing)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    out_log, losses, grads, counts = [], [], {}, None
    for i, batch in zip(range(STEPS), loader(0, 1), strict=False):
        out = model(batch)
        loss = total_loss(out, batch)
        opt.zero_grad()
        loss.backward()
        if i == 0:
            out_log = {t: out.logits[t].detach().clone() for t in SPEC.tasks}
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if not n.startswith("ebc.")}
            counts = out.load.counts_TE.clone()
        opt.step()
        losses.append(loss.item())
    return {"init": init, "logits": out_log, "losses": losses, "grads": grads, "counts": counts,
            "state": {k: v.clone() for k, v in model.state_dict().items()}}  # fmt: skip


def ep_worker(rank: int, world: int, init: dict, ep: int, mixing: str = "selected") -> dict:
    info = DistInfo(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"), backend="gloo")
    model = build("meta", mixing)
    model.load_state_dict({k: v for k, v in init.items() if not k.startswith("ebc.")}, strict=False)
    cfg = ParallelConfig(
        embedding=EmbeddingShardingConfig(sharding_type="table_wise"),
        sparse_optimizer=SparseOptimizerConfig(name="sgd", lr=LR),
        ep=ep,
    )
    pm = parallelize(model, cfg, info)
    load_full_state(pm.dmp, {k: v for k, v in init.items() if k.startswith("ebc.")}, strict=False)
    opt = torch.optim.SGD([p for _, p in network_parameters(pm.dmp)], lr=LR)
    res: dict = {"losses": []}
    for i, batch in zip(range(STEPS), loader(rank, world), strict=False):
        out = pm.dmp(batch)
        loss = total_loss(out, batch)
        opt.zero_grad()
        loss.backward()
        pm.after_backward()
        if i == 0:
            res["logits"] = {t: out.logits[t].detach().clone() for t in SPEC.tasks}
            res["grads"] = {n: p.grad.clone() for n, p in network_parameters(pm.dmp)}
            counts = out.load.counts_TE.clone()
            dist.all_reduce(counts)
            res["counts"] = counts
        opt.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        res["losses"].append(mean.item() / world)
    experts = expert_parameter_names(pm.dmp)
    res["state"] = {k: v for k, v in gather_full_state(pm.dmp).items() if k not in experts}
    res["experts"] = {n: p.detach().clone() for n, p in pm.dmp.named_parameters() if n in experts}
    res["a2a_bytes"] = sum(s.bytes_sent for s in a2a_stats(pm.dmp))
    res["ep_rank"] = smes_layers(pm.dmp)[0].dispatcher.mesh.ep_rank
    return res


def expert_slice(full: torch.Tensor, ep_rank: int, ep: int) -> torch.Tensor:
    n = full.shape[0] // ep
    return full[ep_rank * n : (ep_rank + 1) * n]


@pytest.mark.slow
@pytest.mark.parametrize(("world", "ep", "mixing"), [(2, 2, "selected"), (4, 2, "selected"), (2, 2, "union")])
def test_expert_parallel_matches_single_process(world: int, ep: int, mixing: str) -> None:
    """`union` mixing reads the other tasks' experts of a row after the reverse
    all-to-all: the same parity."""
    ref = reference(mixing)
    experts = expert_parameter_names(build("meta"))
    ranks = run_ranks(ep_worker, world, ref["init"], ep, mixing)
    np.testing.assert_allclose(ranks[0]["losses"], ref["losses"], rtol=1e-5, atol=1e-6)
    for t in SPEC.tasks:
        got = torch.cat([r["logits"][t] for r in ranks])
        torch.testing.assert_close(got, ref["logits"][t], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ranks[0]["counts"], ref["counts"])  # global balance counts
    for r in ranks:
        assert r["a2a_bytes"] > 0  # rows really crossed ranks
        assert r["experts"].keys() == experts
        for name, g in r["grads"].items():
            want = expert_slice(ref["grads"][name], r["ep_rank"], ep) if name in experts else ref["grads"][name]
            torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-6, msg=name)
        for name, w in r["experts"].items():
            torch.testing.assert_close(w, expert_slice(ref["state"][name], r["ep_rank"], ep), rtol=1e-4, atol=1e-6)
        for key, value in r["state"].items():
            torch.testing.assert_close(value, ref["state"][key], rtol=1e-4, atol=1e-6, msg=key)


def test_ep_must_divide_world_and_experts() -> None:
    with pytest.raises(ValueError, match="divide the world size"):
        check_ep(2, 3, 4)
    with pytest.raises(ValueError, match="model.num_experts"):
        check_ep(4, 4, 6)


def sync_worker(rank: int, world: int, capacity_factor: float | None) -> list[tuple[str, str, bool]]:
    """One SMES layer at ep = 2: the host syncs of one training step on this rank."""
    torch.manual_seed(0)
    cfg = SMESConfig(num_experts=4, shared_top_k=1, adaptive_top_k=1, expert_hidden=[12, 8], bias_balance=True,
                     capacity_factor=capacity_factor)  # fmt: skip
    core = SMES(cfg, in_dim=19, tasks=("a", "b", "c"))
    mesh = build_mesh(2)
    apply_expert_parallel(core, mesh)
    x_BD = torch.randn(24, 19, generator=torch.Generator().manual_seed(rank), requires_grad=True)

    def step() -> None:
        out = core(x_BD)
        loss = sum(r.square().mean() for r in out.task_reprs.values()) + sum(out.aux_losses.values())
        loss.backward()
        core.update_bias()

    step()
    with count_host_syncs() as syncs:
        step()
    assert sum(s.bytes_sent for s in a2a_stats(core)) > 0
    return [(s.name, s.where, s.intended) for s in syncs]


@pytest.mark.slow
@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_one_host_sync_per_layer_step_under_expert_parallelism(capacity_factor: float | None) -> None:
    """The split sizes, read with N in one copy after the count exchange: one sync, no more."""
    for syncs in run_ranks(sync_worker, 2, capacity_factor):
        assert len(syncs) == 1, syncs
        name, where, intended = syncs[0]
        assert intended and "parallel/expert/dispatcher.py" in where and "plan_sizes" in where
