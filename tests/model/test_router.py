"""Property tests of the routing math: selection sets, bounded activation, the plan.

Legend: B instances, T tasks, E experts, K experts per task, N pairs.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.moe.router import (
    Router,
    deduplicate,
    instance_slots,
    renormalised_weights,
    select_independent,
    select_progressive,
    selection_counts,
)


@st.composite
def routing_case(draw):
    E = draw(st.integers(1, 24))
    K = draw(st.integers(1, E))
    Ks = draw(st.integers(0, K))
    T = draw(st.integers(1, 6))
    B = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    probs_BTE = torch.softmax(torch.randn(B, T, E, generator=g) * 3, dim=-1)
    w_T = torch.rand(T, generator=g) + 0.1
    return probs_BTE, w_T, Ks, K - Ks


@settings(max_examples=60, deadline=None)
@given(routing_case())
def test_progressive_sets_are_bounded(case) -> None:
    probs_BTE, w_T, Ks, Ka = case
    B, T, _ = probs_BTE.shape
    experts_BTK = select_progressive(probs_BTE, w_T, num_shared=Ks, num_adaptive=Ka)
    assert experts_BTK.shape == (B, T, Ks + Ka)
    # exactly K_s + K_a distinct experts per (instance, task)
    sorted_BTK = experts_BTK.sort(-1).values
    assert bool((sorted_BTK[..., 1:] != sorted_BTK[..., :-1]).all())
    # S is shared by all tasks and is the top-K_s of the weighted joint score
    shared_BTS = experts_BTK[..., :Ks]
    assert torch.equal(shared_BTS, shared_BTS[:, :1].expand_as(shared_BTS))
    if Ks:
        joint_BE = torch.einsum("t,bte->be", w_T, probs_BTE)
        kth_B = joint_BE.topk(Ks, -1).values[:, -1]
        assert bool((joint_BE.gather(1, shared_BTS[:, 0]) >= kth_B[:, None]).all())
    # bounded activation
    union_B = [len(set(experts_BTK[b].flatten().tolist())) for b in range(B)]
    assert all(Ks + Ka <= u <= Ks + T * Ka for u in union_B)
    # mixing weights sum to one over the set
    w_BTK = renormalised_weights(probs_BTE, experts_BTK)
    assert torch.allclose(w_BTK.sum(-1), torch.ones(B, T), atol=1e-5)
    assert bool((w_BTK > 0).all())


@settings(max_examples=40, deadline=None)
@given(routing_case())
def test_dedup_plan_is_expert_contiguous_and_consistent(case) -> None:
    probs_BTE, w_T, Ks, Ka = case
    B, T, E = probs_BTE.shape
    experts_BTK = select_progressive(probs_BTE, w_T, num_shared=Ks, num_adaptive=Ka)
    inst_N, exp_N, counts_E, index_BTK = deduplicate(experts_BTK, E)
    assert bool((exp_N[1:] >= exp_N[:-1]).all())  # expert-contiguous
    pairs = list(zip(inst_N.tolist(), exp_N.tolist(), strict=True))
    assert len(pairs) == len(set(pairs))  # each pair computed once
    expected = {(b, e) for b in range(B) for e in experts_BTK[b].flatten().tolist()}
    assert set(pairs) == expected
    assert torch.equal(counts_E, torch.bincount(exp_N, minlength=E))
    # every slot reads its own (instance, expert) pair
    assert torch.equal(exp_N[index_BTK], experts_BTK)
    assert torch.equal(inst_N[index_BTK], torch.arange(B).view(B, 1, 1).expand_as(experts_BTK))
    # per-instance slots: distinct inside an instance, dense from 0
    slot_N, num_slots = instance_slots(inst_N, B)
    assert num_slots == max(len({e for e in experts_BTK[b].flatten().tolist()}) for b in range(B))
    assert len(set(zip(inst_N.tolist(), slot_N.tolist(), strict=True))) == inst_N.shape[0]
    assert int(slot_N.min()) == 0 and int(slot_N.max()) == num_slots - 1
    counts_TE = selection_counts(experts_BTK, E)
    assert counts_TE.sum().item() == B * T * (Ks + Ka)
    assert torch.equal(counts_TE.sum(1), torch.full((T,), float(B * (Ks + Ka))))


def test_independent_can_exceed_the_bound() -> None:
    """Four tasks that like disjoint experts: independent |U| = T*K > K_s + T*K_a."""
    T, E, Ks, Ka = 4, 16, 2, 1
    logits_BTE = torch.full((1, T, E), -5.0)
    for t in range(T):
        logits_BTE[0, t, 3 * t : 3 * t + 3] = torch.tensor([3.0, 2.0, 1.0])
    probs_BTE = torch.softmax(logits_BTE, -1)
    indep = select_independent(probs_BTE, k=Ks + Ka)
    prog = select_progressive(probs_BTE, torch.full((T,), 1 / T), num_shared=Ks, num_adaptive=Ka)
    assert len(set(indep.flatten().tolist())) == T * (Ks + Ka) == 12
    assert len(set(prog.flatten().tolist())) <= Ks + T * Ka == 6


def test_selection_bias_changes_selection_not_weights() -> None:
    torch.manual_seed(0)
    router = Router(
        8,
        num_experts=6,
        num_tasks=3,
        num_shared=1,
        num_adaptive=1,
        routing="progressive",
        task_weights=[1 / 3] * 3,
    )
    x_BD = torch.randn(50, 8)
    bias_E = torch.tensor([10.0, 0, 0, 0, 0, 0])
    plan = router(x_BD, bias_E)
    assert bool((plan.experts_BTK[..., 0] == 0).all())  # expert 0 always in S
    assert torch.allclose(plan.weights_BTK, renormalised_weights(plan.probs_BTE, plan.experts_BTK))


@pytest.mark.parametrize("factor", [0.3, 1.0, 10.0])
def test_capacity_drops_beyond_the_limit(factor: float) -> None:
    torch.manual_seed(1)
    B, T, E = 64, 4, 8
    kw = dict(num_experts=E, num_tasks=T, num_shared=2, num_adaptive=1, routing="progressive")
    router = Router(8, **kw, task_weights=[0.25] * T, capacity_factor=factor)
    x_BD = torch.randn(B, 8) * 3
    full = Router(8, **kw, task_weights=[0.25] * T)
    full.load_state_dict(router.state_dict())
    ref, plan = full(x_BD), router(x_BD)
    N, N_kept = ref.num_pairs, plan.num_pairs
    capacity = math.ceil(factor * N / E)
    assert int(plan.counts_E.max()) <= capacity and int(plan.counts_E.sum()) == N_kept
    assert int(plan.num_dropped) == N - N_kept == int((ref.counts_E - capacity).clamp(min=0).sum())
    assert plan.num_slots == ref.num_slots + 1
    kept_BTK = plan.pair_index_BTK < N_kept
    assert int((~kept_BTK).sum()) >= int(plan.num_dropped)
    assert torch.equal(plan.pair_expert_N[plan.pair_index_BTK[kept_BTK]], plan.experts_BTK[kept_BTK])
    assert torch.equal(plan.pair_slot_N[plan.pair_index_BTK[kept_BTK]], plan.slot_BTK[kept_BTK])
    assert bool((plan.slot_BTK[~kept_BTK] == plan.num_slots - 1).all())
