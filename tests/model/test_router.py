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
    max_union,
    read_local_sizes,
    renormalised_weights,
    select_independent,
    select_progressive,
    selection_counts,
    sparse_plan,
)
from model.smes import SMESConfig


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
    experts_BTK = select_progressive(probs_BTE, w_T, shared_top_k=Ks, adaptive_top_k=Ka)
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
    w_BTK = renormalised_weights(experts_BTK, logits_BTE=probs_BTE.log())
    assert torch.allclose(w_BTK.sum(-1), torch.ones(B, T), atol=1e-5)
    assert bool((w_BTK > 0).all())


def brute_force_pairs(experts_BTK: torch.Tensor) -> dict:
    """The executed pairs of a selection by plain Python: every instance's distinct
    experts, ordered by (expert, instance); each selection's pair row, and its slot (the
    rank of its expert among its instance's distinct experts)."""
    B, T, K = experts_BTK.shape
    sel = experts_BTK.tolist()
    union = [sorted({e for t in range(T) for e in sel[b][t]}) for b in range(B)]
    pairs = sorted((e, b) for b in range(B) for e in union[b])
    row = {pair: n for n, pair in enumerate(pairs)}
    return dict(
        pair_instance_N=[b for _, b in pairs],
        pair_expert_N=[e for e, _ in pairs],
        pair_slot_N=[union[b].index(e) for e, b in pairs],
        pair_index_BTK=[[[row[(e, b)] for e in sel[b][t]] for t in range(T)] for b in range(B)],
        slot_BTK=[[[union[b].index(e) for e in sel[b][t]] for t in range(T)] for b in range(B)],
    )


@settings(max_examples=40, deadline=None)
@given(routing_case())
def test_plan_pairs_equal_the_brute_force_reference(case) -> None:
    """The router's pairs (`sparse_plan`, the one deduplication): each (instance, expert)
    pair of the selection once, expert-contiguous, every slot reading its own pair."""
    probs_BTE, w_T, Ks, Ka = case
    B, T, E = probs_BTE.shape
    experts_BTK = select_progressive(probs_BTE, w_T, shared_top_k=Ks, adaptive_top_k=Ka)
    bound = max_union("progressive", num_experts=E, num_tasks=T, shared_top_k=Ks, adaptive_top_k=Ka)
    plan = sparse_plan(probs_BTE.log(), probs_BTE, experts_BTK, table_width=bound, read_sizes=read_local_sizes)
    ref = brute_force_pairs(experts_BTK)
    for key, want in ref.items():
        assert getattr(plan, key).tolist() == want, key
    assert plan.counts_E.tolist() == [ref["pair_expert_N"].count(e) for e in range(E)]
    assert plan.num_pairs == plan.sizes.num_pairs == len(ref["pair_expert_N"])
    assert plan.table_width == bound and int(plan.num_dropped) == 0
    assert plan.num_pairs == 0 or int(plan.pair_slot_N.max()) < bound
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
    prog = select_progressive(probs_BTE, torch.full((T,), 1 / T), shared_top_k=Ks, adaptive_top_k=Ka)
    assert len(set(indep.flatten().tolist())) == T * (Ks + Ka) == 12
    assert len(set(prog.flatten().tolist())) <= Ks + T * Ka == 6


def test_selection_bias_changes_selection_not_weights() -> None:
    torch.manual_seed(0)
    router = Router(
        8,
        num_experts=6,
        num_tasks=3,
        shared_top_k=1,
        adaptive_top_k=1,
        routing="progressive",
        selection_weights=[1 / 3] * 3,
    )
    x_BD = torch.randn(50, 8)
    bias_E = torch.tensor([10.0, 0, 0, 0, 0, 0])
    plan = router(x_BD, bias_E)
    assert bool((plan.experts_BTK[..., 0] == 0).all())  # expert 0 always in S
    p_BTK = plan.probs_BTE.gather(-1, plan.experts_BTK)
    assert torch.allclose(plan.weights_BTK, p_BTK / p_BTK.sum(-1, keepdim=True))


