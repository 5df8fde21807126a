"""Expert parameters are found by module type (`parallel.expert.params`), not by name.

- On today's layout the mechanism finds exactly the parameters of the `GroupedExperts`
  modules, which are the names under `.dispatcher.experts.` (the rule it replaced).
- With the experts under another attribute name, the same parameters are still found,
  on a plain model and after `apply_expert_parallel` (2 gloo ranks, ep = 2), where the
  checkpoint view wraps exactly them as global DTensors and the expert-gradient sync
  takes exactly them.

Legend: D input width, E experts.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from model.moe.dispatch import LocalDispatcher
from model.moe.experts import GroupedExperts
from model.smes import SMESConfig, SMESLayer
from parallel.expert.checkpoint import checkpoint_view
from parallel.expert.dispatcher import apply_expert_parallel
from parallel.expert.grads import build_expert_grad_sync
from parallel.expert.mesh import build_mesh
from parallel.expert.params import expert_parameter_names, expert_parameters, named_expert_parameters
from tests._dist import run_ranks
from tests.parallel.test_expert_parallel import build

LEGACY = ".dispatcher.experts."  # the name rule the mechanism replaced
D, E = 10, 4


class _Core(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = SMESLayer(SMESConfig(num_experts=E, expert_hidden=[6, 5]), in_dim=D, num_tasks=2)


class _RenamedDispatcher(LocalDispatcher):
    """A local dispatcher holding its experts under another attribute name."""

    def __init__(self, experts: GroupedExperts) -> None:
        nn.Module.__init__(self)
        self.pool = experts

    @property
    def experts(self) -> GroupedExperts:  # type: ignore[override]
        return self.pool


def _grouped(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters of every `GroupedExperts` module, by their names in `model`."""
    ids = {id(p) for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()}
    return {n: p for n, p in model.named_parameters() if id(p) in ids}


def _rename_experts(layer: SMESLayer) -> None:
    """Move the dispatcher's experts to the attribute `pool`."""
    experts = layer.dispatcher.experts
    del layer.dispatcher.experts
    layer.dispatcher.pool = experts


def test_expert_parameters_are_the_grouped_experts_parameters() -> None:
    model = build("meta")
    want = _grouped(model)
    names = expert_parameter_names(model)
    assert want and names == want.keys()
    assert names == {n for n, _ in model.named_parameters() if LEGACY in n}  # unchanged on today's layout
    assert [id(p) for p in expert_parameters(model)] == [id(p) for p in want.values()]
    assert sum(p.numel() for p in expert_parameters(model)) == sum(
        p.numel() for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()
    )


def test_renamed_expert_attribute_is_still_found() -> None:
    core = _Core()
    core.layer.dispatcher = _RenamedDispatcher(core.layer.dispatcher.experts)
    names = expert_parameter_names(core)
    assert names == _grouped(core).keys() and len(names) == 4  # 2 weights, 2 biases
    assert not any(LEGACY in n for n in names)
    out, _, _ = core.layer(torch.randn(8, D))  # still a working layer
    assert out.shape[0] == 8


def _sharded_worker(rank: int, world: int) -> dict:
    mesh = build_mesh(world)
    core = _Core()
    ignored = apply_expert_parallel(core, mesh)
    legacy = {n for n, _ in core.named_parameters() if LEGACY in n}
    state = {"model": core.state_dict()}
    before = {k for k, v in checkpoint_view(state, mesh, model=core)["model"].items() if isinstance(v, DTensor)}
    _rename_experts(core.layer)
    named = dict(named_expert_parameters(core))
    optim = {"state": {n: {"exp_avg": torch.zeros_like(p), "step": torch.tensor(3.0)} for n, p in named.items()}}
    view = checkpoint_view({"model": core.state_dict(), "optim": optim}, mesh, model=core)
    sync = build_expert_grad_sync(core, mesh)
    assert sync is not None
    return {
        "ignored": set(ignored),
        "legacy": legacy,
        "before": before,
        "renamed": set(named),
        "grouped": set(_grouped(core)),
        "wrapped": {k: tuple(v.shape) for k, v in view["model"].items() if isinstance(v, DTensor)},
        "local": {n: tuple(p.shape) for n, p in named.items()},
        "optim": {
            k: (type(v["exp_avg"]).__name__, tuple(v["exp_avg"].shape), type(v["step"]).__name__)
            for k, v in view["optim"]["state"].items()
        },
        "sync_is_experts": [id(p) for p in sync.params] == [id(p) for p in named.values()],
        "same_device_mesh": mesh.device_mesh() is mesh.device_mesh(),
    }


def test_sharded_experts_found_after_rename_by_checkpoint_view_and_grad_sync() -> None:
    for r in run_ranks(_sharded_worker, 2):
        # before the rename: DDP exclusion and DCP keys are exactly the old name rule's
        assert r["ignored"] == r["legacy"] == r["before"] and len(r["legacy"]) == 4
        # after: the same parameters under new names, found by type
        assert r["renamed"] == r["grouped"] and len(r["renamed"]) == 4
        assert not any(LEGACY in n for n in r["renamed"])
        assert r["wrapped"].keys() == r["renamed"]
        for name, shape in r["wrapped"].items():  # global [E, ...] over local [E/ep, ...] slices
            assert shape[0] == E and r["local"][name][0] == E // 2 and shape[1:] == r["local"][name][1:]
        for kind, shape, step in r["optim"].values():
            assert kind == "DTensor" and shape[0] == E and step == "Tensor"  # scalars stay plain
        assert r["sync_is_experts"] and r["same_device_mesh"]
