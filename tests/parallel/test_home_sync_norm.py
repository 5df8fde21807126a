"""HoME's expert batch norm on 2 gloo ranks equals one process on the global batch.

Same initial weights, same global batches, SGD everywhere (so a gradient off by any
factor shows): per-task logits and losses, the gradient of every network parameter after
one step, the batch norms' running statistics (identical on both ranks, so the copy a
checkpoint keeps is the global one), evaluation-mode logits and all weights after 3
steps. Without the synchronised statistics each rank normalises its half batch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.build import MultiTaskModel, TowerConfig
from model.home import HoMEConfig
from model.mlp import ReducibleBatchNorm1d
from parallel import dist as pdist
from parallel.dist import DistInfo
from parallel.embedding_sharding import EmbeddingShardingConfig, SparseOptimizerConfig
from parallel.parallelize import ParallelConfig, network_parameters, parallelize
from parallel.state import gather_full_state, load_full_state
from tests._dist import run_ranks
from tests.parallel.test_embedding_parity import SPEC
from tests.parallel.test_expert_parallel import loader
from trainer.loss import task_losses

STEPS, LR = 3, 0.1


def build(device: str) -> MultiTaskModel:
    torch.manual_seed(0)
    core = HoMEConfig(expert_hidden=[8, 6], feature_gate_rank=2, task_groups={"g1": ["x"], "g2": ["y"]})
    return MultiTaskModel(SPEC, core_cfg=core, embedding_dim=4, tower=TowerConfig(hidden=[4]), ebc_device=device)


def loss_of(out, batch) -> torch.Tensor:
    return sum(task_losses(out, batch, SPEC.tasks).values())


def eval_logits(model, rank: int, world: int) -> dict[str, torch.Tensor]:
    model.eval()
    batch = next(iter(loader(rank, world)))
    with torch.no_grad():
        out = model(batch)
    model.train()
    return {t: out.logits[t].clone() for t in SPEC.tasks}


def reference() -> dict:
    model = build("cpu")
    init = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    res: dict = {"init": init, "losses": []}
    for i, batch in zip(range(STEPS), loader(0, 1), strict=False):
        out = model(batch)
        loss = loss_of(out, batch)
        opt.zero_grad()
        loss.backward()
        if i == 0:
            res["logits"] = {t: out.logits[t].detach().clone() for t in SPEC.tasks}
            res["grads"] = {n: p.grad.clone() for n, p in model.named_parameters() if not n.startswith("ebc.")}
        opt.step()
        res["losses"].append(loss.item())
    res["state"] = {k: v.clone() for k, v in model.state_dict().items()}
    res["eval"] = eval_logits(model, 0, 1)
    return res


def worker(rank: int, world: int, init: dict) -> dict:
    info = DistInfo(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"), backend="gloo")
    cfg = ParallelConfig(
        embedding=EmbeddingShardingConfig(sharding_type="row_wise"),
        sparse_optimizer=SparseOptimizerConfig(name="sgd", lr=LR),
    )
    pm = parallelize(build("meta"), cfg, info)
    load_full_state(pm.dmp, init)
    norms = [m for m in pm.dmp.modules() if isinstance(m, ReducibleBatchNorm1d)]
    opt = torch.optim.SGD([p for _, p in network_parameters(pm.dmp)], lr=LR)
    res: dict = {"losses": [], "num_norms": len(norms), "hooked": all(m.stats_gather and m.grad_reducer for m in norms)}
    for i, batch in zip(range(STEPS), loader(rank, world), strict=False):
        out = pm.dmp(batch)
        loss = loss_of(out, batch)
        opt.zero_grad()
        loss.backward()
        if i == 0:
            res["logits"] = {t: out.logits[t].detach().clone() for t in SPEC.tasks}
            res["grads"] = {n: p.grad.clone() for n, p in network_parameters(pm.dmp)}
        opt.step()
        mean = pdist.all_reduce_mean(loss.detach().clone())
        res["losses"].append(mean.item())
    res["buffers"] = {n: b.clone() for n, b in pm.dmp.named_buffers() if "running_" in n}
    res["state"] = gather_full_state(pm.dmp)
    res["eval"] = eval_logits(pm.dmp, rank, world)
    return res


@pytest.mark.slow
def test_home_batch_norm_on_two_ranks_matches_one_process() -> None:
    ref = reference()
    ranks = run_ranks(worker, 2, ref["init"])
    assert ranks[0]["num_norms"] == 8 and ranks[0]["hooked"]  # every expert bank's norm
    np.testing.assert_allclose(ranks[0]["losses"], ref["losses"], rtol=1e-5, atol=1e-6)
    for t in SPEC.tasks:
        torch.testing.assert_close(torch.cat([r["logits"][t] for r in ranks]), ref["logits"][t], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.cat([r["eval"][t] for r in ranks]), ref["eval"][t], rtol=1e-4, atol=1e-5)
    for r in ranks:
        assert r["grads"].keys() == ref["grads"].keys()
        for name, g in r["grads"].items():
            torch.testing.assert_close(g, ref["grads"][name], rtol=1e-4, atol=1e-6, msg=name)
    # running statistics: the global batch's, and the same on both ranks
    buffers = ranks[0]["buffers"]
    assert len(buffers) == 2 * 8
    for name, value in buffers.items():
        torch.testing.assert_close(ranks[1]["buffers"][name], value, rtol=0, atol=0, msg=name)
    for key, want in ref["state"].items():
        torch.testing.assert_close(ranks[0]["state"][key], want, rtol=1e-4, atol=1e-5, msg=key)
        if "running_var" in key:  # the statistics really moved away from their initial values
            assert not torch.equal(want, ref["init"][key]), key
