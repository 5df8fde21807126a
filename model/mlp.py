"""Small building blocks: an MLP, the per-task tower, per-task module containers and a
batch norm whose statistics `parallel/` can make global.

- `NamedModules` holds one module per task (or task group) under any name: a task
  called `forward`, `train`, `to`, `a.b` or `""` is a valid task (the config check
  accepts any name), but `nn.ModuleDict` refuses such keys.
- `ReducibleBatchNorm1d` is `nn.BatchNorm1d` with `stats_gather` / `grad_reducer` hooks
  (None = plain per-process batch norm) for global-batch statistics, see its docstring.

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

    Two hooks, both None by default (exactly `nn.BatchNorm1d`), set together by
    `parallel/` (`parallel.parallelize.sync_batch_norms`):

    - `stats_gather: Callable[[Tensor], Tensor]`: every process's `[K]` vector stacked
      in rank order, `[W, K]` (an all-gather, no autograd);
    - `grad_reducer: Callable[[Tensor], Tensor]`: a `[K]` vector summed over the
      processes (an all-reduce, no autograd).

    With them, a training forward normalises with the statistics of the global batch,
    as `torch.nn.SyncBatchNorm` does: each process computes its own count, mean and
    biased variance in float32 (`torch.var_mean`, which is stable), one all-gather of
    those `2C + 1` values per norm, and the processes' parts are combined exactly
    (Chan et al.: the global variance is the count-weighted mean of the parts'
    variances plus that of their squared mean offsets, no sum of squares that could
    cancel). The backward needs the global sums of `dy` and `dy * x_hat`: one
    all-reduce of `2C` values per norm, and the input gradient is the one of one
    process on the global batch (each process's includes the other processes'
    terms). The affine parameters get this process's own gradient, which DDP averages
    like any other. Running statistics are updated from the global mean and the
    unbiased global variance, so they are the same on every process. Every process
    must call it alike (every rank runs the same forward). Eval mode uses the running
    statistics and communicates nothing.

    Why not `torch.nn.SyncBatchNorm`: its forward refuses CPU tensors in a process
    group ("SyncBatchNorm expected input tensor to be on GPU ...", torch 2.13 here), so
    gloo runs and tests could not use it, and swapping modules in from `parallel/`
    would change the model's module types. This keeps one code path for CPU and GPU
    with the same communication as SyncBatchNorm: one all-gather in forward, one
    all-reduce in backward, float32, per norm and training step.

    Numerics: the statistics, the normalisation and the affine part run in float32 for
    any input dtype (bf16 under autocast), and the output is cast back to the input's
    dtype.
    """

    stats_gather: Callable[[torch.Tensor], torch.Tensor] | None = None
    grad_reducer: Callable[[torch.Tensor], torch.Tensor] | None = None

    def forward(self, x_BC: torch.Tensor) -> torch.Tensor:
        if self.stats_gather is None or not self.training or not self.track_running_stats:
            return super().forward(x_BC)
        assert self.grad_reducer is not None, "set stats_gather and grad_reducer together"
        mean_C, var_C, n, y_BC = _GlobalBatchNorm.apply(x_BC, self.weight, self.bias, self)
        self._update_running(mean_C, var_C, n)
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


class _GlobalBatchNorm(torch.autograd.Function):
    """Batch norm with global-batch statistics (see `ReducibleBatchNorm1d`). Returns
    `(mean_C, var_C, n, y_BC)`; only `y_BC` has a gradient."""

    @staticmethod
    def forward(ctx, x_BC, weight_C, bias_C, norm):  # type: ignore[override]
        B, C = x_BC.shape
        x32_BC = x_BC.float()
        if B > 0:
            var_C, mean_C = torch.var_mean(x32_BC, dim=0, unbiased=False)
        else:  # an empty part adds nothing (var_mean would be NaN)
            var_C = mean_C = x32_BC.new_zeros(C)
        parts_WK = norm.stats_gather(torch.cat([mean_C, var_C, x32_BC.new_full((1,), float(B))]))
        mean_WC, var_WC, n_W1 = parts_WK[:, :C], parts_WK[:, C : 2 * C], parts_WK[:, 2 * C :]
        n = n_W1.sum()
        mean_C = (n_W1 * mean_WC).sum(0) / n
        var_C = (n_W1 * (var_WC + (mean_WC - mean_C).square())).sum(0) / n
        invstd_C = torch.rsqrt(var_C + norm.eps)
        y_BC = (x32_BC - mean_C) * invstd_C
        if weight_C is not None:
            y_BC = y_BC * weight_C.float() + bias_C.float()
        ctx.save_for_backward(x_BC, weight_C, mean_C, invstd_C, n)
        ctx.norm = norm
        ctx.mark_non_differentiable(mean_C, var_C, n)
        return mean_C, var_C, n, y_BC.to(x_BC.dtype)

    @staticmethod
    def backward(ctx, _g_mean, _g_var, _g_n, dy_BC):  # type: ignore[override]
        x_BC, weight_C, mean_C, invstd_C, n = ctx.saved_tensors
        C = x_BC.shape[1]
        dy32_BC = dy_BC.float()
        xhat_BC = (x_BC.float() - mean_C) * invstd_C
        sum_dy_C, sum_dy_xhat_C = dy32_BC.sum(0), (dy32_BC * xhat_BC).sum(0)
        grad_w = grad_b = None
        if weight_C is not None and ctx.needs_input_grad[1]:
            grad_w = sum_dy_xhat_C.to(weight_C.dtype)
        if weight_C is not None and ctx.needs_input_grad[2]:
            grad_b = sum_dy_C.to(weight_C.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            totals_K = ctx.norm.grad_reducer(torch.cat([sum_dy_C, sum_dy_xhat_C]))  # global sums
            scale_C = invstd_C if weight_C is None else invstd_C * weight_C.float()
            grad_x = scale_C * (dy32_BC - totals_K[:C] / n - xhat_BC * (totals_K[C:] / n))
            grad_x = grad_x.to(x_BC.dtype)
        return grad_x, grad_w, grad_b, None
