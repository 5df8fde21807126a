"""The grouped linear: one matmul over expert-contiguous rows, and the expert MLP of it.

Pure math on given tensors (no module state, no warnings, no config): the one
implementation behind `model.moe.experts` (training and evaluation) and the serving op
`smes_serving::grouped_mlp` (`trainer/serving/scorer.py`), so that an exported program scores
with the kernel choice, alignment and padding the model evaluates with. This file
imports only torch and `model.moe.host` (torch only, for the loop's segment sizes):
a serving process needs these two files, not the training stack.

The kernel is `torch._grouped_mm(x_ND, w_EDH, offs)` (forward, and the two grouped
GEMMs of its backward), plus the bias expanded per row. No host sync: the group
offsets stay on the device.

Alignment and where the padding lives. The kernel (CPU and CUDA) wants every row
stride 16-byte aligned: the row stride of `x_ND` and of the gradient rows (a multiple
of 4 elements in fp32, of 8 in bf16) and the row stride of `w_EDH`; it checks strides,
not sizes. The padding lives in the activations, never in the parameters:

- Unaligned input width D: rows may come as the `[N, D]` view of zero-padded
  `[N, D_pad]` storage (`GroupedExperts.input_rows` gathers them that way) and the
  kernel reads that view with the `[E, D, H]` weight as it is. Rows handed over as a
  plain `[N, D]` are cast and padded here in one copy (`aligned_rows`). Backward
  hands back contiguous input-gradient rows of the width the rows came in: the GEMM
  against the weight padded with zero rows when that copy (`E*D*H`) is smaller than
  the rows, else the GEMM output padded (`N*D`); a strided gradient would make the
  consumer's index_add much slower.
- Unaligned layer width H: the weight and bias are padded with zero columns
  (`[E, D, H_pad]`, `kernel_copies`), the layer computes `[N, H_pad]` whose padded
  columns are exactly zero (zero weight, zero bias, ReLU(0) = 0), and the next layer
  reads its `[N, H]` view (row stride H_pad) without another copy.

Kernel choice (`kernel_choice`, by backend, device and dtype): the kernel runs in the
autocast dtype when autocast is enabled for the device (`torch._grouped_mm` is not
autocast-registered, so inputs, weights and bias are cast here), else in the promoted
dtype of input and weight. CPU runs fp32, bf16 and fp16. CUDA runs the kernel in bf16
only (its fast path is bf16 on sm90 / sm100; every other case falls back inside torch
to a loop behind a host sync): fp32 on CUDA takes the exact fp32 loop under `auto`,
while an explicit `grouped_mm` runs the kernel in bf16. The loop (`loop_linear`) is
one `addmm` per active expert over its contiguous segment and needs the segment sizes
on the host (one `host_ints` read per layer). On sm100 / sm103 the kernel's weight
gradient of an expert with no rows is garbage (pytorch/pytorch#172439); those
gradients are zeroed after it (`KernelChoice.zero_empty_grads`).

Legend: N routed rows (pairs), E experts, D input width, H layer width, B instances.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from model.moe.host import host_ints

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True, slots=True)
class KernelChoice:
    """How a grouped layer runs: `dtype` of the kernel, or None for the loop (then
    `reason` says why when it is a fallback, None when the loop was asked for).
    `zero_empty_grads`: the kernel's weight gradient of an expert that received no rows
    is not zero on this device and is zeroed after it (sm100 / sm103, see `cuda_choice`)."""

    dtype: torch.dtype | None
    reason: str | None = None
    zero_empty_grads: bool = False


def output_dtype(x_ND: torch.Tensor, w_EDH: torch.Tensor) -> torch.dtype:
    """The dtype the experts return for `x_ND`: what a stack of `nn.Linear` would return,
    i.e. the autocast dtype when autocast is on for the input's device, else the promoted
    dtype of input and weight (whatever dtype the kernel itself ran in)."""
    device = x_ND.device.type
    if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(x_ND.dtype, w_EDH.dtype)


def kernel_choice(x_ND: torch.Tensor, w_EDH: torch.Tensor, backend: str) -> KernelChoice:
    """The kernel dtype for `x_ND @ w_EDH` under `backend`, or the loop and why."""
    if backend == "loop":
        return KernelChoice(None)
    if not hasattr(torch, "_grouped_mm"):
        return KernelChoice(None, f"torch {torch.__version__} has no torch._grouped_mm")
    device = x_ND.device.type
    dtype = output_dtype(x_ND, w_EDH)
    if dtype not in KERNEL_DTYPES:
        return KernelChoice(None, f"{dtype} has no grouped kernel (float32, bfloat16, float16 only)")
    if device == "cpu":
        return KernelChoice(dtype)
    if device != "cuda":
        return KernelChoice(None, f"device {device}: the grouped kernel is used on cpu and cuda only")
    index = x_ND.device.index if x_ND.device.index is not None else torch.cuda.current_device()
    return cuda_choice(dtype, backend, torch.cuda.get_device_capability(index))


def cuda_choice(dtype: torch.dtype, backend: str, capability: tuple[int, int]) -> KernelChoice:
    """The CUDA part of `kernel_choice` (a pure function of dtype, backend, capability).

    On sm100 / sm103 (Blackwell) `torch._grouped_mm` returns non-zero, even non-finite,
    weight gradients for groups of zero rows (pytorch/pytorch#172439, open; #193633 on
    sm103 with torch 2.13): the kernel is kept (it is the fast path) and those
    experts' weight gradients are zeroed after it (`zero_empty_grads`).
    """
    if capability[0] not in (9, 10):  # torch's grouped kernel; elsewhere it loops behind offs.cpu()
        return KernelChoice(
            None, f"CUDA sm{capability[0]}{capability[1]}: torch._grouped_mm's kernel needs sm90 or sm100"
        )
    zero_empty = capability[0] == 10
    if dtype == torch.bfloat16:
        return KernelChoice(dtype, zero_empty_grads=zero_empty)
    if backend == "grouped_mm":  # explicit opt-in: run the fp32 / fp16 model's experts in bf16
        return KernelChoice(torch.bfloat16, zero_empty_grads=zero_empty)
    return KernelChoice(
        None,
        f"{dtype} on CUDA: the grouped kernel is bf16 only; enable bf16 autocast (trainer.precision=bf16) "
        "or set model.grouped_backend=grouped_mm to run the experts in bf16 (their outputs stay float32)",
    )


def alignment(dtype: torch.dtype) -> int:
    """Elements per 16 bytes: the row-stride multiple the kernel wants."""
    return 16 // dtype.itemsize


def padded_width(width: int, dtype: torch.dtype) -> int:
    """`width` rounded up to the kernel's alignment in `dtype`."""
    align = alignment(dtype)
    return -(-width // align) * align


def aligned_rows(x_ND: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x_ND` in `dtype` with 16-byte aligned rows: itself when it already is, else one
    copy (cast included) into the `[N, D]` view of a buffer with zero-padded rows."""
    N, D = x_ND.shape
    stride = x_ND.stride(0)
    contiguous_rows = x_ND.stride(1) == 1 and (stride >= D or N <= 1)
    if x_ND.dtype == dtype and contiguous_rows and stride % alignment(dtype) == 0 and x_ND.data_ptr() % 16 == 0:
        return x_ND
    buf_ND = x_ND.new_empty((N, padded_width(D, dtype)), dtype=dtype)
    buf_ND[:, D:].zero_()
    return buf_ND[:, :D].copy_(x_ND)


class _GroupedMM(torch.autograd.Function):
    """`torch._grouped_mm(x_ND[:, :D], w_EDH, offs)` in `w_EDH`'s dtype, for rows of any
    width and dtype.

    `x_ND` is `[N, D]`, or `[N, D_pad]` with zero columns past D (`GroupedExperts.input_rows`).
    Rows the kernel cannot read as they are get cast and padded in one copy
    (`aligned_rows`); the gradient rows handed to the kernel are made contiguous (autograd
    may pass an expanded or strided gradient); the input gradient comes back contiguous, in
    the input's dtype and width (for padded rows it is computed against the weight padded
    with zero rows, or padded after the GEMM when that weight would be the bigger copy).
    With `zero_empty`, the weight gradient of every group of zero rows is set to 0
    afterwards (the sm100 kernel leaves garbage there, see `cuda_choice`).
    """

    @staticmethod
    def forward(ctx, x_ND: torch.Tensor, w_EDH: torch.Tensor, offs_E: torch.Tensor, zero_empty: bool) -> torch.Tensor:  # type: ignore[override]
        ctx.x_dtype, ctx.x_width, ctx.zero_empty = x_ND.dtype, x_ND.shape[1], zero_empty
        D = w_EDH.shape[1]
        x_ND = aligned_rows(x_ND, w_EDH.dtype)[:, :D]
        ctx.save_for_backward(x_ND, w_EDH, offs_E)
        return torch._grouped_mm(x_ND, w_EDH, offs=offs_E)

    @staticmethod
    def backward(ctx, grad_NH: torch.Tensor):  # type: ignore[override]
        x_ND, w_EDH, offs_E = ctx.saved_tensors
        grad_NH = aligned_rows(grad_NH, w_EDH.dtype)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = _input_grad(grad_NH, w_EDH, offs_E, ctx.x_width).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:  # 2d x 2d: one [D, H] block per expert group of rows
            grad_w = torch._grouped_mm(x_ND.transpose(0, 1), grad_NH, offs=offs_E)
            if ctx.zero_empty:  # where, not a product: the garbage may be non-finite
                empty_E = torch.diff(offs_E, prepend=offs_E.new_zeros(1)) == 0
                grad_w = grad_w.masked_fill(empty_E.view(-1, 1, 1), 0)
        return grad_x, grad_w, None, None


def _input_grad(grad_NH: torch.Tensor, w_EDH: torch.Tensor, offs_E: torch.Tensor, width: int) -> torch.Tensor:
    """Contiguous `[N, width]` input gradient (zero columns past D)."""
    (E, D, H), N = w_EDH.shape, grad_NH.shape[0]
    if width > D and E * H <= N:  # the weight padded with zero rows is the smaller copy
        w_EDH = F.pad(w_EDH, (0, 0, 0, width - D))
        return torch._grouped_mm(grad_NH, w_EDH.transpose(-2, -1), offs=offs_E)
    grad_ND = torch._grouped_mm(grad_NH, w_EDH.transpose(-2, -1), offs=offs_E)
    if width > D:
        return F.pad(grad_ND, (0, width - D))
    # contiguous rows for the consumer (an index_add from row-padded rows is much slower on CPU)
    return grad_ND.contiguous()


class _Cast(torch.autograd.Function):
    """`cast` (a copy of `param` in the kernel's dtype and width, made outside autograd)
    with the gradient of `param`: the output gradient cast back, its padded columns
    dropped. Lets the kernel weights of one version of the parameters be reused."""

    @staticmethod
    def forward(ctx, param: torch.Tensor, cast: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.dtype, ctx.width = param.dtype, param.shape[-1]
        return cast.view_as(cast)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad[..., : ctx.width].to(ctx.dtype).contiguous(), None


def attach_cast(param: torch.Tensor, cast: torch.Tensor) -> torch.Tensor:
    """`cast` (a `kernel_copies` copy of `param`) in the autograd graph of `param`."""
    return _Cast.apply(param, cast)


def _kernel_param(p: torch.Tensor, dtype: torch.dtype, width: int) -> torch.Tensor:
    """`p` (`[E, D, H]` or `[E, H]`) in `dtype`, zero-padded along its last dim to `width`,
    as a new tensor outside autograd (one copy, cast included)."""
    with torch.no_grad():
        if width == p.shape[-1]:
            return p.to(dtype).contiguous()
        return F.pad(p.to(dtype), (0, width - p.shape[-1]))


def kernel_copies(w_EDH: torch.Tensor, b_EH: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's weight and bias in the kernel's `dtype` and aligned width, made outside
    autograd (attach them with `attach_cast`)."""
    H_pad = padded_width(w_EDH.shape[-1], dtype)
    return _kernel_param(w_EDH, dtype, H_pad), _kernel_param(b_EH, dtype, H_pad)


def kernel_weights(w_EDH: torch.Tensor, b_EH: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's weight and bias as the kernel reads them: the tensors themselves when
    they already are in `dtype` and aligned width, else copies in the graph of each."""
    if w_EDH.dtype == dtype and padded_width(w_EDH.shape[-1], dtype) == w_EDH.shape[-1]:
        return w_EDH, b_EH
    w_cast, b_cast = kernel_copies(w_EDH, b_EH, dtype)
    return attach_cast(w_EDH, w_cast), attach_cast(b_EH, b_cast)


def linear_rows(
    x_ND: torch.Tensor, w_EDH: torch.Tensor, b_EH: torch.Tensor, counts_E: torch.Tensor, offs_E: torch.Tensor,
    zero_empty: bool,
) -> torch.Tensor:  # fmt: skip
    """One grouped layer on the kernel with weights already in its dtype and width:
    `[N, D] -> [N, H_pad]` (zero columns past H)."""
    y_NH = _GroupedMM.apply(x_ND, w_EDH, offs_E, zero_empty)
    return y_NH + b_EH.repeat_interleave(counts_E, dim=0, output_size=x_ND.shape[0])


def kernel_linear(
    x_ND: torch.Tensor, w_EDH: torch.Tensor, b_EH: torch.Tensor, counts_E: torch.Tensor, offs_E: torch.Tensor,
    choice: KernelChoice,
) -> torch.Tensor:  # fmt: skip
    """One grouped layer on the kernel: `[N, D] -> [N, H_pad]` in the kernel dtype
    (zero columns past H; the padded outputs are exactly 0, see the module doc)."""
    assert choice.dtype is not None
    w_cast, b_cast = kernel_copies(w_EDH, b_EH, choice.dtype)
    w, b = attach_cast(w_EDH, w_cast), attach_cast(b_EH, b_cast)
    return linear_rows(x_ND, w, b, counts_E, offs_E, choice.zero_empty_grads)


def loop_linear(x_ND: torch.Tensor, w_EDH: torch.Tensor, b_EH: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """One grouped layer as one `addmm` per active expert: `[N, D] -> [N, H]`."""
    counts = host_ints(counts_E)  # host sync: the loop's segment sizes (loop backend only)
    xs = torch.split(x_ND, counts)
    # unbind once: indexing w_EDH[e] per expert would allocate a full [E, D, H]
    # gradient per expert in backward.
    ws, bs = w_EDH.unbind(0), b_EH.unbind(0)
    outs = [torch.addmm(bs[e], xs[e], ws[e]) for e, c in enumerate(counts) if c > 0]
    if not outs:
        return no_rows(x_ND, w_EDH.shape[-1], output_dtype(x_ND, w_EDH))
    return torch.cat(outs)


def no_rows(x_ND: torch.Tensor, width: int, dtype: torch.dtype, params: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
    """`[0, width]` in `dtype`, the dtype a layer with rows returns: under expert
    parallelism every rank must pass the same dtype to the all-to-all that follows,
    including a rank that received no rows.

    The result stays in the autograd graph of `x_ND` and of `params` (the experts'
    weights), so that it requires a gradient exactly when a layer with rows would: the
    return all-to-all of an expert-parallel step must run backward on every rank (its
    peers wait for it), also when `x_ND` itself needs no gradient. The weights get zero
    gradients, as the kernel gives an expert without rows.
    """
    zero = 0 * x_ND.sum().to(dtype)
    for p in params:
        zero = zero + 0 * p.sum().to(dtype)
    return x_ND.new_zeros(0, width, dtype=dtype) + zero


def expert_mlp(
    x_ND: torch.Tensor,
    counts_E: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    *,
    choice: KernelChoice,
    kernel_params: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """The expert MLPs (`Linear -> ReLU` per layer) over expert-contiguous rows:
    `[N, D] -> [N, H]` in `output_dtype`.

    Args:
        x_ND: rows sorted by expert, `counts_E` each; may be `[N, D_pad]` with zero
            columns past D.
        counts_E: rows per expert.
        weights: `[E, D_i, H_i]` per layer; `biases`: `[E, H_i]`.
        choice: `kernel_choice(x_ND, weights[0], backend)`.
        kernel_params: layer index -> its weight and bias in the kernel's dtype and
            width (e.g. a caller's cached copies); default `kernel_weights`.
    """
    out_dtype = output_dtype(x_ND, weights[0])
    if x_ND.shape[0] == 0:
        return no_rows(x_ND, weights[-1].shape[-1], out_dtype, (*weights, *biases))
    if choice.dtype is None:
        h = x_ND[:, : weights[0].shape[1]]
        for w_EDH, b_EH in zip(weights, biases, strict=True):
            h = torch.relu(loop_linear(h, w_EDH, b_EH, counts_E))
        return h.to(out_dtype)
    dtype = choice.dtype
    params = kernel_params or (lambda i: kernel_weights(weights[i], biases[i], dtype))
    offs_E = torch.cumsum(counts_E, 0).to(torch.int32)  # shared by every layer
    h = x_ND
    for i, w_EDH in enumerate(weights):
        w, b = params(i)
        # ReLU on the padded width, then the [N, H] view (aligned row stride) for the next layer
        h = torch.relu(linear_rows(h, w, b, counts_E, offs_E, choice.zero_empty_grads))[:, : w_EDH.shape[-1]]
    return h.to(out_dtype)


def all_experts_mlp(
    x_BD: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Every expert on every instance (batched matmul, no gather): `[E, B, H]`."""
    h = x_BD.unsqueeze(0)
    for w_EDH, b_EH in zip(weights, biases, strict=True):
        h = torch.relu(torch.baddbmm(b_EH.unsqueeze(1), h.expand(w_EDH.shape[0], -1, -1), w_EDH))
    return h


def _kernel_shape(a: torch.Tensor, b: torch.Tensor, offs: Any = None, bias: Any = None, out_dtype: Any = None):
    """Output of `torch._grouped_mm` for any float dtype, shape only."""
    dtype = out_dtype or a.dtype
    if b.dim() == 3:
        return a.new_empty((a.shape[0], b.shape[-1]), dtype=dtype)
    return a.new_empty((offs.shape[0], a.shape[0], b.shape[-1]), dtype=dtype)


@contextmanager
def any_dtype_kernel_meta() -> Iterator[None]:
    """While active, the kernel's meta (shape) rule accepts every float dtype.

    The stock rule accepts bf16 only (the CUDA fast path's dtype), although fp32 runs
    take the kernel on CPU and the loop on CUDA, both with outputs of this shape: a
    fake-tensor trace of an fp32 step (`trainer.estimate`) needs it.
    """
    lib = torch.library.Library("aten", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lib.impl("_grouped_mm", _kernel_shape, "Meta")
    try:
        yield
    finally:
        lib._destroy()
