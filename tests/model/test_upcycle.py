"""Growing an expert pool (model/moe/upcycle.py): exact copies at noise 0, seeded
perturbations otherwise, and an MMoE core converted into an SMES one that computes the same."""

from __future__ import annotations

import pytest
import torch

from model.baselines import MMoE, MMoEConfig
from model.moe.upcycle import mmoe_to_smes, upcycle_smes
from model.smes import SMES, SMESConfig

TASKS = ("a", "b", "c")
D = 12


def _smes(num_experts: int, **kw: object) -> SMES:
    return SMES(SMESConfig(num_experts=num_experts, expert_hidden=[8, 6], **kw), in_dim=D, tasks=TASKS)  # type: ignore[arg-type]


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {f"core.{k}": tuple(v.shape) for k, v in model.state_dict().items()}


def _prefixed(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"core.{k}": v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("factor", [2, 3])
def test_every_copy_equals_its_source_expert_at_noise_zero(factor: int) -> None:
    torch.manual_seed(0)
    small, big = _smes(4), _smes(4 * factor)
    with torch.no_grad():
        small.layer.expert_bias_E.copy_(torch.randn(4))
    grown, k = upcycle_smes(_prefixed(small), _shapes(big), num_tasks=len(TASKS), noise=0.0, seed=1)
    assert k == factor
    src = small.layer.experts
    for i, (w, b) in enumerate(zip(src.weights, src.biases, strict=True)):
        gw, gb = grown[f"core.layer.dispatcher.experts.weights.{i}"], grown[f"core.layer.dispatcher.experts.biases.{i}"]
        for j in range(4 * factor):
            assert torch.equal(gw[j], w[j % 4]) and torch.equal(gb[j], b[j % 4])
    gate = grown["core.layer.router.gate.weight"].view(len(TASKS), 4 * factor, D)
    src_gate = small.layer.router.gate.weight.view(len(TASKS), 4, D)
    for j in range(4 * factor):
        assert torch.equal(gate[:, j], src_gate[:, j % 4])
    assert torch.equal(grown["core.layer.expert_bias_E"], small.layer.expert_bias_E.repeat(factor))
    big.load_state_dict({k[len("core.") :]: v for k, v in grown.items()})  # every shape fits


def test_copies_are_perturbed_by_a_seeded_noise_and_the_first_stays_exact() -> None:
    torch.manual_seed(0)
    small, big = _smes(4), _smes(8)
    state, shapes = _prefixed(small), _shapes(big)
    one, _ = upcycle_smes(state, shapes, num_tasks=3, noise=0.01, seed=5)
    two, _ = upcycle_smes(state, shapes, num_tasks=3, noise=0.01, seed=5)
    other, _ = upcycle_smes(state, shapes, num_tasks=3, noise=0.01, seed=6)
    key = "core.layer.dispatcher.experts.weights.0"
    w = state[key]
    assert torch.equal(one[key][:4], w)  # copy 0
    diff = (one[key][4:] - w).abs()
    assert 0 < float(diff.max()) < 0.1 * float(w.abs().max())  # small
    assert torch.equal(one[key], two[key]) and not torch.equal(one[key], other[key])  # seeded
    gate = one["core.layer.router.gate.weight"].view(3, 8, D)
    assert torch.equal(gate[:, :4], small.layer.router.gate.weight.view(3, 4, D)) and not torch.equal(
        gate[:, 4:], gate[:, :4]
    )


def test_a_pool_grows_by_a_whole_factor_only() -> None:
    with pytest.raises(ValueError, match="model.num_experts"):
        upcycle_smes(_prefixed(_smes(4)), _shapes(_smes(6)), num_tasks=3, noise=0.0, seed=0)
    with pytest.raises(ValueError, match="model.num_experts"):
        upcycle_smes(_prefixed(_smes(8)), _shapes(_smes(4)), num_tasks=3, noise=0.0, seed=0)


def test_an_mmoe_core_becomes_an_smes_core_computing_the_same() -> None:
    torch.manual_seed(0)
    mmoe = MMoE(MMoEConfig(num_experts=4, expert_hidden=[8, 6], dropout=0.1), in_dim=D, tasks=TASKS).eval()
    smes = _smes(4, routing="all", router_bias=True).eval()
    state, notes = mmoe_to_smes(_prefixed(mmoe), _shapes(smes), tasks=TASKS)
    assert notes == []
    smes.load_state_dict({k[len("core.") :]: v for k, v in state.items()}, strict=False)
    for e in range(4):  # experts equal (weights transposed into the grouped layout)
        linears = [m for m in mmoe.experts[e] if isinstance(m, torch.nn.Linear)]
        for i, lin in enumerate(linears):
            assert torch.equal(smes.layer.experts.weights[i][e], lin.weight.t())
            assert torch.equal(smes.layer.experts.biases[i][e], lin.bias)
    gate = smes.layer.router.gate
    for t, task in enumerate(TASKS):  # gates equal
        assert torch.equal(gate.weight[t * 4 : (t + 1) * 4], mmoe.gates[task].weight)
        assert torch.equal(gate.bias[t * 4 : (t + 1) * 4], mmoe.gates[task].bias)
    x = torch.randn(32, D)
    want, got = mmoe(x), smes(x)
    for task in TASKS:
        torch.testing.assert_close(got.task_reprs[task], want.task_reprs[task], rtol=1e-5, atol=1e-6)


def test_without_a_router_bias_the_gate_biases_are_dropped_and_reported() -> None:
    mmoe = MMoE(MMoEConfig(num_experts=4, expert_hidden=[8]), in_dim=D, tasks=TASKS)
    smes = SMES(SMESConfig(num_experts=4, expert_hidden=[8]), in_dim=D, tasks=TASKS)
    state, notes = mmoe_to_smes(_prefixed(mmoe), _shapes(smes), tasks=TASKS)
    assert "core.layer.router.gate.bias" not in state and "router_bias" in notes[0]
    with pytest.raises(ValueError, match="data.tasks"):
        mmoe_to_smes(_prefixed(mmoe), _shapes(smes), tasks=("a", "b", "zz"))
