"""`SMESLayer.record_plan` / `last_plan` and `union_experts`: each instance's executed
experts, checked against the selections and pairs by plain Python sets.

Legend: B instances, T tasks, K experts per task, E experts, U slots.
"""

from __future__ import annotations

import pytest
import torch

from model.moe.router import union_experts
from model.smes import SMES, SMESConfig

TASKS = ("a", "b", "c")


def make_core(routing: str = "progressive", **kw) -> SMES:
    torch.manual_seed(0)
    cfg = SMESConfig(num_experts=8, shared_top_k=2, adaptive_top_k=1, routing=routing, expert_hidden=[8], **kw)
    return SMES(cfg, in_dim=6, tasks=TASKS)


def rows(table_BU: torch.Tensor) -> list[list[int]]:
    return [[e for e in row if e >= 0] for row in table_BU.tolist()]


@pytest.mark.parametrize("routing", ["progressive", "independent", "all"])
def test_union_is_the_set_of_selected_experts(routing: str) -> None:
    core = make_core(routing)
    core.eval()
    core.layer.record_plan = True
    with torch.no_grad():
        core(torch.randn(37, 6))
    plan = core.layer.last_plan
    assert plan is not None
    table_BU = union_experts(plan)
    assert table_BU.shape == (37, plan.table_width) and table_BU.dtype == torch.long
    want = [sorted(set(row)) for row in plan.experts_BTK.reshape(37, -1).tolist()]
    assert rows(table_BU) == want  # ascending, no duplicates
    for row, u in zip(table_BU.tolist(), want, strict=True):  # the experts fill the first |U| slots
        assert row[: len(u)] == u and all(e == -1 for e in row[len(u) :])
    sizes = [len(u) for u in want]
    if routing == "progressive":
        assert min(sizes) >= 3 and max(sizes) <= 2 + 3 * 1  # K_s + K_a <= |U| <= K_s + T*K_a
    if routing == "all":
        assert sizes == [8] * 37


def test_capacity_drops_are_absent_from_the_union() -> None:
    """In training with a capacity limit the union holds only the pairs that ran."""
    core = make_core(capacity_factor=0.5)
    core.layer.record_plan = True
    core(torch.randn(64, 6))
    plan = core.layer.last_plan
    assert plan is not None and int(plan.num_dropped) > 0
    ran = [set() for _ in range(64)]
    for b, e in zip(plan.pair_instance_N.tolist(), plan.pair_expert_N.tolist(), strict=True):
        ran[b].add(e)
    assert rows(union_experts(plan)) == [sorted(r) for r in ran]
    selected = [set(r) for r in plan.experts_BTK.reshape(64, -1).tolist()]
    assert any(r < s for r, s in zip(ran, selected, strict=True))  # some rows lost an expert


def test_recording_is_off_by_default_and_changes_nothing() -> None:
    core, x = make_core(), torch.randn(20, 6)
    assert core.layer.record_plan is False
    core.eval()
    with torch.no_grad():
        plain = core(x)
    assert core.layer.last_plan is None  # nothing kept
    core.layer.record_plan = True
    with torch.no_grad():
        recorded = core(x)
    first = core.layer.last_plan
    with torch.no_grad():
        core(x[:5])
    assert core.layer.last_plan is not first and core.layer.last_plan.probs_BTE.shape[0] == 5  # the latest
    for t in TASKS:
        torch.testing.assert_close(recorded.task_reprs[t], plain.task_reprs[t], rtol=0, atol=0)
