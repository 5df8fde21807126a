"""The SMES layer on the simulated GPU: the CUDA-only branches it takes there, each against
the CPU computation of the same layer.

- fp32 model with `model.grouped_backend=grouped_mm` on sm90 / sm100: the experts run the
  bf16 kernel and return float32 (the per-task mixing outside autocast used to fail on
  the bf16 table);
- the router stays float32 under bf16 autocast (near-tied logits would tie in bf16 and
  top-k would pick the lowest expert indices);
- sm100's grouped kernel leaves garbage in the weight gradient of experts without rows
  (simulated as NaN): those gradients come out zero;
- every routing mode, fp32 and bf16 autocast, dropless and capacity, train and eval run
  with no device mismatch and no host read outside `model.moe.host`.

Legend: B instances, D input width, E experts, T tasks.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from model.moe.experts import GroupedExperts
from model.smes import SMESConfig, SMESLayer
from tests.cuda_sim.sim import plain, sim_module, simulate_cuda, to_sim

pytestmark = pytest.mark.cuda_sim

D, T = 19, 3  # odd D: the padded kernel path


def make_layer(**kw) -> SMESLayer:
    torch.manual_seed(0)
    cfg = SMESConfig(**{"num_experts": 8, "expert_hidden": [12, 8], "z_loss_coef": 1e-3, **kw})
    return SMESLayer(cfg, in_dim=D, num_tasks=T)


def step(layer: SMESLayer, x_BD: torch.Tensor, autocast: str | None) -> dict:
    """Forward (+ backward in training) of `layer` on `x_BD`; outputs and gradients."""
    ctx = torch.autocast(autocast, dtype=torch.bfloat16) if autocast else warnings.catch_warnings()
    with ctx:
        out_BTH, aux, load = layer(x_BD)
    res = {"out": out_BTH, "dtype": out_BTH.dtype, "active": load.active_sum}
    if layer.training:
        loss = out_BTH.float().square().mean() + sum(aux.values())
        loss.backward()
        res["loss"] = loss.detach()
        res["grads"] = {n: p.grad for n, p in layer.named_parameters()}
        res["x_grad"] = x_BD.grad
    return res


def on_cpu(layer: SMESLayer, x_BD: torch.Tensor, autocast: bool) -> dict:
    return step(copy.deepcopy(layer), x_BD.clone().requires_grad_(), "cpu" if autocast else None)


def on_sim(layer: SMESLayer, x_BD: torch.Tensor, autocast: bool, capability=(9, 0)) -> dict:
    with simulate_cuda(capability), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the documented fallback / workaround warnings
        sim = sim_module(copy.deepcopy(layer))
        res = step(sim, to_sim(x_BD.clone(), requires_grad=True), "cuda" if autocast else None)
        assert res["out"].device.type == "cuda"
        return {k: plain(v) if not isinstance(v, dict) else {n: plain(g) for n, g in v.items()} for k, v in res.items()}


def close(a: dict, b: dict, tol: float) -> None:
    torch.testing.assert_close(a["out"].float(), b["out"].float(), rtol=tol, atol=tol)
    if "grads" in a:
        torch.testing.assert_close(a["loss"], b["loss"], rtol=tol, atol=tol)
        torch.testing.assert_close(a["x_grad"], b["x_grad"], rtol=tol, atol=tol)
        for name, g in a["grads"].items():
            if g is None:
                assert b["grads"][name] is None, name
            else:
                torch.testing.assert_close(g, b["grads"][name], rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("capability", [(9, 0), (10, 0)])
def test_fp32_model_on_the_bf16_grouped_kernel(capability) -> None:
    """`grouped_backend=grouped_mm` with an fp32 model on CUDA runs the experts in bf16;
    the layer's output, loss and gradients stay float32 and match the fp32 CPU layer to
    bf16 accuracy."""
    layer = make_layer(grouped_backend="grouped_mm")
    x_BD = torch.randn(64, D)
    sim = on_sim(layer, x_BD, autocast=False, capability=capability)
    ref = on_cpu(layer, x_BD, autocast=False)
    assert sim["dtype"] == torch.float32 and all(g.dtype == torch.float32 for g in sim["grads"].values())
    close(sim, ref, tol=3e-2)
    assert not torch.equal(sim["out"], ref["out"])  # the experts really ran in bf16


def test_router_stays_float32_under_bf16_autocast() -> None:
    """Near-tied logits (closer than bf16 can tell apart): the selection, logits and
    mixing weights are those of float32, not ties broken towards expert 0."""
    E = 64
    layer = make_layer(num_experts=E, shared_top_k=2, adaptive_top_k=1)
    with torch.no_grad():  # expert e's logit is D * (0.25 + e * 1e-5): all equal in bf16
        layer.router.gate.weight.copy_((0.25 + 1e-5 * torch.arange(E).repeat(T)).view(-1, 1).expand(-1, D))
    x_BD = torch.ones(4, D)
    with simulate_cuda(), torch.no_grad():
        router = sim_module(copy.deepcopy(layer.router))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            plan = router(to_sim(x_BD))
        assert plan.logits_BTE.dtype == plan.weights_BTK.dtype == plan.probs_BTE.dtype == torch.float32
        assert plan.weights_BTW.dtype == torch.float32
        experts = plain(plan.experts_BTK)
    assert experts[0, 0].tolist() == [63, 62, 61]  # S = the two highest, then the next for each task


def test_sm100_experts_without_rows_get_zero_weight_gradients() -> None:
    """The simulated sm100 kernel returns NaN blocks for empty groups (as the device does);
    the experts' weight gradients of those experts are exactly zero, the others finite."""
    torch.manual_seed(1)
    experts = GroupedExperts(4, D, [16, 8], backend="grouped_mm")
    counts_E = torch.tensor([5, 0, 7, 0])
    x_ND = torch.randn(12, D)
    with simulate_cuda((10, 0)), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = to_sim(torch.randn(8, 16, dtype=torch.bfloat16)), to_sim(torch.randn(16, 8, dtype=torch.bfloat16))
        offs = to_sim(torch.tensor([5, 5, 16, 16], dtype=torch.int32))  # 2d x 2d: the weight-gradient form
        raw = plain(torch._grouped_mm(a, b, offs=offs))
        assert raw[1].isnan().all() and raw[0].isfinite().all()  # the simulation has the bug
        sim = sim_module(copy.deepcopy(experts))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = sim(to_sim(x_ND, requires_grad=True), to_sim(counts_E))
        y.float().sum().backward()
        grads = [plain(w.grad) for w in sim.weights]
    for g in grads:
        assert g.isfinite().all()
        assert (g[1] == 0).all() and (g[3] == 0).all() and (g[0] != 0).any()


