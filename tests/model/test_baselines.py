"""Dense baselines: shapes and gradient flow for SharedBottom, MMoE and PLE.

Legend: B instances, D input width, H output width.
"""

from __future__ import annotations

import pytest
import torch

from model.baselines import PLE, MMoE, MMoEConfig, PLEConfig, SharedBottom, SharedBottomConfig

TASKS = ("ctr", "cvr", "like")


@pytest.mark.parametrize(
    ("core_cls", "cfg"),
    [
        (SharedBottom, SharedBottomConfig(hidden=[16, 8])),
        (MMoE, MMoEConfig(num_experts=4, expert_hidden=[16, 8])),
        (PLE, PLEConfig(num_levels=1, num_shared_experts=2, num_task_experts=1, expert_hidden=[16, 8])),
        (PLE, PLEConfig(num_levels=2, num_shared_experts=2, num_task_experts=2, expert_hidden=[16, 8])),
    ],
    ids=["shared_bottom", "mmoe", "ple1", "ple2"],
)
def test_shapes_and_gradients(core_cls, cfg) -> None:
    torch.manual_seed(0)
    core = core_cls(cfg, in_dim=12, tasks=TASKS)
    out = core(torch.randn(5, 12))
    assert out.load is None and out.aux_losses == {}
    assert set(out.task_reprs) == set(TASKS)
    assert all(r.shape == (5, core.out_dim) == (5, 8) for r in out.task_reprs.values())
    sum((r * torch.randn_like(r)).sum() for r in out.task_reprs.values()).backward()
    missing = [n for n, p in core.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_ple_two_levels_feeds_the_shared_gate() -> None:
    core = PLE(PLEConfig(num_levels=2, expert_hidden=[8]), in_dim=6, tasks=TASKS)
    assert core.levels[0].shared_gate is not None and core.levels[1].shared_gate is None
    assert core.levels[1].shared[0][0].in_features == core.levels[0].out_dim


def test_mmoe_is_the_gated_mixture_of_experts() -> None:
    torch.manual_seed(1)
    core = MMoE(MMoEConfig(num_experts=3, expert_hidden=[4]), in_dim=5, tasks=TASKS)
    x_BD = torch.randn(7, 5)
    y_BEH = torch.stack([e(x_BD) for e in core.experts], 1)
    for t in TASKS:
        w_BE = torch.softmax(core.gates[t](x_BD), -1)
        torch.testing.assert_close(core(x_BD).task_reprs[t], (w_BE[..., None] * y_BEH).sum(1))


@pytest.mark.parametrize(
    ("core_cls", "cfg", "key"),
    [
        (MMoE, MMoEConfig(num_experts=0), "model.num_experts"),
        (PLE, PLEConfig(num_levels=0), "model.num_levels"),
    ],
)
def test_config_errors(core_cls, cfg, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        core_cls(cfg, in_dim=4, tasks=TASKS)
