"""Gradient clipping by the global norm (`parallel.clip.clip_grad_norm_`): the
norm of float64 accuracy without a float64 copy of any gradient (one float32 norm per
tensor from a fused multi-tensor kernel; only those norms are summed in float64)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from parallel.clip import clip_grad_norm_


class _Float64Copies(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.dtype == torch.float64 and out.numel() > 64:
            self.sizes.append(out.numel())
        return out


def test_clipping_norm_without_float64_gradient_copies() -> None:
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(n, 33)) for n in (100, 7, 250)]
    for p in params:
        p.grad = torch.randn_like(p) * 3
    want = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params))
    before = [p.grad.clone() for p in params]
    with _Float64Copies() as mode:
        total = clip_grad_norm_(params, 1.0, sharded_experts=[], mesh=None)
    assert mode.sizes == []
    torch.testing.assert_close(total.double(), want, rtol=1e-6, atol=0)
    for p, g in zip(params, before, strict=True):
        torch.testing.assert_close(p.grad, g / want.float(), rtol=1e-5, atol=1e-7)
