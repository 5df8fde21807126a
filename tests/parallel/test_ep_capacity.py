"""`model.capacity_factor` under expert parallelism.

Definition under test (`model.smes` module doc): the capacity is per expert and per
source rank's local batch, decided by that rank's router before dispatch (the router
gets the factor when the model is built; `parallelize` sets nothing). So the reference
is one plain process run on each rank's batch in turn (with the balance counts made
global, as the data-parallel count reducer does), and the loss is the mean of the
per-rank losses. EP (ep = 2 on 2 gloo ranks) and pure data
parallelism (ep = 1) must give the same logits, losses, gradients and dropped-pair
counts as that reference; the dropped pairs are summed over ranks by the trainer's
`ExpertLoadMeter`. Also: config errors name `model.capacity_factor`, and the old key
`parallel.capacity_factor` fails naming the new one.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from model.baselines import MMoEConfig
from model.build import MultiTaskModel, TowerConfig
from model.smes import SMES, SMESConfig, validate_smes_config
from parallel.dist import DistInfo
from parallel.embedding_sharding import EmbeddingShardingConfig, SparseOptimizerConfig
from parallel.expert.dispatcher import a2a_stats
from parallel.expert.params import expert_parameter_names, smes_layers
from parallel.parallelize import ParallelConfig, network_parameters, parallelize
from parallel.state import load_full_state
from tests._dist import run_ranks
from tests.parallel.test_embedding_parity import SPEC
from tests.parallel.test_expert_parallel import build, core_cfg, expert_slice, loader, total_loss
from tests.trainer.test_config import compose_run
from trainer.evaluation.experts import ExpertLoadMeter

WORLD, CAPACITY = 2, 0.5


def build_capped(device: str, capacity_factor: float | None) -> MultiTaskModel:
    """`build(device)` (same seed, same weights) with `model.capacity_factor` set."""
    torch.manual_seed(0)
    cfg = replace(core_cfg(), capacity_factor=capacity_factor)
    return MultiTaskModel(SPEC, core_cfg=cfg, embedding_dim=8, tower=TowerConfig(hidden=[4]), ebc_device=device)


def reference(capacity_factor: float | None) -> dict:
    """One process, each rank's first batch in turn; loss = mean of the rank losses."""
    model = build_capped("cpu", capacity_factor)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [next(iter(loader(r, WORLD))) for r in range(WORLD)]
    with torch.no_grad():  # global selection counts, as the all-reduce gives every rank
        counts_E = sum(model(b).load.counts_TE.sum(0) for b in batches)
    smes_layers(model)[0].count_reducer = lambda _: counts_E.clone()
    outs = [model(b) for b in batches]
    losses = [total_loss(out, b) for out, b in zip(outs, batches, strict=True)]
    (sum(losses) / WORLD).backward()
    return {
        "init": init,
        "logits": [{t: out.logits[t].detach() for t in SPEC.tasks} for out in outs],
        "losses": [loss.item() for loss in losses],
        "dropped": [out.load.dropped_pairs.item() for out in outs],
        "grads": {n: p.grad.clone() for n, p in model.named_parameters() if not n.startswith("ebc.")},
    }


