"""Process-group set-up and the collectives every other module goes through.

Set-up: under torchrun the rank, world size and rendezvous come from the environment;
without it a world of one is created on a free loopback port, so single-process runs
take the same (DMP + process group) code path as distributed ones. The main group is
gloo on CPU and NCCL on CUDA.

Collectives (DESIGN section 5): nothing outside this module calls a `torch.distributed`
collective (a test walks the sources). The helpers put each tensor where a backend can
take it:

- device tensors (activations, gradients, expert counts, evaluation rows) go over the
  group they are given, NCCL on GPUs;
- host-side bookkeeping (loss parts read for logging, timers, loader rates, checkpoint
  flags, RNG states, barriers around file writes) goes over `host_group()`, a gloo group
  over all ranks.

Design choice: a dedicated gloo group beside the main group, rather than one group with
the per-device backend `cpu:gloo,cuda:nccl`. The main group stays a plain NCCL group,
which is what TorchRec's sharders, DMP and DeepSpeed were written and tested against
(they read `get_backend()` and some pick code paths by it), and the split between host
and device traffic is explicit at every call site: a CPU tensor sent over an NCCL
subgroup is a `ValueError` here, not a hang or a silent device copy. On CPU the main
group is already gloo and `host_group()` is the main group itself (no extra group).
Host collectives are supported over the whole world only, which is all the trainer
needs; per-mesh traffic (expert-parallel groups) is device traffic.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

_HOST_GROUP: dist.ProcessGroup | None = None
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


@dataclass(frozen=True, slots=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A free TCP port on the loopback interface (for a local rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def local_rank_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """The torchrun-style environment of `rank` in a world of `world_size` processes on
    this host, meeting at 127.0.0.1:`port` (for processes spawned without torchrun)."""
    return {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
    }


def init_distributed(*, device: str = "auto", timeout_s: float = 600.0) -> DistInfo:
    """Initialise (or reuse) the default process group and pick this rank's device.

    Args:
        device: "auto" (CUDA if available, else CPU), "cpu" or "cuda".
        timeout_s: collective timeout.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"trainer.device must be auto, cpu or cuda, got {device!r}")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("trainer.device=cuda but CUDA is not available")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        if "RANK" in os.environ:
            # Under torchrun the workers share the agent's store across restarts; keys
            # left by a dead attempt (e.g. a killed rank's gloo address) were read by
            # the next attempt ("connection refused"). A per-attempt prefix avoids it.
            store, rank, world = next(iter(dist.rendezvous("env://", timeout=timedelta(seconds=timeout_s))))
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            dist.init_process_group(
                backend,
                store=dist.PrefixStore(f"trainer/attempt_{attempt}", store),
                rank=rank,
                world_size=world,
                timeout=timedelta(seconds=timeout_s),
            )
        else:
            dist.init_process_group(
                backend,
                init_method=f"tcp://127.0.0.1:{free_port()}",
                rank=0,
                world_size=1,
                timeout=timedelta(seconds=timeout_s),
            )
    init_host_group()
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=dev,
        backend=dist.get_backend(),
    )


def init_host_group(timeout_s: float = 600.0) -> dist.ProcessGroup:
    """Create (once) the gloo group for host-side bookkeeping; collective on first call.

    The main group itself when it is gloo (CPU runs, the test harness), else a new gloo
    group over all ranks. Called by `init_distributed`; processes that initialise the
    default group themselves (tests) get it lazily from `host_group()`.
    """
    global _HOST_GROUP
    if _HOST_GROUP is None or not _is_live(_HOST_GROUP):
        if _uses_gloo(None):
            _HOST_GROUP = dist.GroupMember.WORLD
        else:
            _HOST_GROUP = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    assert _HOST_GROUP is not None
    return _HOST_GROUP


def _is_live(group: dist.ProcessGroup) -> bool:
    # a group from an earlier default group (destroyed and re-initialised in one
    # process, as tests do) must not be reused
    return group is dist.GroupMember.WORLD or group in dist.distributed_c10d._world.pg_map


def host_group() -> dist.ProcessGroup:
    """The gloo group over all ranks that carries CPU tensors (see module doc)."""
    return init_host_group()


