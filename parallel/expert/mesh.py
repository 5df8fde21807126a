"""The expert-parallel mesh: which ranks share experts, and the start-up check of `ep`.

Layout (DESIGN section 5). World W, expert-parallel size `ep` (divides W and E):

- data parallel: all W ranks (network parameters by DDP, balance counts all-reduced);
- expert-parallel groups: consecutive ranks `[g*ep, (g+1)*ep)`; inside one, rank with
  local index j owns experts `[j*E/ep, (j+1)*E/ep)`;
- expert-data-parallel groups: ranks holding the same experts, `{j, j+ep, j+2ep, ...}`
  (size W/ep); expert gradients are all-reduced only there (`parallel.expert.grads`).

`ExpertMesh` holds this rank's groups as c10d process groups (what the collectives of
`parallel.dist` take) and, for checkpoints, the same layout as a `(W/ep, ep)` DTensor
device mesh with axes `("edp", "ep")` (`ExpertMesh.device_mesh`). The device mesh is
built on its first use, not with the groups: `init_device_mesh` creates process groups
of its own, and only runs that write or read a checkpoint under ep > 1 need them. It is
kept on the `ExpertMesh` instance, so every checkpoint of the run reuses it (creating
it again would create new process groups each time).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch.distributed as dist

from parallel import dist as pdist

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


@dataclass
class ExpertMesh:
    """Process groups of this rank (every rank builds every group, as c10d requires)."""

    world_size: int
    ep: int
    rank: int
    ep_group: dist.ProcessGroup | None
    edp_group: dist.ProcessGroup | None
    dp_group: dist.ProcessGroup | None = None  # None = WORLD
    device_type: str = "cpu"  # of the run's tensors (the DTensor mesh of checkpoints)
    _device_mesh: DeviceMesh | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    @property
    def edp_size(self) -> int:
        return self.world_size // self.ep

    def device_mesh(self) -> DeviceMesh:
        """The `(W/ep, ep)` DTensor mesh with axes `("edp", "ep")`, built on the first call
        (collective: every rank makes its first call at the same point, see the module doc)."""
        if self._device_mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            self._device_mesh = init_device_mesh(
                self.device_type, (self.world_size // self.ep, self.ep), mesh_dim_names=("edp", "ep")
            )
        return self._device_mesh


def check_ep(ep: int, world_size: int, num_experts: int | None) -> None:
    """Start-up check: `ep` must divide the world size and the expert count."""
    if ep < 1:
        raise ValueError(f"parallel.ep must be >= 1, got {ep}")
    if world_size % ep:
        raise ValueError(f"parallel.ep={ep} must divide the world size {world_size}")
    if num_experts is not None and num_experts % ep:
        raise ValueError(f"parallel.ep={ep} must divide model.num_experts={num_experts}")


def build_mesh(ep: int, *, device_type: str = "cpu") -> ExpertMesh:
    """This rank's `ExpertMesh` over the default process group (collective)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    check_ep(ep, world, None)
    ep_group = edp_group = None
    for g in range(world // ep):
        ranks = list(range(g * ep, (g + 1) * ep))
        group = pdist.new_group(ranks)
        if rank in ranks:
            ep_group = group
    for j in range(ep):
        ranks = list(range(j, world, ep))
        group = pdist.new_group(ranks)
        if rank in ranks:
            edp_group = group
    return ExpertMesh(
        world_size=world, ep=ep, rank=rank, ep_group=ep_group, edp_group=edp_group, device_type=device_type
    )
