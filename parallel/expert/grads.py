"""The expert-gradient sync: every rank's expert slices -> the gradient of the global mean loss.

Sharded experts (`parallel.ep` > 1) are kept out of DDP. After backward, an expert's
gradient on a rank holds the contributions of its expert-parallel group's ranks; it
must be summed over the expert-data-parallel group (the ranks holding the same experts,
W / ep of them) and divided by the world size W. `ExpertGradSync` does that per SMES
layer, over its expert parameters (`parallel.expert.params`):

- Replica group of one (ep = W): nothing to communicate. The gradients are divided
  by W in place, one fused multi-tensor op; no copy.
- Larger replica groups: the layer's local expert parameters form one bucket, a flat
  buffer. `prepare()`, called after the optimizer zeroes the gradients and before
  the next backward, points every expert parameter's `.grad` at its zeroed slice of
  the bucket, so backward accumulates straight into it (as DDP's
  `gradient_as_bucket_view`). A post-accumulate-grad hook per parameter counts the
  layer's gradients as they arrive; when the last one is in, the bucket's all-reduce
  over the expert-data-parallel group starts asynchronously and runs while backward
  goes on through the dispatcher's all-to-alls, the router, the layers below and the
  embeddings (which DDP's own all-reduces overlap too). `finish()` waits for the
  buckets and divides them by W in place: the `.grad` views are the result, nothing is
  copied back. A gradient that arrives without `prepare` (a caller that zeroed with
  `set_to_none` and did not prepare) is copied into its slice once.
- Order: NCCL matches collectives by their order on a communicator, so every rank
  must start the buckets in the same order. They are started in reverse layer order
  (the order backward reaches the layers), a bucket only after every later layer's;
  a bucket whose gradients never arrived (a rank whose experts received no rows and
  so saw no backward through them) is started by `finish()` in its turn, with the
  zeros `prepare` left in it.

Gradient scale: every rank's loss is the mean over its local batch and DDP averages
network gradients over W. An expert's gradient on its owner holds the sum of the
contributions of its expert-parallel group's ranks; the expert-data-parallel
all-reduce sums over the groups, and dividing by W gives the gradient of the global
mean loss, the same as single-process training on the concatenated batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from parallel import dist as pdist
from parallel.expert.mesh import ExpertMesh
from parallel.expert.params import expert_modules, smes_layers


class _Bucket:
    """One SMES layer's local expert parameters and their flat gradient buffer."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params
        numel = sum(p.numel() for p in params)
        self.flat = torch.zeros(numel, dtype=params[0].dtype, device=params[0].device)
        self.views: list[torch.Tensor] = []
        offset = 0
        for p in params:
            self.views.append(self.flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        self.pending = len(params)
        self.work: Any = None
        self.started = False


def _into_bucket(p: torch.Tensor, view: torch.Tensor) -> None:
    """Make `p.grad` its bucket slice `view`: a gradient accumulated into a fresh tensor
    is copied in, a missing one (no backward reached the parameter) is zeros."""
    if p.grad is view:
        return
    if p.grad is None:
        view.zero_()
    else:
        view.copy_(p.grad)
    p.grad = view


class ExpertGradSync:
    """See the module doc.

    Args:
        layers: per SMES layer, its local (sharded) expert parameters, in layer order.
        mesh: this rank's expert mesh.
    """

    def __init__(self, layers: list[list[nn.Parameter]], mesh: ExpertMesh) -> None:
        self.mesh = mesh
        self.params = [p for ps in layers for p in ps]
        self.communicate = mesh.edp_size > 1
        self.buckets = [_Bucket(ps) for ps in layers if ps] if self.communicate else []
        self._next = len(self.buckets) - 1  # the next bucket to start (reverse layer order)
        self._hooks = []
        for b, bucket in enumerate(self.buckets):
            for p, view in zip(bucket.params, bucket.views, strict=True):
                self._hooks.append(p.register_post_accumulate_grad_hook(self._arrived(b, view)))

    def _arrived(self, b: int, view: torch.Tensor) -> Any:
        def hook(p: torch.Tensor) -> None:
            bucket = self.buckets[b]
            if bucket.started:
                raise RuntimeError("a second backward through the experts before ExpertGradSync.finish()")
            _into_bucket(p, view)
            bucket.pending -= 1
            if bucket.pending == 0:
                self._start_ready()

        return hook

    def _start(self, bucket: _Bucket) -> None:
        bucket.work = pdist.all_reduce_async(bucket.flat, group=self.mesh.edp_group)
        bucket.started = True

    def _start_ready(self) -> None:
        while self._next >= 0 and self.buckets[self._next].pending == 0:
            self._start(self.buckets[self._next])
            self._next -= 1

    @torch.no_grad()
    def prepare(self) -> None:
        """Before backward: zeroed bucket slices as the expert gradients."""
        for bucket in self.buckets:
            bucket.flat.zero_()
            for p, view in zip(bucket.params, bucket.views, strict=True):
                p.grad = view
            bucket.pending, bucket.work, bucket.started = len(bucket.params), None, False
        self._next = len(self.buckets) - 1

    @torch.no_grad()
    def finish(self) -> None:
        """After backward: start what backward did not, wait, divide by the world size."""
        W = self.mesh.world_size
        if not self.communicate:
            grads = [p.grad for p in self.params if p.grad is not None]
            if grads and W > 1:
                torch._foreach_div_(grads, float(W))
            return
        for b in range(len(self.buckets) - 1, -1, -1):  # the same order on every rank
            bucket = self.buckets[b]
            if not bucket.started:
                for p, view in zip(bucket.params, bucket.views, strict=True):
                    _into_bucket(p, view)
                self._start(bucket)
        for bucket in self.buckets:
            if bucket.work is not None:
                bucket.work.wait()
            bucket.flat.div_(W)
            bucket.pending, bucket.work, bucket.started = len(bucket.params), None, False
        self._next = len(self.buckets) - 1


def build_expert_grad_sync(model: nn.Module, mesh: ExpertMesh) -> ExpertGradSync | None:
    """The sync of `model`'s sharded experts (None when the experts are replicated,
    ep = 1: DDP reduces them like any network parameter)."""
    if mesh.ep == 1 or mesh.world_size == 1:
        return None
    layers = [[p for m in expert_modules(layer) for p in m.parameters()] for layer in smes_layers(model)]
    return ExpertGradSync(layers, mesh) if any(layers) else None
