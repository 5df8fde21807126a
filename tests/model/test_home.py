"""HoME core: shapes, hierarchy mask, gates, config, training on skewed tasks.

Legend: B instances, D input width, H output width.
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from model.build import CORES, build_core
from model.home import HoME, HoMEConfig
from tests.model.test_smes import train_core

TASKS = ("watch", "long_view", "like", "follow")
GROUPS = {"watch_type": ["watch", "long_view"], "interaction": ["like", "follow"]}


def make_home(**kw) -> HoME:
    kw.setdefault("expert_hidden", [16, 8])
    return HoME(HoMEConfig(**kw), in_dim=12, tasks=TASKS)


@pytest.mark.parametrize("groups", [None, GROUPS])
@pytest.mark.parametrize(("rank", "self_gate"), [(0, False), (4, True)])
def test_shapes_and_every_parameter_gets_a_gradient(groups, rank: int, self_gate: bool) -> None:
    torch.manual_seed(0)
    core = make_home(task_groups=groups, feature_gate_rank=rank, self_gate=self_gate)
    out = core(torch.randn(10, 12))
    assert out.load is None and out.aux_losses == {}
    assert all(r.shape == (10, core.out_dim) == (10, 8) for r in out.task_reprs.values())
    # step once so that the zero-initialised feature-gate B moves and A gets gradient too
    opt = torch.optim.SGD(core.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        out = core(torch.randn(10, 12))
        sum((r * torch.randn_like(r)).sum() for r in out.task_reprs.values()).backward()
        opt.step()
    missing = [n for n, p in core.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_hierarchy_mask_isolates_groups() -> None:
    """A group's private experts change only that group's tasks."""
    torch.manual_seed(1)
    core = make_home(task_groups=GROUPS).eval()
    x_BD = torch.randn(6, 12)
    before = core(x_BD).task_reprs
    with torch.no_grad():
        for p in core.meta_group["interaction"].parameters():
            p.add_(1.0)
        for p in core.group_experts["interaction"].parameters():
            p.add_(1.0)
    after = core(x_BD).task_reprs
    for t in GROUPS["watch_type"]:
        torch.testing.assert_close(after[t], before[t])
    for t in GROUPS["interaction"]:
        assert not torch.allclose(after[t], before[t])


def test_feature_gates_start_at_identity_and_experts_are_normalised() -> None:
    torch.manual_seed(2)
    core = make_home(feature_gate_rank=4)
    bank = core.meta_global
    x_BD = 3 * torch.randn(64, 12) + 1
    gate_MBD = 2 * torch.sigmoid(torch.bmm(torch.matmul(x_BD, bank.gate_a_MDR), bank.gate_b_MRD))
    assert torch.allclose(gate_MBD, torch.ones_like(gate_MBD))
    seen = {}
    bank.norm.register_forward_hook(lambda m, args, out: seen.update(pre=args[0].detach(), z=out.detach()))
    y_MBH = bank(x_BD)  # training mode: batch statistics, then Swish
    M, B, H = y_MBH.shape
    pre_BX, z_BX = seen["pre"], seen["z"]
    assert z_BX.shape == (B, M * H)
    # the expert outputs were not normalised to begin with, so the check below means something
    assert pre_BX.mean(0).abs().max() > 0.05 or (pre_BX.var(0, unbiased=False) - 1).abs().max() > 0.2
    # normalised per feature (every expert's every unit): mean 0, variance 1 over the batch
    torch.testing.assert_close(z_BX.mean(0), torch.zeros(M * H), atol=1e-5, rtol=0)
    torch.testing.assert_close(z_BX.var(0, unbiased=False), torch.ones(M * H), atol=1e-3, rtol=0)
    # Swish after the norm, per expert: y = z * sigmoid(z), laid out [M, B, H]
    want_MBH = (z_BX * torch.sigmoid(z_BX)).view(B, M, H).transpose(0, 1)
    torch.testing.assert_close(y_MBH, want_MBH)
    assert y_MBH.min() < -0.2  # Swish dips below zero (ReLU or a sigmoid would not)
    assert bank.norm.num_batches_tracked.item() == 1
    torch.testing.assert_close(bank.norm.running_mean, 0.1 * pre_BX.mean(0))


@pytest.mark.parametrize(
    ("kw", "key"),
    [
        ({"task_groups": {"a": ["watch"]}}, "model.task_groups"),
        ({"task_groups": {"a": ["watch", "long_view", "like", "follow"], "b": []}}, "model.task_groups"),
        ({"num_meta_experts": 0}, "model.num_meta_experts"),
        (
            {"num_shared_experts": 0, "experts_per_group": 0, "num_task_experts": 0},
            "model.num_shared_experts",
        ),
        ({"feature_gate_rank": -1}, "model.feature_gate_rank"),
    ],
)
def test_config_errors_name_the_key(kw: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        make_home(**kw)


def test_registered_and_structured_config() -> None:
    assert CORES["home"] == (HoMEConfig, HoME)
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(HoMEConfig), {"task_groups": GROUPS}))
    assert isinstance(build_core(cfg, in_dim=12, tasks=TASKS), HoME)


def test_home_trains_on_eight_skewed_tasks() -> None:
    tasks = tuple(f"task{i}" for i in range(8))
    groups = {"head": list(tasks[:4]), "tail": list(tasks[4:])}
    core = HoME(HoMEConfig(expert_hidden=[32], feature_gate_rank=4, task_groups=groups), in_dim=16, tasks=tasks)
    first, last, aucs = train_core(core, tasks)
    assert last < 0.8 * first, (first, last)
    assert min(aucs) > 0.85, aucs
