"""Balance loss, z-loss and the bias step.

Legend: B instances, T tasks, E experts.
"""

from __future__ import annotations

import math

import torch

from model.moe.losses import balance_loss, bias_update, router_z_loss
from model.smes import SMES, SMESConfig


def test_balance_loss_is_one_when_uniform() -> None:
    for E in (2, 8, 64):
        probs_BTE = torch.full((5, 3, E), 1.0 / E)
        counts_E = torch.full((E,), 7.0)
        assert math.isclose(float(balance_loss(probs_BTE, counts_E)), 1.0, rel_tol=1e-6)


def test_balance_loss_hand_computed() -> None:
    # E = 3, two instances, one task. P = mean probs = [0.5, 0.3, 0.2].
    probs_BTE = torch.tensor([[[0.6, 0.3, 0.1]], [[0.4, 0.3, 0.3]]])
    counts_E = torch.tensor([3, 1, 0])  # f = [0.75, 0.25, 0]
    expected = 3 * (0.75 * 0.5 + 0.25 * 0.3 + 0.0 * 0.2)  # = 1.35
    assert math.isclose(float(balance_loss(probs_BTE, counts_E)), expected, rel_tol=1e-6)


def test_balance_loss_gradient_is_f_times_e_over_bt() -> None:
    probs_BTE = torch.softmax(torch.randn(4, 2, 5), -1).requires_grad_()
    counts_E = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0])
    balance_loss(probs_BTE, counts_E).backward()
    f_E = counts_E / counts_E.sum()
    assert torch.allclose(probs_BTE.grad, (5 * f_E / 8).expand(4, 2, 5))


def test_z_loss_matches_definition() -> None:
    logits_BTE = torch.tensor([[[0.0, 0.0]], [[1.0, 2.0]]])
    lse = [math.log(2.0), math.log(math.exp(1) + math.exp(2))]
    assert math.isclose(float(router_z_loss(logits_BTE)), (lse[0] ** 2 + lse[1] ** 2) / 2, rel_tol=1e-6)


def test_bias_update_sign() -> None:
    delta_E = bias_update(torch.tensor([10.0, 0.0, 5.0]), rate=0.1)
    assert torch.allclose(delta_E, torch.tensor([-0.1, 0.1, 0.0]))


def test_gradients_reach_routers_through_mixing_and_balance() -> None:
    torch.manual_seed(0)
    tasks = ("a", "b", "c")
    core = SMES(SMESConfig(num_experts=8, expert_hidden=[16], balance_beta=0.5), in_dim=12, tasks=tasks)
    x_BD = torch.randn(32, 12)
    out = core(x_BD)
    gate_w = core.layer.router.gate.weight
    (g_mix,) = torch.autograd.grad(sum(r.sum() for r in out.task_reprs.values()), gate_w, retain_graph=True)
    (g_bal,) = torch.autograd.grad(out.aux_losses["balance"], gate_w)
    assert g_mix.abs().sum() > 0 and g_bal.abs().sum() > 0
    # the balance term is beta * E * sum_e f_e P_e, recomputed here from the router
    # probabilities with the progressive selection done by plain sorting
    E, T, Ks, Ka = 8, len(tasks), 2, 1
    p_BTE = torch.softmax((x_BD @ gate_w.T).view(32, T, E), -1).detach()
    counts = [0] * E
    for b in range(32):
        joint = [sum(p_BTE[b, t, e].item() / T for t in range(T)) for e in range(E)]
        shared = sorted(range(E), key=lambda e: -joint[e])[:Ks]
        for t in range(T):
            own = sorted((e for e in range(E) if e not in shared), key=lambda e: -p_BTE[b, t, e].item())[:Ka]
            for e in shared + own:
                counts[e] += 1
    f_E = torch.tensor(counts, dtype=torch.float32) / (32 * T * (Ks + Ka))
    expected = 0.5 * E * float((f_E * p_BTE.mean((0, 1))).sum())
    assert math.isclose(out.aux_losses["balance"].item(), expected, rel_tol=1e-5), expected


def test_count_reducer_sees_a_detached_copy_and_sets_f() -> None:
    torch.manual_seed(0)
    core = SMES(
        SMESConfig(num_experts=4, shared_top_k=1, adaptive_top_k=1, expert_hidden=[8], balance_beta=1.0),
        in_dim=6,
        tasks=("a", "b"),
    )
    seen = []

    def reducer(counts_E: torch.Tensor) -> torch.Tensor:
        seen.append(counts_E)
        assert not counts_E.requires_grad
        counts_E.zero_()  # in-place on the copy must not touch the logged counts
        return counts_E + torch.tensor([1.0, 0.0, 0.0, 0.0])  # f = e_0

    core.layer.count_reducer = reducer
    x_BD = torch.randn(10, 6)
    out = core(x_BD)
    assert len(seen) == 1
    assert out.load.counts_TE.sum() == 10 * 2 * 2
    probs_BTE = torch.softmax(core.layer.router.gating(x_BD), -1)
    assert torch.allclose(out.aux_losses["balance"], 4 * probs_BTE[..., 0].mean())
