"""Any task name works: names that are `nn.Module` attributes, dotted, empty, escaped.

`nn.ModuleDict` registers its keys as attributes, so a task named `forward` used to
crash every model with `KeyError: "attribute 'forward' already exists"`. Every core
and the full `MultiTaskModel` must build, run forward and backward, and keep one
readable state-dict entry per task.

Legend: B instances, D input width.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from data.spec import DatasetSpec, SparseFeature
from model.baselines import MMoEConfig, PLEConfig, SharedBottomConfig
from model.build import MultiTaskModel, TowerConfig, build_core
from model.home import HoMEConfig
from model.mlp import NamedModules, module_key
from model.smes import SMESConfig
from tests.model.test_smes import reference_forward

# module attributes, a dotted name and the escaped spelling of the same dotted name
# (must not collide), an empty name, a name with spaces
TASKS = ("forward", "train", "type", "to", "cuda", "float", "training", "a.b", "a%2Eb", "", "watch time")
CORES = {
    "shared_bottom": SharedBottomConfig(hidden=[8]),
    "mmoe": MMoEConfig(num_experts=2, expert_hidden=[8]),
    "ple": PLEConfig(num_levels=2, num_shared_experts=1, num_task_experts=1, expert_hidden=[8]),
    "smes": SMESConfig(num_experts=4, shared_top_k=1, adaptive_top_k=1, expert_hidden=[8]),
    "home": HoMEConfig(
        expert_hidden=[8],
        feature_gate_rank=2,
        task_groups={"forward": list(TASKS[:5]), "a.b": list(TASKS[5:])},  # group names clash too
    ),
}


def test_module_key_is_injective_and_registrable() -> None:
    keys = [module_key(t, "task_") for t in TASKS]
    assert len(set(keys)) == len(TASKS)
    assert all("." not in k and k.startswith("task_") for k in keys)
    assert module_key("income", "task_") == "task_income"
    modules = NamedModules({t: nn.Linear(2, 2) for t in TASKS}, prefix="task_")
    assert list(modules) == list(TASKS) and len(modules) == len(TASKS) and "forward" in modules
    assert modules["a.b"] is not modules["a%2Eb"] and modules["forward"] is modules.items()[0][1]
    assert modules.forward is not modules["forward"]  # the method is untouched


@pytest.mark.parametrize("name", list(CORES))
def test_every_core_takes_any_task_name(name: str) -> None:
    torch.manual_seed(0)
    core = build_core(CORES[name], in_dim=6, tasks=TASKS)
    out = core(torch.randn(8, 6))
    assert list(out.task_reprs) == list(TASKS)
    loss = sum((r * (i + 1)).sum() for i, r in enumerate(out.task_reprs.values()))
    loss = loss + sum(out.aux_losses.values(), torch.zeros(()))
    loss.backward()
    assert all(p.grad is not None for p in core.parameters())
    # per-task modules: one entry per task, each under its escaped key
    per_task = [m for m in core.modules() if isinstance(m, NamedModules) and m._key_prefix == "task_"]
    assert (name in ("shared_bottom", "smes")) == (not per_task)
    for m in per_task:
        assert sorted(k for k, _ in m.named_children()) == sorted(module_key(t, "task_") for t in TASKS)


def test_home_group_and_task_outputs_differ_per_name() -> None:
    """The escaped keys address distinct modules: perturbing task `a.b`'s own experts
    changes only task `a.b`."""
    torch.manual_seed(1)
    core = build_core(CORES["home"], in_dim=6, tasks=TASKS).eval()
    x_BD = torch.randn(5, 6)
    before = core(x_BD).task_reprs
    with torch.no_grad():
        for p in core.task_experts["a.b"].parameters():
            p.add_(0.5)
    after = core(x_BD).task_reprs
    assert not torch.allclose(after["a.b"], before["a.b"])
    for t in TASKS:
        if t != "a.b":
            torch.testing.assert_close(after[t], before[t])


def test_smes_with_any_task_name_matches_its_reference() -> None:
    torch.manual_seed(2)
    core = build_core(CORES["smes"], in_dim=6, tasks=TASKS)
    x_BD = torch.randn(7, 6)
    out, ref = core(x_BD), reference_forward(core, x_BD)
    for t in TASKS:
        torch.testing.assert_close(out.task_reprs[t], ref[t], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(CORES))
def test_full_model_with_any_task_name(name: str) -> None:
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    spec = DatasetSpec(
        name="names",
        sparse=(SparseFeature(name="f", num_embeddings=10),),
        dense_names=("d",),
        tasks=TASKS,
        has_user_id=False,
    )
    torch.manual_seed(3)
    model = MultiTaskModel(spec, core_cfg=CORES[name], embedding_dim=4, tower=TowerConfig(hidden=[4]))
    sparse = KeyedJaggedTensor.from_lengths_sync(["f"], torch.arange(6) % 10, torch.ones(6, dtype=torch.int64))
    out = model(SimpleNamespace(dense=torch.randn(6, 1), sparse=sparse))
    assert list(out.logits) == list(TASKS) and all(v.shape == (6,) for v in out.logits.values())
    sum(v.sum() for v in out.logits.values()).backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith("towers."))
    keys = model.state_dict().keys()
    assert "towers.task_forward.mlp.0.weight" in keys and "towers.task_a%2Eb.mlp.0.weight" in keys
    assert "towers.task_a%252Eb.mlp.0.weight" in keys and "towers.task_.mlp.0.weight" in keys
    # state dicts round-trip into a fresh model
    fresh = MultiTaskModel(spec, core_cfg=CORES[name], embedding_dim=4, tower=TowerConfig(hidden=[4]))
    fresh.load_state_dict(model.state_dict())
    batch = SimpleNamespace(dense=torch.zeros(6, 1), sparse=sparse)
    fresh_out, ref_out = fresh(batch), model(batch)
    for t in TASKS:
        torch.testing.assert_close(fresh_out.logits[t], ref_out.logits[t])
