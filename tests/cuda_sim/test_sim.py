"""The simulation itself: it reports CUDA, computes what the CPU computes, and fails loudly
where a GPU run would hang, crash or sync (device mixing, host reads outside the door,
collectives NCCL refuses or on which the ranks disagree)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

from model.moe.host import host_flag, host_ints, to_host
from parallel import dist as pdist
from tests._dist import run_ranks
from tests.cuda_sim.sim import (
    SIM_BACKEND,
    SimCollectiveError,
    SimDeviceError,
    SimHostReadError,
    SimTensor,
    collective_log,
    plain,
    simulate_cuda,
    to_sim,
)

pytestmark = pytest.mark.cuda_sim


def test_reports_cuda_and_computes_like_the_cpu() -> None:
    torch.manual_seed(0)
    w_cpu, x_cpu = torch.randn(4, 3, requires_grad=True), torch.randn(5, 4)
    (x_cpu @ w_cpu).square().sum().backward()
    with simulate_cuda():
        w = torch.nn.Parameter(to_sim(w_cpu.detach().clone()))
        x = to_sim(x_cpu)
        assert x.device.type == "cuda" and x.is_cuda and w.device == torch.device("cuda", 0)
        y = x @ w
        z = torch.zeros(2, device=y.device)
        assert isinstance(y, SimTensor) and isinstance(z, SimTensor) and z.device.type == "cuda"
        y.square().sum().backward()
        assert isinstance(w.grad, SimTensor) and w.grad.device.type == "cuda"
        torch.testing.assert_close(plain(w.grad), w_cpu.grad)
        assert isinstance(torch.tensor([1, 2], device="cuda"), SimTensor)
        assert isinstance(torch.ones(3).to("cuda:0"), SimTensor)  # (an index-less "cuda" needs the runtime)


def test_autocast_on_the_simulated_device() -> None:
    with simulate_cuda():
        x, w = to_sim(torch.randn(4, 8)), to_sim(torch.randn(8, 2))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16
            assert (x @ w).dtype == torch.bfloat16
        assert (x @ w).dtype == torch.float32 and not torch.is_autocast_enabled("cpu")


def test_capability_is_the_simulated_one() -> None:
    with simulate_cuda(capability=(10, 0)):
        assert torch.cuda.get_device_capability(0) == (10, 0)


@pytest.mark.parametrize(
    "read",
    [
        lambda t: t.sum().item(),
        lambda t: int(t[0]),
        lambda t: float(t[0]),
        lambda t: bool(t[0] > 0),
        lambda t: t.tolist(),
        lambda t: t.numpy(),
        lambda t: torch.equal(t, t),
        lambda t: torch.zeros(3, dtype=torch.int64).copy_(t),
        lambda t: t.cpu().tolist(),  # .cpu() outside the door stays on the device; the read fails
    ],
)
def test_host_reads_outside_the_door_fail_loudly(read) -> None:
    with simulate_cuda():
        t = to_sim(torch.tensor([3, 1, 2]))
        with pytest.raises(SimHostReadError, match="model.moe.host"):
            read(t)


def test_the_door_reads() -> None:
    with simulate_cuda():
        t = to_sim(torch.tensor([3, 1, 2]))
        assert host_ints(t) == [3, 1, 2] and host_flag(t[0] > 2)
        host = to_host(t)
        assert type(host) is torch.Tensor and host.device.type == "cpu" and host.tolist() == [3, 1, 2]


def test_mixing_devices_fails_like_cuda() -> None:
    with simulate_cuda():
        t = to_sim(torch.ones(3))
        with pytest.raises(SimDeviceError, match="same device"):
            t + torch.ones(3)
        with pytest.raises(SimDeviceError):
            torch.zeros(3).index_select(0, torch.tensor([0], device="cuda"))
        assert isinstance(t * torch.tensor(2.0), SimTensor)  # a 0-dim CPU scalar is fine, as on CUDA
        t.copy_(torch.arange(3.0))  # host to device: fine
        assert plain(t).tolist() == [0.0, 1.0, 2.0]


# -- collectives on 2 ranks ----------------------------------------------------------


def _collectives(rank: int, world: int) -> dict:
    assert dist.get_backend() == SIM_BACKEND
    out: dict = {}
    with simulate_cuda():
        t = to_sim(torch.full((3,), float(rank + 1)))
        with collective_log() as log:
            pdist.all_reduce(t)
        out["sum"] = plain(t).tolist()
        out["log"] = [(r.op, r.backend, r.dtype) for r in log]
        # uneven all-to-all with agreeing splits, autograd through it
        x = to_sim(torch.arange(6.0).view(3, 2) + 10 * rank, requires_grad=True)
        sends = [[1, 2], [2, 1]][rank]
        recvs = [[1, 2], [2, 1]][rank]  # rank 0 gets 1 from 0 and 2 from 1; rank 1 gets 2 from 0, 1 from 1
        y = dist_fn.all_to_all_single(torch.empty(3, 2, device="cuda"), x, recvs, sends)
        y.sum().backward()
        out["a2a"] = plain(y).tolist()
        out["grad"] = plain(x.grad).tolist()
        # host bookkeeping goes over the gloo host group, which refuses device tensors
        flag = torch.ones(1)
        pdist.all_reduce(flag)
        out["host"] = flag.tolist()
        errors = {}
        for name, call in {
            "cpu_on_device_group": lambda: dist.all_reduce(torch.ones(2)),
            "dtype": lambda: dist.all_reduce(to_sim(torch.ones(2, dtype=torch.bfloat16 if rank else torch.float32))),
            "splits": lambda: dist.all_to_all_single(
                torch.empty(3, 2, device="cuda"), to_sim(torch.zeros(3, 2)), [1, 2], [2, 1] if rank else [1, 2]
            ),
            "order": lambda: (
                dist.all_reduce(to_sim(torch.ones(2)))
                if rank
                else dist.all_to_all_single(torch.empty(2, 1, device="cuda"), to_sim(torch.zeros(2, 1)))
            ),
            "device_on_host_group": lambda: dist.all_reduce(to_sim(torch.ones(2)), group=pdist.host_group()),
        }.items():
            try:
                call()
                errors[name] = None
            except SimCollectiveError as e:
                errors[name] = str(e)
        out["errors"] = errors
    return out


def test_collectives_check_like_nccl() -> None:
    r0, r1 = run_ranks(_collectives, 2, backend=SIM_BACKEND)
    assert r0["sum"] == r1["sum"] == [3.0, 3.0, 3.0]
    assert r0["log"] == [("allreduce_", SIM_BACKEND, "float32")]
    # x0 rows (0,1),(2,3),(4,5); x1 rows (10,11),(12,13),(14,15)
    assert r0["a2a"] == [[0.0, 1.0], [10.0, 11.0], [12.0, 13.0]]
    assert r1["a2a"] == [[2.0, 3.0], [4.0, 5.0], [14.0, 15.0]]
    assert r0["grad"] == r1["grad"] == [[1.0, 1.0]] * 3
    assert r0["host"] == [2.0]
    for r in (r0, r1):
        e = r["errors"]
        assert "CPU tensor" in e["cpu_on_device_group"]
        assert "dtypes differ" in e["dtype"]
        assert "expects" in e["splits"] or "do not sum" in e["splits"]
        assert "different collectives" in e["order"]
    assert "a CUDA tensor on a gloo group" in r0["errors"]["device_on_host_group"]
