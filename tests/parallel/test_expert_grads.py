"""The expert-gradient sync (`parallel.expert.grads`) on gloo ranks.

- 4 ranks, ep = 2 (replica groups of 2): the bucket's all-reduce starts during backward,
  before the gradient reaches the layer's input (it overlaps the rest of backward);
  the result equals the blocking sum over the replica group divided by the world size,
  with the gradients prepared as bucket views and without (`set_to_none`).
- 2 ranks, ep = 2 (replica groups of 1): no collective, the gradients divided in place.

Legend: B local batch, D input width, E experts.
"""

from __future__ import annotations

import torch
from torch import nn

from model.smes import SMESConfig, SMESLayer
from parallel import dist as pdist
from parallel.expert.dispatcher import apply_expert_parallel
from parallel.expert.grads import build_expert_grad_sync
from parallel.expert.mesh import build_mesh
from tests._dist import run_ranks

B, D, E = 16, 10, 8


class Core(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = SMESLayer(SMESConfig(num_experts=E, expert_hidden=[12]), in_dim=D, num_tasks=2)


def _worker(rank: int, world: int, ep: int, prepare: bool) -> dict:
    mesh = build_mesh(ep)
    core = Core()
    apply_expert_parallel(core, mesh)
    plain = Core()  # the same model (seeded) without the sync: the local gradients
    apply_expert_parallel(plain, mesh)
    sync = build_expert_grad_sync(core, mesh)
    assert sync is not None
    started: list[bool] = []
    calls = [0]
    start = pdist.all_reduce_async

    def counted(*args, **kwargs):
        calls[0] += 1
        return start(*args, **kwargs)

    pdist.all_reduce_async = counted  # type: ignore[assignment]
    torch.manual_seed(10 + rank)
    x_BD = torch.randn(B, D)
    for step in range(2):  # a second step reuses the buckets
        if prepare:
            sync.prepare()
        else:
            for p in core.parameters():
                p.grad = None
        x = x_BD.clone().requires_grad_()
        x.register_hook(lambda g: started.append(bool(sync.buckets) and sync.buckets[0].started) or g)
        out, aux, _ = core.layer(x)
        (out.square().mean() * (step + 1) + sum(aux.values())).backward()
        sync.finish()
    # the reference: this rank's local gradients of the last step, summed over the replica group
    plain.zero_grad()
    y, aux, _ = plain.layer(x_BD.clone().requires_grad_())
    (y.square().mean() * 2 + sum(aux.values())).backward()
    want = {}
    for n, p in plain.layer.experts.named_parameters():
        g = p.grad.clone()
        pdist.all_reduce(g, group=mesh.edp_group)
        want[n] = g / world
    got = {n: p.grad.clone() for n, p in core.layer.experts.named_parameters()}
    return {"want": want, "got": got, "started": started, "calls": calls[0], "views": sync.communicate}


def test_replica_groups_of_two_overlap_backward_and_sum() -> None:
    for prepare in (True, False):
        for r in run_ranks(_worker, 4, 2, prepare):
            assert r["views"] and r["calls"] == 2  # one bucket per step
            assert r["started"] == [True, True]  # started before backward reached the input
            for name, g in r["got"].items():
                torch.testing.assert_close(g, r["want"][name], rtol=1e-6, atol=1e-7, msg=name)


def test_replica_groups_of_one_do_not_communicate() -> None:
    for r in run_ranks(_worker, 2, 2, False):
        assert not r["views"] and r["calls"] == 0
        for name, g in r["got"].items():
            torch.testing.assert_close(g, r["want"][name], rtol=1e-6, atol=1e-7, msg=name)
