"""Stacked expert MLPs run as one grouped matmul over expert-contiguous rows.

Every parameter of `GroupedExperts` has the expert dimension first (`weights[i]` is
`[E, D_i, H_i]`, `biases[i]` is `[E, H_i]`), so an expert-parallel wrapper can keep
only the slice `[e0:e0+E_local]` of each and build a `GroupedExperts` of E_local
experts from it (`from_stacked`). Each layer is `Linear -> ReLU` like `model.mlp.MLP`,
so an expert has the same function as an MMoE expert with the same `hidden`.

Grouped execution (`grouped_linear`): the rows of `x_ND` are sorted by expert and
`counts_E` says how many rows each expert owns. Backends, measured on the 2-core CPU
box (torch 2.13, 2 threads, N ~ 24k rows, D = H = 256, forward + backward):

- `grouped_mm` (default on CPU): `torch._grouped_mm(x_ND, w_EDH, offs=cumsum(counts))`,
  which in torch 2.13 runs on CPU for fp32/bf16/fp16 with autograd (zero-row groups
  allowed), plus the bias expanded per row. Needs 16-byte aligned rows (D, H
  multiples of 4 in fp32); other shapes fall back to `loop`. No host sync. Reaches
  0.95 of one `[N, D] @ [D, H]` matmul of the same rows at E = 8 and about 0.7-0.8 at
  E = 128 (~190 rows per expert; the CPU kernel runs one GEMM per group, and small
  GEMMs with a fresh weight each are less efficient): see
  `benchmarks/sparse_scaling.py`, `grouped_fraction_of_ideal`.
- `loop`: one `addmm` per *active* expert over its contiguous segment (a Python loop
  over experts, never over instances). Needs `counts.tolist()` (a host sync). Within
  noise of `grouped_mm` at E = 8, 5-15% slower at E = 128 in the training step. Used
  for dtypes `_grouped_mm` rejects (fp64) and, under `auto`, on CUDA for fp32, where
  `_grouped_mm` wants bf16.
- A padded `bmm` over `[E, max_count, D]` was tried and was no faster than either
  at E = 8 or 128 (with balanced counts; it wastes FLOPs when counts are skewed).

`auto` (default) picks `grouped_mm` where it is supported, else `loop`.

Legend: N routed rows (pairs), E experts (local), D input width, H layer width,
B instances.
"""

from __future__ import annotations

import math

import torch
from torch import nn

GROUPED_BACKENDS = ("auto", "grouped_mm", "loop")


def _use_grouped_mm(x_ND: torch.Tensor, w_EDH: torch.Tensor, backend: str) -> bool:
    if backend == "loop" or not hasattr(torch, "_grouped_mm"):
        return False
    if x_ND.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if backend == "auto" and not (x_ND.device.type == "cpu" or x_ND.dtype == torch.bfloat16):
        return False
    # the kernel wants 16-byte aligned rows and base pointers (D, H multiples of 4 in fp32)
    align = 16 // x_ND.element_size()
    return x_ND.shape[1] % align == 0 and w_EDH.shape[2] % align == 0 and x_ND.data_ptr() % 16 == 0


def grouped_linear(
    x_ND: torch.Tensor,
    w_EDH: torch.Tensor,
    b_EH: torch.Tensor,
    counts_E: torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """`y[n] = x[n] @ w[e(n)] + b[e(n)]` for expert-contiguous rows: `[N, D] -> [N, H]`."""
    N = x_ND.shape[0]
    x_ND = x_ND.contiguous()
    if _use_grouped_mm(x_ND, w_EDH, backend):
        offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
        y_NH = torch._grouped_mm(x_ND, w_EDH, offs=offs_E)
        return y_NH + b_EH.repeat_interleave(counts_E, dim=0, output_size=N)
    counts = counts_E.tolist()  # host sync: segment sizes for the loop
    xs = torch.split(x_ND, counts)
    # unbind once: indexing w_EDH[e] per expert would allocate a full [E, D, H]
    # gradient per expert in backward.
    ws, bs = w_EDH.unbind(0), b_EH.unbind(0)
    outs = [torch.addmm(bs[e], xs[e], ws[e]) for e, c in enumerate(counts) if c > 0]
    if not outs:
        # keep the result attached to x_ND: an all-to-all upstream must see a backward.
        return x_ND.new_zeros(0, w_EDH.shape[-1]) + 0 * x_ND.sum()
    return torch.cat(outs)


class GroupedExperts(nn.Module):
    """E expert MLPs with stacked weights.

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

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Grouped forward over expert-contiguous rows: `[N, D] -> [N, out_dim]`."""
        h = x_ND
        for w_EDH, b_EH in zip(self.weights, self.biases, strict=True):
            h = torch.relu(grouped_linear(h, w_EDH, b_EH, counts_E, backend=self.backend))
        return h

    def forward_dense(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Every expert on every instance (batched matmul, no gather): `[E, B, out_dim]`."""
        h = x_BD.unsqueeze(0)
        for w_EDH, b_EH in zip(self.weights, self.biases, strict=True):
            h = torch.relu(torch.baddbmm(b_EH.unsqueeze(1), h.expand(w_EDH.shape[0], -1, -1), w_EDH))
        return h
