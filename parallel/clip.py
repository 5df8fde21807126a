"""Gradient clipping by the norm of the whole model's network gradient, experts sharded or not.

The native engine (`trainer.engine`) clips with `clip_grad_norm_` after the gradient
sync; DeepSpeed clips inside its own step (`parallel.deepspeed_engine`). By then the
non-expert gradients are the same on every rank (DDP) and each rank holds the gradient
of its E/ep expert slice (the same slice as its expert-data-parallel peers,
`parallel.expert.grads`). The squared norm is the local non-expert part plus the expert
part summed over the expert-parallel group, so every rank clips by the same coefficient
and counts each expert once. A per-rank norm (over only the local experts) would clip
the replicated weights differently on each rank and let them drift apart.

Precision: one norm per gradient in float32 from a fused multi-tensor kernel (no copy of
any gradient), their squares summed in float64. The expert part's all-reduce is the one
collective, on a device tensor over the expert-parallel group (NCCL on GPUs).
"""

from __future__ import annotations

import torch
from torch import nn

from parallel import dist as pdist
from parallel.expert.mesh import ExpertMesh


@torch.no_grad()
def clip_grad_norm_(
    params: list[nn.Parameter], max_norm: float, *, sharded_experts: list[nn.Parameter], mesh: ExpertMesh | None
) -> torch.Tensor:
    """Clip `params`' gradients by the global norm (see the module doc).

    Args:
        params: every parameter the network optimizer steps (experts included).
        max_norm: the norm to clip to.
        sharded_experts: the expert parameters sharded over the expert-parallel group
            (`parallel.expert.params.expert_parameters`; empty when they are replicated).
        mesh: this rank's expert mesh (None: one process, nothing sharded).

    Returns:
        The total norm (before clipping).
    """
    experts = {id(p) for p in sharded_experts}
    own = [p.grad for p in params if p.grad is not None and id(p) not in experts]
    sliced = [p.grad for p in sharded_experts if p.grad is not None]
    device = params[0].device if params else torch.device("cpu")

    def squared(grads: list[torch.Tensor]) -> torch.Tensor:
        """Sum of squared gradient norms (see the module doc)."""
        if not grads:
            return torch.zeros((), device=device, dtype=torch.float64)
        norms = torch._foreach_norm([g.detach() for g in grads], 2, dtype=torch.float32)
        return torch.stack(norms).double().square().sum()

    expert_sq = squared(sliced)
    if mesh is not None and mesh.ep > 1 and mesh.world_size > 1:
        pdist.all_reduce(expert_sq, group=mesh.ep_group)
    total = (squared(own) + expert_sq).sqrt().float()
    torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, total)
    return total