@pytest.mark.parametrize("factor", [0.3, 1.0, 10.0])
def test_capacity_drops_beyond_the_limit(factor: float) -> None:
    torch.manual_seed(1)
    B, T, E = 64, 4, 8
    kw = dict(num_experts=E, num_tasks=T, shared_top_k=2, adaptive_top_k=1, routing="progressive")
    router = Router(8, **kw, selection_weights=[0.25] * T, capacity_factor=factor)
    x_BD = torch.randn(B, 8) * 3
    full = Router(8, **kw, selection_weights=[0.25] * T)
    full.load_state_dict(router.state_dict())
    ref, plan = full(x_BD), router(x_BD)
    N, N_kept = ref.num_pairs, plan.num_pairs
    capacity = math.ceil(factor * N / E)
    assert int(plan.counts_E.max()) <= capacity and int(plan.counts_E.sum()) == N_kept
    assert int(plan.num_dropped) == N - N_kept == int((ref.counts_E - capacity).clamp(min=0).sum())
    assert plan.table_width == ref.table_width + 1
    kept_BTK = plan.pair_index_BTK < N_kept
    assert int((~kept_BTK).sum()) >= int(plan.num_dropped)
    assert torch.equal(plan.pair_expert_N[plan.pair_index_BTK[kept_BTK]], plan.experts_BTK[kept_BTK])
    assert torch.equal(plan.pair_slot_N[plan.pair_index_BTK[kept_BTK]], plan.slot_BTK[kept_BTK])
    assert bool((plan.slot_BTK[~kept_BTK] == plan.table_width - 1).all())


def reference_plan(experts_BTK: torch.Tensor, E: int, capacity_factor: float | None) -> dict:
    """The plan as the router computed it before it went sync-free: `torch.unique`,
    `bincount`, boolean compaction (the content must not change, only how)."""
    B = experts_BTK.shape[0]
    key_BTK = experts_BTK * B + torch.arange(B).view(B, 1, 1)
    key_N, index = torch.unique(key_BTK.reshape(-1), sorted=True, return_inverse=True)
    exp_N, index_BTK = key_N // B, index.view_as(experts_BTK)
    inst_N, counts_E = key_N - exp_N * B, torch.bincount(exp_N, minlength=E)
    order_N = torch.argsort(inst_N, stable=True)
    start_B = torch.cumsum(torch.bincount(inst_N, minlength=B), 0) - torch.bincount(inst_N, minlength=B)
    slot_N = torch.empty_like(inst_N)
    slot_N[order_N] = torch.arange(len(inst_N)) - start_B[inst_N[order_N]]
    slot_BTK, dropped = slot_N[index_BTK], torch.zeros(index_BTK.shape, dtype=torch.bool)
    num_dropped = 0
    if capacity_factor is not None:
        N = len(key_N)
        rank_N = torch.arange(N) - (torch.cumsum(counts_E, 0) - counts_E)[exp_N]
        keep_N = rank_N < math.ceil(capacity_factor * N / E)
        new_N = torch.where(keep_N, torch.cumsum(keep_N, 0) - 1, int(keep_N.sum()))
        index_BTK, dropped = new_N[index_BTK], ~keep_N[index_BTK]
        inst_N, exp_N, slot_N = inst_N[keep_N], exp_N[keep_N], slot_N[keep_N]
        counts_E, num_dropped = torch.bincount(exp_N, minlength=E), N - int(keep_N.sum())
    return dict(
        pair_instance_N=inst_N,
        pair_expert_N=exp_N,
        counts_E=counts_E,
        pair_index_BTK=index_BTK,
        pair_slot_N=slot_N,
        slot_BTK=slot_BTK,
        dropped_BTK=dropped,
        num_dropped=num_dropped,
    )


