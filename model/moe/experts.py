"""Stacked expert MLPs run as one grouped matmul over expert-contiguous rows.

Every parameter of `GroupedExperts` has the expert dimension first (`weights[i]` is
`[E, D_i, H_i]`, `biases[i]` is `[E, H_i]`), so an expert-parallel wrapper can keep
only the slice `[e0:e0+E_local]` of each and build a `GroupedExperts` of E_local
experts from it (`from_stacked`). Each layer is `Linear -> ReLU` like `model.mlp.MLP`,
so an expert has the same function as an MMoE expert with the same `hidden`.

Grouped execution: the rows of `x_ND` are sorted by expert and `counts_E` says how
many rows each expert owns. The kernel is `torch._grouped_mm(x_ND, w_EDH, offs)`
(forward, and the two grouped GEMMs of its backward), plus the bias expanded per row.
No host sync: the group offsets stay on the device.

Alignment and where the padding lives. The kernel (CPU and CUDA) wants every row
stride 16-byte aligned: the row stride of `x_ND` and of the gradient rows (a multiple
of 4 elements in fp32, of 8 in bf16) and the row stride of `w_EDH`; it checks strides,
not sizes. Census-Income's expert input is 32*16+7 = 519 wide, so its rows are not
aligned as they come. The padding lives in the *activations*, never in the parameters:

- Unaligned input width D: the dispatchers gather the pair rows through
  `GroupedExperts.input_rows`, which zero-pads the B instance rows to D_pad (16 bytes
  in the kernel dtype: a multiple of 4 in fp32, of 8 in bf16) before the gather, so the
  gather itself writes `[N, D_pad]` rows and the kernel reads their `[N, D]` view (row
  stride D_pad) with the `[E, D, H]` weight as it is. Backward hands back dense
  `[N, D_pad]` input-gradient rows (a strided index_add is ~5x slower on CPU): the GEMM
  against the weight padded with zero rows when that copy (`E*D*H`) is smaller than the
  rows, else the GEMM output padded (`N*D`). So: no parameter shape changes
  (checkpoints, DCP, the expert-parallel DTensor slices `[E/ep, ...]` along dim 0,
  resharding and `from_stacked` are untouched), no wasted FLOPs, a copy of B rows per
  step instead of N. Rows handed over as plain `[N, D]` (direct callers) are padded
  inside, in one copy with any cast, and their gradient made dense (a second copy). Cost
  on CPU (fp32, Census widths D = 519, hidden [128, 64], B = 4096, T = 2, N ~ 16k pairs,
  gather + experts forward + backward, 1 thread, process CPU time on the shared 2-core
  box, two runs): the padded kernel takes 0.96-1.17x the time of the same kernel on D =
  520 rows that need no padding, and runs at 0.87-1.07x the speed of the per-expert loop
  it replaces, at E = 8, 16, 32, 64, without its host sync. `OMP_NUM_THREADS=1 python -m
  benchmarks.gpu --device cpu --precision fp32 --in-dim 519 --hidden 128,64 --tasks 2
  --batch 4096 --experts 8,16,32,64 --modes progressive --threads 1 --cpu-timer process
  --warmup 2 --iters 15 --config-s 30 --budget-s 900 --matmul-size 1024 --out FILE`
  (`padding_cost`, `grouped_speedup_over_loop`). Padding the N rows inside the experts
  instead (two fresh N*D_pad buffers per step, forward rows and dense gradient) measured
  1.11-1.35x. Storing the first weight padded (`[E, D_pad, H]`) would save nothing here
  and change parameter shapes.
- Unaligned layer width H (no shipped config has one): the weight and bias are
  padded with zero columns per step (`[E, D, H_pad]`, a copy of the weight), the
  layer computes `[N, H_pad]` whose padded columns are exactly zero (zero weight,
  zero bias, ReLU(0) = 0), and the next layer reads its `[N, H]` view (row stride
  H_pad) without another copy. Storing padded parameters instead would save that
  copy but change parameter shapes; a width of 8k elements avoids both.

Precision and backends (`backend`, model key `model.grouped_backend`):

- `auto` (default), `grouped_mm`: the kernel. Its dtype is the autocast dtype when
  autocast is enabled for the device (`torch._grouped_mm` is not autocast-registered,
  so inputs, weights and bias are cast here; fp32 master weights get their gradient
  back in fp32 through the cast), else the promoted dtype of input and weight. CPU
  runs fp32, bf16 and fp16. CUDA runs the kernel in bf16 only (its fast path is bf16
  on sm90 / sm100; every other case falls back inside torch to a loop behind a host
  sync): for fp32 on CUDA, `auto` takes the exact fp32 `loop` (and warns), while an
  explicit `grouped_mm` runs the kernel in bf16 (the rows and weights are rounded
  to bf16, outputs cast back to fp32 by the layers that follow).
- `loop`: one `addmm` per *active* expert over its contiguous segment (a Python loop
  over experts, never over instances); needs the segment sizes on the host (one
  `host_ints` read per call). Chosen explicitly, or the fallback for what the kernel
  cannot run: fp64, fp16 or fp32 under `auto` on CUDA, CUDA devices without the fast
  path, devices other than CPU and CUDA, a torch without `_grouped_mm`.
- Every fallback to the loop is reported once per reason with a
  `GroupedFallbackWarning` naming the reason, shapes and dtype (model/ does not log).
- sm100 / sm103: `torch._grouped_mm`'s weight gradient of an expert with no rows is
  garbage there (pytorch/pytorch#172439); those gradients are zeroed after the kernel
  (`KernelChoice.zero_empty_grads`, one `GroupedKernelWorkaround` warning).
- Dtypes on the way in: `input_rows` casts the B instance rows to the compute dtype
  before the gather (one copy of B rows, none when nothing changes), so the N pair rows
  are written once, in the kernel's dtype and aligned width, and under expert
  parallelism travel in that dtype (bf16 under bf16 autocast).
- Kernel weights: the weights in the kernel's dtype and width are a copy of every
  expert's weights; without autograd (evaluation) the copy of a parameter version is
  kept and reused until the parameters change (`GroupedExperts`).
- A padded `bmm` over `[E, max_count, D]` was tried and was no faster than either at
  E = 8 or 128 (with balanced counts; it wastes FLOPs when counts are skewed).

Legend: N routed rows (pairs), E experts (local), D input width, H layer width,
B instances.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.moe.host import host_ints

GROUPED_BACKENDS = ("auto", "grouped_mm", "loop")
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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
    if dtype not in _KERNEL_DTYPES:
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


def _alignment(dtype: torch.dtype) -> int:
    return 16 // dtype.itemsize


def _to_aligned_rows(x_ND: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x_ND` in `dtype` with 16-byte aligned rows: itself when it already is, else one
    copy (cast included) into the `[N, D]` view of a buffer with zero-padded rows."""
    N, D = x_ND.shape
    align = _alignment(dtype)
    stride = x_ND.stride(0)
    dense_rows = x_ND.stride(1) == 1 and (stride >= D or N <= 1)
    if x_ND.dtype == dtype and dense_rows and stride % align == 0 and x_ND.data_ptr() % 16 == 0:
        return x_ND
    D_pad = -(-D // align) * align
    buf_ND = x_ND.new_empty((N, D_pad), dtype=dtype)
    buf_ND[:, D:].zero_()
    return buf_ND[:, :D].copy_(x_ND)


class _GroupedMM(torch.autograd.Function):
    """`torch._grouped_mm(x_ND[:, :D], w_EDH, offs)` in `w_EDH`'s dtype, for rows of any
    width and dtype.

    `x_ND` is `[N, D]`, or `[N, D_pad]` with zero columns past D (`GroupedExperts.input_rows`).
    Rows the kernel cannot read as they are get cast and padded in one copy
    (`_to_aligned_rows`); the gradient rows handed to the kernel are made dense (autograd
    may pass an expanded or strided gradient); the input gradient comes back dense, in
    the input's dtype and width (for padded rows it is computed against the weight padded
    with zero rows, or padded after the GEMM when that weight would be the bigger copy).
    With `zero_empty`, the weight gradient of every group of zero rows is set to 0
    afterwards (the sm100 kernel leaves garbage there, see `cuda_choice`).
    """

    @staticmethod
    def forward(ctx, x_ND: torch.Tensor, w_EDH: torch.Tensor, offs_E: torch.Tensor, zero_empty: bool) -> torch.Tensor:  # type: ignore[override]
        ctx.x_dtype, ctx.x_width, ctx.zero_empty = x_ND.dtype, x_ND.shape[1], zero_empty
        D = w_EDH.shape[1]
        x_ND = _to_aligned_rows(x_ND, w_EDH.dtype)[:, :D]
        ctx.save_for_backward(x_ND, w_EDH, offs_E)
        return torch._grouped_mm(x_ND, w_EDH, offs=offs_E)

    @staticmethod
    def backward(ctx, grad_NH: torch.Tensor):  # type: ignore[override]
        x_ND, w_EDH, offs_E = ctx.saved_tensors
        grad_NH = _to_aligned_rows(grad_NH, w_EDH.dtype)
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
    """Dense `[N, width]` input gradient (zero columns past D)."""
    (E, D, H), N = w_EDH.shape, grad_NH.shape[0]
    if width > D and E * H <= N:  # the weight padded with zero rows is the smaller copy
        w_EDH = F.pad(w_EDH, (0, 0, 0, width - D))
        return torch._grouped_mm(grad_NH, w_EDH.transpose(-2, -1), offs=offs_E)
    grad_ND = torch._grouped_mm(grad_NH, w_EDH.transpose(-2, -1), offs=offs_E)
    if width > D:
        return F.pad(grad_ND, (0, width - D))
    # dense rows for the consumer (an index_add from row-padded rows is ~5x slower on CPU)
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


def _kernel_param(p: torch.Tensor, dtype: torch.dtype, width: int) -> torch.Tensor:
    """`p` (`[E, D, H]` or `[E, H]`) in `dtype`, zero-padded along its last dim to `width`,
    as a new tensor outside autograd (one copy, cast included)."""
    with torch.no_grad():
        if width == p.shape[-1]:
            return p.to(dtype).contiguous()
        return F.pad(p.to(dtype), (0, width - p.shape[-1]))


def _linear_rows(
    x_ND: torch.Tensor, w_EDH: torch.Tensor, b_EH: torch.Tensor, counts_E: torch.Tensor, offs_E: torch.Tensor,
    zero_empty: bool,
) -> torch.Tensor:  # fmt: skip
    """One grouped layer on the kernel with weights already in its dtype and width:
    `[N, D] -> [N, H_pad]` (zero columns past H)."""
    y_NH = _GroupedMM.apply(x_ND, w_EDH, offs_E, zero_empty)
    return y_NH + b_EH.repeat_interleave(counts_E, dim=0, output_size=x_ND.shape[0])


def _padded_width(H: int, dtype: torch.dtype) -> int:
    align = _alignment(dtype)
    return -(-H // align) * align


def _kernel_copies(w_EDH: torch.Tensor, b_EH: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's weight and bias in the kernel's `dtype` and aligned width, made outside
    autograd (attach them with `_Cast`)."""
    H_pad = _padded_width(w_EDH.shape[-1], dtype)
    return _kernel_param(w_EDH, dtype, H_pad), _kernel_param(b_EH, dtype, H_pad)


def _kernel_linear(
    x_ND: torch.Tensor, w_EDH: torch.Tensor, b_EH: torch.Tensor, counts_E: torch.Tensor, offs_E: torch.Tensor,
    choice: KernelChoice,
) -> torch.Tensor:  # fmt: skip
    """One grouped layer on the kernel: `[N, D] -> [N, H_pad]` in the kernel dtype
    (zero columns past H; the padded outputs are exactly 0, see the module doc)."""
    assert choice.dtype is not None
    w_cast, b_cast = _kernel_copies(w_EDH, b_EH, choice.dtype)
    w, b = _Cast.apply(w_EDH, w_cast), _Cast.apply(b_EH, b_cast)
    return _linear_rows(x_ND, w, b, counts_E, offs_E, choice.zero_empty_grads)


def _loop_linear(x_ND: torch.Tensor, w_EDH: torch.Tensor, b_EH: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    counts = host_ints(counts_E)  # host sync: the loop's segment sizes (loop backend only)
    xs = torch.split(x_ND, counts)
    # unbind once: indexing w_EDH[e] per expert would allocate a full [E, D, H]
    # gradient per expert in backward.
    ws, bs = w_EDH.unbind(0), b_EH.unbind(0)
    outs = [torch.addmm(bs[e], xs[e], ws[e]) for e, c in enumerate(counts) if c > 0]
    if not outs:
        return _no_rows(x_ND, w_EDH.shape[-1], output_dtype(x_ND, w_EDH))
    return torch.cat(outs)


def _no_rows(x_ND: torch.Tensor, width: int, dtype: torch.dtype, params: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
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
        return _no_rows(x_ND, w_EDH.shape[-1], out_dtype)
    if choice.dtype is None:
        return _loop_linear(x_ND, w_EDH, b_EH, counts_E).to(out_dtype)
    offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
    return _kernel_linear(x_ND, w_EDH, b_EH, counts_E, offs_E, choice)[:, : w_EDH.shape[-1]].to(out_dtype)


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
        width = D if choice.dtype is None else _padded_width(D, dtype)
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
        H_pad = _padded_width(w_EDH.shape[-1], choice.dtype)
        if w_EDH.dtype == choice.dtype and H_pad == w_EDH.shape[-1]:
            return w_EDH, b_EH  # the parameters as they are: no copy
        if torch.is_grad_enabled():  # training: made per call (class doc)
            self._kernel_cache.pop(i, None)
            w_cast, b_cast = _kernel_copies(w_EDH, b_EH, choice.dtype)
            return _Cast.apply(w_EDH, w_cast), _Cast.apply(b_EH, b_cast)
        key = (choice.dtype, w_EDH._version, b_EH._version, w_EDH.data_ptr(), b_EH.data_ptr())
        cached = self._kernel_cache.get(i)
        if cached is not None and cached[0] == key:
            w_cast, b_cast = cached[1], cached[2]
        else:
            w_cast, b_cast = _kernel_copies(w_EDH, b_EH, choice.dtype)
            self._kernel_cache[i] = (key, w_cast, b_cast)
        return _Cast.apply(w_EDH, w_cast), _Cast.apply(b_EH, b_cast)

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Grouped forward over expert-contiguous rows: `[N, D] -> [N, out_dim]` in
        `output_dtype`.

        `x_ND` may also be `[N, D_pad]` with zero columns past D (`input_rows`).
        """
        choice = _resolve(x_ND, self.weights[0], self.backend)
        out_dtype = output_dtype(x_ND, self.weights[0])
        if x_ND.shape[0] == 0:
            return _no_rows(x_ND, self.out_dim, out_dtype, tuple(self.parameters()))
        if choice.dtype is None:
            h = x_ND[:, : self.in_dim]
            for w_EDH, b_EH in zip(self.weights, self.biases, strict=True):
                h = torch.relu(_loop_linear(h, w_EDH, b_EH, counts_E))
            return h.to(out_dtype)
        offs_E = torch.cumsum(counts_E, 0).to(torch.int32)  # shared by every layer
        h = x_ND
        for i, w_EDH in enumerate(self.weights):
            w, b = self._kernel_params(i, choice)
            # ReLU on the padded width, then the [N, H] view (aligned row stride) for the next layer
            h = torch.relu(_linear_rows(h, w, b, counts_E, offs_E, choice.zero_empty_grads))[:, : w_EDH.shape[-1]]
        return h.to(out_dtype)

    def forward_dense(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Every expert on every instance (batched matmul, no gather): `[E, B, out_dim]`."""
        h = x_BD.unsqueeze(0)
        for w_EDH, b_EH in zip(self.weights, self.biases, strict=True):
            h = torch.relu(torch.baddbmm(b_EH.unsqueeze(1), h.expand(w_EDH.shape[0], -1, -1), w_EDH))
        return h
