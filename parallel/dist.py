"""Process-group set-up shared by every entry point.

Under torchrun the rank, world size and rendezvous come from the environment; without
it a world of one is created on a free loopback port, so single-process runs take the
same (DMP + process group) code path as distributed ones. gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


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
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=dev,
        backend=dist.get_backend(),
    )


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
