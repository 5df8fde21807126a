"""Small building blocks: an MLP, the per-task tower, per-task module containers and a
batch norm whose statistics `parallel/` can make global.

- `NamedModules` holds one module per task (or task group) under any name: a task
  called `forward`, `train`, `to`, `a.b` or `""` is a valid task (the config check
  accepts any name), but `nn.ModuleDict` refuses such keys.
- `ReducibleBatchNorm1d` is `nn.BatchNorm1d` with a `stats_reducer` hook (None = plain
  per-process batch norm), see its docstring.

Legend: B instances, C features (channels), D input width, H hidden width.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn


class MLP(nn.Sequential):
    """Linear -> activation (-> dropout) for each hidden width; optional linear head.

    Args:
        in_dim: input width D.
        hidden: widths of the hidden layers (each followed by the activation).
        out_dim: if given, a final linear layer without activation.
        dropout: dropout after each hidden activation.
    """

    def __init__(
        self,
        in_dim: int,
        hidden: list[int] | tuple[int, ...],
        *,
        out_dim: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        layers: list[nn.Module] = []
        width = in_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        if out_dim is not None:
            layers.append(nn.Linear(width, out_dim))
            width = out_dim
        super().__init__(*layers)
        self.out_dim = width


class TaskTower(nn.Module):
    """Per-task head: MLP over the task representation -> one logit `[B]`."""

    def __init__(self, in_dim: int, hidden: list[int] | tuple[int, ...], *, dropout: float = 0.0) -> None:
        super().__init__()
        self.mlp = MLP(in_dim, hidden, out_dim=1, dropout=dropout)

    def forward(self, h_BH: torch.Tensor) -> torch.Tensor:
        return self.mlp(h_BH).squeeze(-1)


def module_key(name: str, prefix: str) -> str:
    """Submodule name of `name`: `prefix` + `name` with `%` and `.` percent-escaped.

    Injective (distinct names give distinct keys) and always a valid attribute name
    for `nn.Module.add_module` (no `.`, never empty, never an existing attribute as long
    as the container has no attribute starting with `prefix`).
    """
    return prefix + name.replace("%", "%25").replace(".", "%2E")


class NamedModules(nn.Module):
    """One module per name (task or task group), for any name.

    `nn.ModuleDict` registers every key as an attribute of the container, so a task
    named like a module attribute (`forward`, `train`, `type`, `to`, `cuda`, `float`,
    ...) raises `KeyError: "attribute 'forward' already exists"`, and a name holding a
    `.` or an empty name cannot be registered at all. Here each module is registered as
    `module_key(name, prefix)`, so state-dict keys stay readable and stable
    (`towers.task_income.mlp.0.weight`, `core.meta_group.group_all.norm.weight`) and
    no name can clash. Indexing, iteration and `in` take the original names.

    Args:
        modules: name -> module, in order.
        prefix: key prefix, e.g. `task_` or `group_` (must start with a letter).
    """

    def __init__(self, modules: Mapping[str, nn.Module], *, prefix: str) -> None:
        super().__init__()
        assert prefix[:1].isalpha(), prefix
        self._key_prefix = prefix
        self._names: tuple[str, ...] = tuple(modules)
        for name, module in modules.items():
            self.add_module(module_key(name, prefix), module)

    def __getitem__(self, name: str) -> nn.Module:
        return self._modules[module_key(name, self._key_prefix)]  # type: ignore[return-value]

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __len__(self) -> int:
        return len(self._names)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def keys(self) -> tuple[str, ...]:
        return self._names

    def values(self) -> list[nn.Module]:
        return [self[n] for n in self._names]

    def items(self) -> list[tuple[str, nn.Module]]:
        return [(n, self[n]) for n in self._names]


class ReducibleBatchNorm1d(nn.BatchNorm1d):
    """`nn.BatchNorm1d` over `[B, C]` whose training statistics can span several processes.

    `stats_reducer: Callable[[Tensor], Tensor] | None` (None by default: exactly
    `nn.BatchNorm1d`). When set, a training forward stacks the local `[2C + 1]` vector
    (per-feature sum and sum of squares of `x - running_mean`, then the row count),
    passes it through the reducer and normalises with the mean and biased variance of
    the reduced totals; running statistics are updated from them with the unbiased
    variance, as `nn.BatchNorm1d` does. `parallel/` sets the reducer to a
    differentiable all-reduce(SUM) over the data-parallel ranks
    (`parallel.dist.all_reduce_autograd`), so the forward statistics, the gradients
    (each rank's input gradient includes the other ranks' terms through the reduced
    sums) and the running statistics equal those of one process on the global batch,
    on every rank. It must then be called by every rank alike (every rank runs the same
    forward). Eval mode uses the running statistics and reduces nothing.

    Why not `torch.nn.SyncBatchNorm`: its forward refuses CPU tensors in a process
    group ("SyncBatchNorm expected input tensor to be on GPU ...", torch 2.13 here), so
    gloo runs and tests could not use it, and swapping modules in from `parallel/`
    would change the model's module types. This keeps one code path for CPU and GPU
    at the cost of one all-reduce of `2C + 1` floats per norm and training forward.

    Numerics: the variance comes from sums of squares (one reduction instead of a
    second pass), which cancel badly when a feature's mean is large against its
    spread: in float32 the 1-rank and 2-rank variances then differed enough to move the
    loss after a few steps. So the statistics and the centring are computed in float64
    (the `[B, C]` input upcast once, the `[2C + 1]` totals reduced in float64, the
    normalised output cast back before the affine part; centring in float32 at a large
    mean was seen to shift the 1-rank and 2-rank outputs by whole ulps), around the
    shift `running_mean`, the same on every rank (the running statistics are global);
    the shift is a constant and does not change the gradient. The extra cost is a few
    float64 elementwise passes over `[B, C]`.
    """

    stats_reducer: Callable[[torch.Tensor], torch.Tensor] | None = None

    def forward(self, x_BC: torch.Tensor) -> torch.Tensor:
        if self.stats_reducer is None or not self.training or not self.track_running_stats:
            return super().forward(x_BC)
        assert self.running_mean is not None and self.running_var is not None
        assert self.num_batches_tracked is not None
        C = x_BC.shape[1]
        shift_C = self.running_mean.detach().double()  # float64: see Numerics above
        xc_BC = x_BC.double() - shift_C
        count = xc_BC.new_full((1,), float(x_BC.shape[0]))
        totals = self.stats_reducer(torch.cat([xc_BC.sum(0), (xc_BC * xc_BC).sum(0), count]))
        n = totals[2 * C]
        shifted_mean_C = totals[:C] / n
        var_C = (totals[C : 2 * C] / n - shifted_mean_C * shifted_mean_C).clamp_min(0.0)  # biased
        y_BC = ((xc_BC - shifted_mean_C) * torch.rsqrt(var_C + self.eps)).to(x_BC.dtype)
        if self.affine:
            y_BC = y_BC * self.weight + self.bias
        self._update_running(shift_C + shifted_mean_C.detach(), var_C.detach(), n.detach())
        return y_BC

    @torch.no_grad()
    def _update_running(self, mean_C: torch.Tensor, var_C: torch.Tensor, n: torch.Tensor) -> None:
        assert self.running_mean is not None and self.running_var is not None
        assert self.num_batches_tracked is not None
        self.num_batches_tracked.add_(1)
        # momentum None: cumulative moving average, as nn.BatchNorm1d
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased_C = var_C * n / (n - 1).clamp_min(1.0)
        self.running_mean.lerp_(mean_C.to(self.running_mean), factor)
        self.running_var.lerp_(unbiased_C.to(self.running_var), factor)