@settings(max_examples=40, deadline=None)
@given(routing_case(), st.sampled_from(["progressive", "independent"]), st.sampled_from([None, 0.3, 1.0, 2.5]))
def test_plan_content_equals_the_unique_reference(case, routing: str, capacity_factor: float | None) -> None:
    """Same pairs, same order, same counts, rows and slots as the `torch.unique` plan."""
    probs_BTE, w_T, Ks, Ka = case
    B, T, E = probs_BTE.shape
    torch.manual_seed(B * 31 + E)
    router = Router(4, num_experts=E, num_tasks=T, shared_top_k=Ks, adaptive_top_k=Ka, routing=routing,
                    selection_weights=w_T.tolist(), capacity_factor=capacity_factor)  # fmt: skip
    plan = router(torch.randn(B, 4) * 3)
    ref = reference_plan(plan.experts_BTK, E, capacity_factor)
    for key in ("pair_instance_N", "pair_expert_N", "counts_E", "pair_index_BTK", "pair_slot_N"):
        assert torch.equal(getattr(plan, key), ref[key]), key
    kept_BTK = ~ref["dropped_BTK"]
    assert torch.equal(plan.slot_BTK[kept_BTK], ref["slot_BTK"][kept_BTK])
    assert bool((plan.slot_BTK[~kept_BTK] == plan.table_width - 1).all())
    assert int(plan.num_dropped) == ref["num_dropped"]
    assert plan.sizes.num_pairs == plan.num_pairs == int(plan.counts_E.sum())
    bound = router.max_union + (capacity_factor is not None)
    assert plan.table_width == bound
    assert plan.num_pairs == 0 or int(plan.pair_slot_N.max()) < router.max_union


def test_eval_is_dropless_whatever_the_batch() -> None:
    """With a capacity factor, evaluation outputs of a row do not depend on the rows it is
    batched with (e.g. weight-0 padding rows); training still drops."""
    torch.manual_seed(7)
    E, T = 8, 3
    router = Router(6, num_experts=E, num_tasks=T, shared_top_k=2, adaptive_top_k=1, routing="progressive",
                    selection_weights=[1 / T] * T, capacity_factor=0.5)  # fmt: skip
    real_BD = torch.randn(12, 6)
    padding_BD = torch.zeros(40, 6)  # a padded last batch: identical rows, all on the same experts
    others_BD = torch.randn(30, 6) * 4
    router.eval()
    alone = router(real_BD)
    padded = router(torch.cat([real_BD, padding_BD]))
    mixed = router(torch.cat([others_BD, real_BD]))
    for plan in (alone, padded, mixed):
        assert int(plan.num_dropped) == 0
    assert torch.equal(padded.pair_index_BTK[:12] < padded.num_pairs, torch.ones(12, T, 3, dtype=torch.bool))
    router.train()
    assert int(router(torch.cat([real_BD, padding_BD])).num_dropped) > 0


def test_mixing_weights_survive_underflowing_probabilities() -> None:
    """Experts put in the set by a large selection bias, with probabilities that underflow
    to 0 in fp32: the weights stay finite and equal the exact (fp64) renormalisation."""
    logits_BTE = torch.tensor([[[0.0, -150.0, -151.0, -152.0]]])  # p_1..p_3 ~ 1e-66 -> 0 in fp32
    assert float(torch.softmax(logits_BTE, -1)[0, 0, 1]) == 0.0
    experts_BTK = torch.tensor([[[1, 2]]])
    w_BTK = renormalised_weights(experts_BTK, logits_BTE=logits_BTE)
    p64_BTE = torch.softmax(logits_BTE.double(), -1)
    exact_BTK = p64_BTE.gather(-1, experts_BTK) / p64_BTE.gather(-1, experts_BTK).sum(-1, keepdim=True)
    assert bool(torch.isfinite(w_BTK).all())
    torch.testing.assert_close(w_BTK.double(), exact_BTK, rtol=1e-6, atol=1e-7)
    # through the router: a selection bias picks experts 1 and 2 for every task
    router = Router(1, num_experts=4, num_tasks=1, shared_top_k=1, adaptive_top_k=1, routing="progressive",
                    selection_weights=[1.0])  # fmt: skip
    with torch.no_grad():
        router.gate.weight.copy_(torch.tensor([[0.0], [-150.0], [-151.0], [-152.0]]))
    plan = router(torch.ones(1, 1), torch.tensor([0.0, 200.0, 199.0, 0.0]))  # log-space bias past the gap
    assert sorted(plan.experts_BTK.flatten().tolist()) == [1, 2]
    assert bool(torch.isfinite(plan.weights_BTK).all())
    torch.testing.assert_close(plan.weights_BTK.sort(-1).values.double(), exact_BTK.sort(-1).values, rtol=1e-6, atol=0)