ROUTINGS = [("progressive", None), ("progressive", 1.0), ("independent", None), ("independent", 1.0), ("all", None)]


@pytest.mark.parametrize(("routing", "capacity_factor"), ROUTINGS, ids=lambda v: str(v))  # capacity: sparse only
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_layer_on_the_simulated_gpu_equals_the_cpu(routing, capacity_factor, autocast, training) -> None:
    layer = make_layer(routing=routing, bias_balance=True, capacity_factor=capacity_factor)
    layer.train(training)
    x_BD = torch.randn(48, D)
    sim = on_sim(layer, x_BD, autocast)
    ref = on_cpu(layer, x_BD, autocast)
    assert sim["dtype"] == (torch.bfloat16 if autocast else torch.float32)
    # fp32 on sm90 with `auto` takes the exact per-expert loop; bf16 runs the same kernel as the CPU
    close(sim, ref, tol=2e-2 if autocast else 1e-5)


@pytest.mark.parametrize("capacity_factor", [None, 1.0], ids=["dropless", "capacity"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_union_mixing_on_the_simulated_gpu_equals_the_cpu(capacity_factor, autocast) -> None:
    """`model.mixing=union`: the union's weights are built on the device (scatter, gather,
    masked softmax) in float32, and train the same as on the CPU."""
    layer = make_layer(routing="progressive", mixing="union", capacity_factor=capacity_factor)
    x_BD = torch.randn(48, D)
    sim = on_sim(layer, x_BD, autocast)
    ref = on_cpu(layer, x_BD, autocast)
    close(sim, ref, tol=2e-2 if autocast else 1e-5)