def worker(rank: int, world: int, init: dict, ep: int, capacity_factor: float | None) -> dict:
    info = DistInfo(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"), backend="gloo")
    model = build_capped("meta", capacity_factor)
    model.load_state_dict({k: v for k, v in init.items() if not k.startswith("ebc.")}, strict=False)
    cfg = ParallelConfig(
        embedding=EmbeddingShardingConfig(sharding_type="table_wise"),
        sparse_optimizer=SparseOptimizerConfig(name="sgd", lr=0.05),
        ep=ep,
    )
    pm = parallelize(model, cfg, info)
    load_full_state(pm.dmp, {k: v for k, v in init.items() if k.startswith("ebc.")}, strict=False)
    batch = next(iter(loader(rank, world)))
    out = pm.dmp(batch)
    loss = total_loss(out, batch)
    loss.backward()
    pm.after_backward()
    meter = ExpertLoadMeter()
    meter.add(out.load)
    figures = meter.compute(SPEC.tasks)  # all-reduced over the ranks, as the trainer logs it
    assert figures is not None
    return {
        "logits": {t: out.logits[t].detach() for t in SPEC.tasks},
        "loss": loss.item(),
        "local_dropped": out.load.dropped_pairs.item(),
        "global_dropped": figures["dropped_pairs"],
        "grads": {n: p.grad.clone() for n, p in network_parameters(pm.dmp)},
        "ep_rank": rank % ep,
        "a2a_bytes": sum(s.bytes_sent for s in a2a_stats(pm.dmp)),
    }


@pytest.mark.slow
@pytest.mark.parametrize(("ep", "capacity_factor"), [(2, CAPACITY), (1, CAPACITY), (2, None)])
def test_capacity_is_per_source_rank_batch(ep: int, capacity_factor: float | None) -> None:
    ref = reference(capacity_factor)
    if capacity_factor is not None:  # the test means something only if pairs are dropped
        assert min(ref["dropped"]) > 0
        dropless = reference(None)
        assert not torch.allclose(ref["logits"][0][SPEC.tasks[0]], dropless["logits"][0][SPEC.tasks[0]])
    else:
        assert sum(ref["dropped"]) == 0
    ranks = run_ranks(worker, WORLD, ref["init"], ep, capacity_factor)
    experts = expert_parameter_names(build("meta"))
    for r, res in enumerate(ranks):
        assert res["local_dropped"] == ref["dropped"][r]
        assert res["global_dropped"] == sum(ref["dropped"])
        assert res["loss"] == pytest.approx(ref["losses"][r], rel=1e-5, abs=1e-6)
        for t in SPEC.tasks:
            torch.testing.assert_close(res["logits"][t], ref["logits"][r][t], rtol=1e-5, atol=1e-6)
        assert (res["a2a_bytes"] > 0) == (ep > 1)
        for name, g in res["grads"].items():
            want = ref["grads"][name]
            if ep > 1 and name in experts:
                want = expert_slice(want, res["ep_rank"], ep)
            torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_non_positive_capacity_factor_names_the_key(bad: float) -> None:
    cfg = SMESConfig(num_experts=4, expert_hidden=[8], capacity_factor=bad)
    with pytest.raises(ValueError, match=r"model\.capacity_factor must be > 0"):
        validate_smes_config(cfg, num_tasks=2)
    with pytest.raises(ValueError, match=r"model\.capacity_factor"):
        SMES(cfg, in_dim=8, tasks=("a", "b"))


def test_capacity_factor_needs_sparse_routing() -> None:
    with pytest.raises(ValueError, match=r"model\.capacity_factor has no effect with model\.routing=all"):
        SMES(SMESConfig(num_experts=4, routing="all", expert_hidden=[8], capacity_factor=1.0), in_dim=8, tasks=("a",))
    SMES(SMESConfig(num_experts=4, routing="all", expert_hidden=[8]), in_dim=8, tasks=("a",))  # dropless is fine
    smes = build_capped("meta", 1.25)
    assert smes_layers(smes)[0].router.capacity_factor == 1.25
    mmoe = MultiTaskModel(  # no capacity_factor field: nothing to check, nothing to set
        SPEC, core_cfg=MMoEConfig(num_experts=2, expert_hidden=[8]), embedding_dim=8, tower=TowerConfig(hidden=[4])
    )
    assert not smes_layers(mmoe)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (("model=smes", "model.capacity_factor=0"), "model.capacity_factor must be > 0"),
        (("model=mmoe", "+model.capacity_factor=1.0"), "model.capacity_factor"),  # SMES cores only
        (("model=smes", "model.routing=all", "model.capacity_factor=1.0"), "model.routing=all"),
        # the key before issue 22: an error naming the new key, whatever the model
        (("model=smes", "parallel.capacity_factor=1.0"), "parallel.capacity_factor was renamed model.capacity_factor"),
        (("model=mmoe", "parallel.capacity_factor=1.0"), "use model.capacity_factor=1.0"),
    ],
)
def test_config_errors(overrides: tuple[str, ...], key: str) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        compose_run(*overrides)


def test_config_key_reaches_the_router() -> None:
    assert compose_run("model=smes").model.core.capacity_factor is None
    run = compose_run("model=smes", "model.capacity_factor=1.5")
    assert run.model.core.capacity_factor == 1.5
    core = SMES(run.model.core, in_dim=8, tasks=("a", "b"))
    assert core.layer.router.capacity_factor == 1.5
