"""Host syncs per SMES step: exactly one per layer (the router's read of N through
`host_ints`), none elsewhere in forward, backward, load statistics or the bias update.

Counted with `benchmarks.host_syncs.count_host_syncs`, which patches the Python-visible sync
entry points (each a device-to-host sync on CUDA, free on CPU). The expert-parallel
count (ep = 2 on 2 gloo ranks) is in `tests/parallel/test_expert_parallel.py`.

Legend: B instances, D input width, E experts, T tasks.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.host_syncs import count_host_syncs
from model.moe.host import host_flag, host_ints, to_host
from model.smes import SMESConfig, SMESLayer


def step(layer: SMESLayer, x_BD: torch.Tensor) -> None:
    """One training step of the layer: forward, loss with the aux terms, backward, bias update."""
    out_BTH, aux, load = layer(x_BD)
    loss = out_BTH.square().mean() + sum(aux.values())
    loss.backward()
    layer.update_bias()
    assert all(isinstance(v, torch.Tensor) for v in (load.active_sum, load.active_max, load.dropped_pairs))


def make_layer(routing: str, capacity_factor: float | None, **kw) -> SMESLayer:
    torch.manual_seed(0)
    cfg = SMESConfig(num_experts=8, routing=routing, expert_hidden=[12, 8], bias_balance=True, z_loss_coef=1e-3,
                     capacity_factor=capacity_factor, **kw)  # fmt: skip
    return SMESLayer(cfg, in_dim=19, num_tasks=3)  # odd D: the padded kernel path


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
@pytest.mark.parametrize("routing", ["progressive", "independent"])
def test_one_host_sync_per_layer_and_step(routing: str, capacity_factor: float | None) -> None:
    layer = make_layer(routing, capacity_factor)
    x_BD = torch.randn(48, 19, requires_grad=True)
    step(layer, x_BD)  # first step outside the count
    with count_host_syncs() as syncs:
        step(layer, x_BD)
    assert len(syncs) == 1, syncs
    assert syncs[0].intended and syncs[0].name == "tolist" and "model/moe/router.py" in syncs[0].where
    if capacity_factor is not None:
        assert float(layer(x_BD)[2].dropped_pairs) > 0  # the capacity path really ran


def test_all_routing_and_evaluation() -> None:
    every = make_layer("all", None)
    x_BD = torch.randn(16, 19, requires_grad=True)
    with count_host_syncs() as syncs:
        step(every, x_BD)
    assert syncs == []  # N = B * E is known on the host
    sparse = make_layer("progressive", 0.5).eval()
    with count_host_syncs() as syncs, torch.no_grad():
        sparse(x_BD)
    assert len(syncs) == 1 and syncs[0].intended


def test_the_loop_backend_pays_one_read_per_layer() -> None:
    layer = make_layer("progressive", None, grouped_backend="loop")
    with count_host_syncs() as syncs:
        step(layer, torch.randn(16, 19, requires_grad=True))
    assert len(syncs) == 1 + 2 and all(s.intended for s in syncs)


def test_the_counter_sees_every_entry_point() -> None:
    """The audit itself: every patched entry point counts once, nothing else counts."""
    t = torch.tensor([3, 1, 2])
    mask = t > 1
    calls = [
        lambda: t.sum().item(),
        lambda: t.tolist(),
        lambda: int(t[0]),
        lambda: float(t[0]),
        lambda: bool(t[0]),
        lambda: [0, 1, 2, 3][t[0]],
        lambda: t.cpu(),
        lambda: t.numpy(),
        lambda: torch.unique(t),
        lambda: t.unique(),
        lambda: torch.bincount(t),
        lambda: t.bincount(),
        lambda: torch.nonzero(t),
        lambda: t.nonzero(),
        lambda: torch.argwhere(t),
        lambda: torch.masked_select(t, mask),
        lambda: torch.where(mask),
        lambda: t[mask],
        lambda: t.clone().__setitem__(mask, 0),
        lambda: t.repeat_interleave(t),
        lambda: torch.repeat_interleave(t),
        lambda: torch.repeat_interleave(t, t, dim=0),
        lambda: t.split([t[1], t[2]]),
        lambda: host_ints(t),
        lambda: host_flag(t[0]),
        lambda: to_host(t),
    ]
    free = [
        lambda: t.repeat_interleave(t, output_size=6),
        lambda: torch.repeat_interleave(t, 2),
        lambda: t[torch.tensor([0, 2])],
        lambda: t[1:],
        lambda: t.split([1, 2]),
        lambda: torch.where(mask, t, 0),
        lambda: t.index_select(0, torch.tensor([1])),
        lambda: t.sort(),
        lambda: t.cumsum(0),
        lambda: t.to(torch.float64),
    ]
    doors = {len(calls) - 3, len(calls) - 2, len(calls) - 1}  # host_ints, host_flag, to_host
    for i, fn in enumerate(calls):
        with count_host_syncs() as syncs:
            fn()
        assert len(syncs) == 1, (i, syncs)
        assert syncs[0].intended == (i in doors), (i, syncs)
    with count_host_syncs() as syncs:
        for fn in free:
            fn()
    assert syncs == []
    assert torch.Tensor.item is not None and torch.unique(t).tolist() == [1, 2, 3]  # restored
