"""Stacked expert MLPs run as one grouped matmul over expert-contiguous rows.

Every parameter of `GroupedExperts` has the expert dimension first (`weights[i]` is
`[E, D_i, H_i]`, `biases[i]` is `[E, H_i]`), so an expert-parallel wrapper can keep
only the slice `[e0:e0+E_local]` of each and build a `GroupedExperts` of E_local
experts from it (`from_stacked`). Each layer is `Linear -> ReLU` like `model.mlp.MLP`,
so an expert has the same function as an MMoE expert with the same `hidden`.

Grouped execution: the rows of `x_ND` are sorted by expert and `counts_E` says how
many rows each expert owns; the math (the kernel, its alignment rules, the loop, the
kernel choice per device and dtype) is `model.moe.grouped`, shared with the serving
op of exported models. This module adds what belongs to the module: the parameters,
the backend setting and its warnings, the gather of the rows and the kernel-weight
cache. No host sync on the kernel path: the group offsets stay on the device.

Where the padding lives (the kernel wants 16-byte aligned row strides; Census-Income's
expert input is 32*16+7 = 519 wide, so its rows are not aligned as they come): in the
activations, never in the parameters.

- Unaligned input width D: the dispatchers gather the pair rows through
  `GroupedExperts.input_rows`, which zero-pads the B instance rows to D_pad (16 bytes
  in the kernel dtype) before the gather, so the gather itself writes `[N, D_pad]`
  rows and the kernel reads their `[N, D]` view with the `[E, D, H]` weight as it is;
  backward hands back contiguous `[N, D_pad]` input-gradient rows (`model.moe.grouped`).
  So: no parameter shape changes (checkpoints, DCP, the expert-parallel DTensor
  slices `[E/ep, ...]` along dim 0, resharding and `from_stacked` are untouched), no
  wasted FLOPs, a copy of B rows per step instead of N. Rejected: padding the N rows
  inside the experts (two fresh `N*D_pad` buffers per step, forward rows and input
  gradient), which measured slower than padding the B rows; storing the first weight
  padded (`[E, D_pad, H]`), which saves nothing here and changes parameter shapes.
  The measured costs are in `benchmarks/results/grouped_experts/`.
- Unaligned layer width H (no shipped config has one): the weight and bias are padded
  with zero columns per call (a copy of the weight). Storing padded parameters
  instead would save that copy but change parameter shapes; a width of 8k elements
  avoids both.

Backends (`backend`, model key `model.grouped_backend`):

- `auto` (default), `grouped_mm`: the kernel, in the dtype `model.moe.grouped.kernel_choice`
  picks (the autocast dtype under autocast, fp32 master weights getting their gradient
  back in fp32 through the cast). For fp32 on CUDA, `auto` takes the exact fp32 `loop`
  (and warns), while an explicit `grouped_mm` runs the kernel in bf16 (rows and
  weights rounded to bf16, outputs cast back to fp32 by the layers that follow).
- `loop`: one `addmm` per *active* expert over its contiguous segment (a Python loop
  over experts, never over instances); needs the segment sizes on the host (one
  `host_ints` read per layer). Chosen explicitly, or the fallback for what the kernel
  cannot run: fp64, fp16 or fp32 under `auto` on CUDA, CUDA devices without the fast
  path, devices other than CPU and CUDA, a torch without `_grouped_mm`.
- Every fallback to the loop is reported once per reason with a
  `GroupedFallbackWarning` naming the reason, shapes and dtype (model/ does not log);
  the sm100 / sm103 workaround (empty experts' weight gradients zeroed) once with a
  `GroupedKernelWorkaround` warning.
- Dtypes on the way in: `input_rows` casts the B instance rows to the compute dtype
  before the gather (one copy of B rows, none when nothing changes), so the N pair rows
  are written once, in the kernel's dtype and aligned width, and under expert
  parallelism travel in that dtype (bf16 under bf16 autocast).
- Kernel weights: the weights in the kernel's dtype and width are a copy of every
  expert's weights; without autograd (evaluation) the copy of a parameter version is
  kept and reused until the parameters change (`GroupedExperts`).
- Rejected: a padded `bmm` over `[E, max_count, D]`, which measured no faster than the
  kernel or the loop with balanced counts and wastes FLOPs when counts are skewed.

Legend: N routed rows (pairs), E experts (local), D input width, H layer width,
B instances.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from model.moe.grouped import (
    KernelChoice,
    all_experts_mlp,
    attach_cast,
    cuda_choice,
    expert_mlp,
    kernel_choice,
    kernel_copies,
    kernel_linear,
    loop_linear,
    no_rows,
    output_dtype,
    padded_width,
)

__all__ = [
    "GROUPED_BACKENDS",
    "GroupedExperts",
    "GroupedFallbackWarning",
    "GroupedKernelWorkaround",
    "KernelChoice",
    "cuda_choice",
    "grouped_linear",
    "kernel_choice",
    "output_dtype",
]

GROUPED_BACKENDS = ("auto", "grouped_mm", "loop")


class GroupedFallbackWarning(UserWarning):
    """The grouped experts ran the per-expert loop (host sync) instead of `torch._grouped_mm`."""


_WARNED_REASONS: set[str] = set()


def _warn_fallback(reason: str, detail: str) -> None:
    """Warn once per distinct reason (a step runs this per layer and per call)."""
    if reason in _WARNED_REASONS:
        return
    _WARNED_REASONS.add(reason)
    msg = f"grouped experts fall back to the per-expert loop (a host sync per call): {reason}; {detail}"
    warnings.warn(msg, GroupedFallbackWarning, stacklevel=4)


class GroupedKernelWorkaround(UserWarning):
    """The grouped kernel runs with a workaround for a known bug of this device."""


def _resolve(x_ND: torch.Tensor, w_EDH: torch.Tensor, backend: str) -> KernelChoice:
    choice = kernel_choice(x_ND, w_EDH, backend)
    if choice.reason is not None:
        detail = f"x {tuple(x_ND.shape)} {x_ND.dtype}, w {tuple(w_EDH.shape)} {w_EDH.dtype} on {x_ND.device.type}"
        _warn_fallback(choice.reason, detail)
    if choice.zero_empty_grads and "sm100 zero_empty" not in _WARNED_REASONS:  # once, as the fallbacks
        _WARNED_REASONS.add("sm100 zero_empty")
        warnings.warn(
            "torch._grouped_mm on sm100 / sm103 returns non-zero weight gradients for experts that received no "
            "rows (pytorch/pytorch#172439): those gradients are zeroed after the kernel",
            GroupedKernelWorkaround,
            stacklevel=4,
        )
    return choice


def grouped_linear(
    x_ND: torch.Tensor,
    w_EDH: torch.Tensor,
    b_EH: torch.Tensor,
    counts_E: torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """`y[n] = x[n] @ w[e(n)] + b[e(n)]` for expert-contiguous rows: `[N, D] -> [N, H]`.

    The output is in `output_dtype(x_ND, w_EDH)` (the autocast dtype under autocast,
    else the promoted dtype, whatever the kernel ran in); with an unaligned H it is a
    view of a padded buffer (see the module doc).
    """
    choice = _resolve(x_ND, w_EDH, backend)
    out_dtype = output_dtype(x_ND, w_EDH)
    if x_ND.shape[0] == 0:
        return no_rows(x_ND, w_EDH.shape[-1], out_dtype)
    if choice.dtype is None:
        return loop_linear(x_ND, w_EDH, b_EH, counts_E).to(out_dtype)
    offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
    return kernel_linear(x_ND, w_EDH, b_EH, counts_E, offs_E, choice)[:, : w_EDH.shape[-1]].to(out_dtype)


class GroupedExperts(nn.Module):
    """E expert MLPs with stacked weights.

    Dtypes: the rows enter in the compute dtype (the kernel's, or for the loop the dtype
    its matmuls run in; `input_rows` casts them while it gathers), and `forward`
    returns `output_dtype` (the autocast dtype under autocast, else the parameters'),
    on every rank alike, with or without rows.

    Kernel weights: the kernel reads the weights in its dtype and aligned width, a copy
    of all E experts' weights (`E * D * H` values per layer). With autograd off
    (evaluation, inference) the copy of one version of the parameters (their
    `_version` and storage) is kept and reused by every later call until they change;
    with autograd on it is made per call (the weights change at every optimizer step,
    and a kept copy would hold `E * D * H` values across steps for nothing).

    Args:
        num_experts: E (local experts under expert parallelism).
        in_dim: D.
        hidden: layer widths; every layer is followed by ReLU. `out_dim = hidden[-1]`.
        backend: one of `GROUPED_BACKENDS`.
    """

    def __init__(self, num_experts: int, in_dim: int, hidden: list[int], *, backend: str = "auto") -> None:
        super().__init__()
        self.num_experts, self.in_dim, self.hidden = num_experts, in_dim, list(hidden)
        self.backend = backend
        dims = [in_dim, *hidden]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(num_experts, a, b)) for a, b in zip(dims, dims[1:], strict=False)
        )
        self.biases = nn.ParameterList(nn.Parameter(torch.empty(num_experts, b)) for b in hidden)
        self.out_dim = dims[-1]
        self._kernel_cache: dict[int, tuple[tuple, torch.Tensor, torch.Tensor]] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Per expert, the `nn.Linear` default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        for w_EDH, b_EH in zip(self.weights, self.biases, strict=True):
            bound = 1.0 / math.sqrt(w_EDH.shape[1])
            nn.init.uniform_(w_EDH, -bound, bound)
            nn.init.uniform_(b_EH, -bound, bound)

    @classmethod
    def from_stacked(
        cls, weights: list[torch.Tensor], biases: list[torch.Tensor], *, backend: str = "auto"
    ) -> GroupedExperts:
        """Experts holding copies of the given stacked tensors (e.g. an `[e0:e1]` slice)."""
        num, in_dim = weights[0].shape[:2]
        out = cls(num, in_dim, [w.shape[-1] for w in weights], backend=backend)
        with torch.no_grad():
            for p, src in zip([*out.weights, *out.biases], [*weights, *biases], strict=True):
                p.copy_(src)
        return out

    def kernel_dtype(self, x_ND: torch.Tensor) -> torch.dtype | None:
        """The dtype `forward` runs the kernel in for this input, None for the loop."""
        return kernel_choice(x_ND, self.weights[0], self.backend).dtype

    def input_rows(self, x_BD: torch.Tensor, index_N: torch.Tensor) -> torch.Tensor:
        """The rows `x_BD[index_N]` in the layout and dtype `forward` reads without a copy.

        The B instance rows are cast to the compute dtype (class doc) and, when the kernel will run and
        D is not 16-byte aligned, zero-padded to `D_pad`, in one copy of B rows (none
        when nothing changes); then the gather writes the N pair rows: `[N, D]`, or
        `[N, D_pad]` with zero columns past D. The gradient flows back through the gather
        and the cast (to `x_BD`'s dtype).
        """
        choice = kernel_choice(x_BD, self.weights[0], self.backend)
        dtype = choice.dtype or output_dtype(x_BD, self.weights[0])
        B, D = x_BD.shape
        width = D if choice.dtype is None else padded_width(D, dtype)
        if x_BD.dtype == dtype and width == D:
            return x_BD.index_select(0, index_N)
        rows_BD = x_BD.new_empty((B, width), dtype=dtype)
        rows_BD[:, D:].zero_()
        rows_BD[:, :D] = x_BD
        return rows_BD.index_select(0, index_N)

    def _kernel_params(self, i: int, choice: KernelChoice) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's weight and bias for the kernel (dtype, padded width), see the class doc."""
        w_EDH, b_EH = self.weights[i], self.biases[i]
        assert choice.dtype is not None
        H_pad = padded_width(w_EDH.shape[-1], choice.dtype)
        if w_EDH.dtype == choice.dtype and H_pad == w_EDH.shape[-1]:
            return w_EDH, b_EH  # the parameters as they are: no copy
        if torch.is_grad_enabled():  # training: made per call (class doc)
            self._kernel_cache.pop(i, None)
            w_cast, b_cast = kernel_copies(w_EDH, b_EH, choice.dtype)
            return attach_cast(w_EDH, w_cast), attach_cast(b_EH, b_cast)
        key = (choice.dtype, w_EDH._version, b_EH._version, w_EDH.data_ptr(), b_EH.data_ptr())
        cached = self._kernel_cache.get(i)
        if cached is not None and cached[0] == key:
            w_cast, b_cast = cached[1], cached[2]
        else:
            w_cast, b_cast = kernel_copies(w_EDH, b_EH, choice.dtype)
            self._kernel_cache[i] = (key, w_cast, b_cast)
        return attach_cast(w_EDH, w_cast), attach_cast(b_EH, b_cast)

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Grouped forward over expert-contiguous rows: `[N, D] -> [N, out_dim]` in
        `output_dtype`.

        `x_ND` may also be `[N, D_pad]` with zero columns past D (`input_rows`).
        """
        choice = _resolve(x_ND, self.weights[0], self.backend)
        return expert_mlp(
            x_ND, counts_E, list(self.weights), list(self.biases), choice=choice,
            kernel_params=lambda i: self._kernel_params(i, choice),
        )  # fmt: skip

    def forward_all(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Every expert on every instance (batched matmul, no gather): `[E, B, out_dim]`."""
        return all_experts_mlp(x_BD, list(self.weights), list(self.biases))