@settings(max_examples=30, deadline=None)
@given(routing_case())
def test_mixing_weights_equal_renormalised_probabilities(case) -> None:
    probs_BTE, w_T, Ks, Ka = case
    logits_BTE = probs_BTE.log() + torch.randn(probs_BTE.shape[:2] + (1,))  # any shift per task
    experts_BTK = select_progressive(torch.softmax(logits_BTE, -1), w_T, shared_top_k=Ks, adaptive_top_k=Ka)
    p_BTK = torch.softmax(logits_BTE, -1).gather(-1, experts_BTK)
    w_BTK = renormalised_weights(experts_BTK, logits_BTE=logits_BTE)
    torch.testing.assert_close(w_BTK, p_BTK / p_BTK.sum(-1, keepdim=True), rtol=1e-6, atol=1e-7)


def _biased_share(num_experts: int, steps: int, rate: float, *, additive: bool = False) -> float:
    """Fraction of instances that select expert 0 after `steps` one-sided bias updates."""
    torch.manual_seed(0)
    router = Router(4, num_experts=num_experts, num_tasks=2, shared_top_k=2, adaptive_top_k=1, routing="progressive",
                    selection_weights=[0.5, 0.5])  # fmt: skip
    logits_BTE = torch.randn(4096, 2, num_experts)
    bias_E = torch.zeros(num_experts)
    bias_E[0] = steps * rate
    probs_BTE = torch.softmax(logits_BTE, -1)
    if additive:  # the old rule: the bias added to the probabilities
        w_T = router.task_weights_T
        experts = select_progressive(probs_BTE + bias_E, w_T, shared_top_k=2, adaptive_top_k=1)
    else:
        experts = router.select(probs_BTE, bias_E, logits_BTE=logits_BTE)
    return float((experts == 0).any(-1).any(-1).float().mean())


def test_selection_bias_is_scale_free_in_the_number_of_experts() -> None:
    """30 one-sided steps of the default rate: expert 0's share grows by a similar factor at
    E = 16 and E = 256 (log-space bias). A bias added to the probabilities (mean 1/E) in
    steps of 1e-3 made expert 0 the choice of nearly every instance at E = 256."""
    rate = SMESConfig().bias_update_rate
    growth = {E: _biased_share(E, 30, rate) / _biased_share(E, 0, rate) for E in (16, 256)}
    assert growth[16] > 1.1 and growth[256] < 2 * growth[16], growth
    assert _biased_share(256, 30, rate) < 0.1
    assert _biased_share(256, 30, 1e-3, additive=True) > 0.9  # the old rule overrode the router
    assert _biased_share(16, 30, 1e-3, additive=True) == pytest.approx(_biased_share(16, 30, rate), abs=0.03)


def test_router_input_norm_reads_every_input_scale_alike() -> None:
    """`input_norm` (model.router_norm=layernorm): the logits do not change when the whole
    input is rescaled or shifted, and a column at 100x scale no longer dominates them;
    without it they do."""
    torch.manual_seed(0)
    kw = dict(num_experts=8, num_tasks=2, shared_top_k=1, adaptive_top_k=1, routing="progressive")
    kw["selection_weights"] = [0.5, 0.5]
    normed, plain = Router(6, input_norm=True, **kw), Router(6, **kw)
    plain.gate.weight.data.copy_(normed.gate.weight.data)
    x = torch.randn(32, 6)
    torch.testing.assert_close(normed.gating(3.0 * x + 2.0), normed.gating(x), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(plain.gating(3.0 * x + 2.0), plain.gating(x), atol=1e-2)
    assert normed.norm is not None and plain.norm is None
    assert {n for n, _ in normed.named_parameters()} == {"gate.weight", "norm.weight", "norm.bias"}


def test_router_norm_config_is_checked() -> None:
    from model.smes import validate_smes_config

    with pytest.raises(ValueError, match="model.router_norm"):
        validate_smes_config(SMESConfig(router_norm="batchnorm"), num_tasks=2)