def shutdown(exit_code: int = 0) -> None:
    """Tear down the process group and exit hard.

    Ranks were seen to abort at interpreter exit after finishing (gloo / TorchRec
    teardown order); destroying the group, flushing and `os._exit` avoids it.
    """
    # after a failure a peer may be gone and destroying the group can block forever;
    # exit at once and let torchrun stop / restart the others
    if exit_code == 0 and dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


# -- collectives --------------------------------------------------------------------
#
# Every helper is a no-op (or the identity) without a process group or in a world of
# one, so single-process code calls them unconditionally.


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Ranks in `group` (default: all), 1 without a process group."""
    return dist.get_world_size(group) if dist.is_initialized() else 1


def _uses_gloo(group: dist.ProcessGroup | None) -> bool:
    return "gloo" in str(dist.get_backend(group))


def _route(t: torch.Tensor, group: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    """The group that can carry `t`: the given one for device tensors, the host group
    for CPU tensors over the whole world when the given group cannot take them."""
    if t.device.type == "cpu":
        if _uses_gloo(group):
            return group
        if group is None or group is dist.GroupMember.WORLD:
            return host_group()
        raise ValueError(
            "a CPU tensor cannot go over a non-gloo subgroup; move it to the device or reduce it over the world"
        )
    if _uses_gloo(group) and t.device.type != "cpu" and not _uses_gloo(None):
        raise ValueError(f"a {t.device.type} tensor was sent over the gloo host group; use the device group")
    return group


def all_reduce(t: torch.Tensor, op: str = "sum", group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """In-place all-reduce of `t` (`op`: sum, max, min); returns `t`. No autograd."""
    if world_size(group) > 1:
        dist.all_reduce(t, op=_OPS[op], group=_route(t, group))
    return t


def all_reduce_async(t: torch.Tensor, group: dist.ProcessGroup | None = None) -> Any:
    """Start an in-place sum of `t` over `group` and return its work handle (`wait()`
    it before reading `t`); None when there is nothing to reduce (a group of one)."""
    if world_size(group) == 1:
        return None
    return dist.all_reduce(t, op=dist.ReduceOp.SUM, group=_route(t, group), async_op=True)


def all_reduce_mean(t: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """In-place mean over the ranks of `group`; returns `t`."""
    n = world_size(group)
    if n > 1:
        all_reduce(t, "sum", group).div_(n)
    return t


def all_gather_cat(t: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Every rank's `t` (same shape on every rank) concatenated along dim 0, in rank order."""
    n = world_size(group)
    if n == 1:
        return t
    t = t.contiguous()
    out = t.new_empty((n * t.shape[0], *t.shape[1:]))
    dist.all_gather_into_tensor(out, t, group=_route(t, group))
    return out


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's picklable `obj`, in rank order (over the host group)."""
    n = world_size()
    if n == 1:
        return [obj]
    out: list[Any] = [None] * n
    dist.all_gather_object(out, obj, group=host_group())
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s picklable `obj` on every rank (over the host group)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=host_group())
    return box[0]


def broadcast(t: torch.Tensor, src: int = 0, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """In-place broadcast of `t` from global rank `src`; returns `t`."""
    if world_size(group) > 1:
        dist.broadcast(t, src=src, group=_route(t, group))
    return t


def barrier() -> None:
    """All ranks meet (over the host group: no device is involved)."""
    if world_size() > 1:
        dist.barrier(group=host_group())


def all_to_all_single(
    out: torch.Tensor,
    inp: torch.Tensor,
    out_splits: Sequence[int] | None = None,
    in_splits: Sequence[int] | None = None,
    *,
    group: dist.ProcessGroup | None = None,
    autograd: bool = False,
) -> torch.Tensor:
    """Uneven all-to-all along dim 0 into the pre-sized `out`; returns the result.

    `autograd=True` uses the differentiable version (the reverse all-to-all in
    backward). Split sizes are host ints: the caller reads them once per exchange.
    """
    group = _route(inp, group)
    o = None if out_splits is None else list(out_splits)
    i = None if in_splits is None else list(in_splits)
    if autograd:
        return dist_fn.all_to_all_single(out, inp, o, i, group=group or dist.group.WORLD)
    dist.all_to_all_single(out, inp, o, i, group=group)
    return out


def new_group(ranks: list[int]) -> dist.ProcessGroup:
    """A subgroup of the main group's backend (collective: every rank calls it for every group)."""
    return dist.new_group(ranks)
