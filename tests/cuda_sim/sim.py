"""A CUDA simulation on the CPU: tensors that report device `cuda`, and a process group
that behaves like NCCL.

No GPU is at hand, yet the framework's point is to run on GPUs, and its CUDA-only
branches hold bugs that a CPU run never takes. Under `simulate_cuda()` the code under
test sees CUDA and runs on the CPU:

- `SimTensor`: a wrapper subclass whose `.device` is `cuda:0` and `is_cuda` is True,
  holding a CPU tensor (`_data`) that every op runs on. To the C++ side (autograd,
  autocast) it is a CPU tensor, so backward works on a CPU-only build; to Python it
  is a CUDA tensor, so the code takes its CUDA branches (`kernel_choice`, the
  collectives' routing, `x.device` passed to factories). Factories asked for device
  `cuda` (`torch.zeros(..., device=x.device)`) and copies to `cuda` make SimTensors.
- Device discipline, as CUDA enforces it: an op that mixes a SimTensor with a CPU
  tensor of one or more dimensions raises `SimDeviceError` (0-dim CPU scalars are
  allowed, as on CUDA); `cpu_tensor.copy_(sim)` is a host read. Inside the autograd
  engine's backward the check is off: the engine creates its zero gradients from the
  forward tensors' C++ options, which are the CPU's here (they would be CUDA's on a
  GPU); they are taken onto the simulated device.
- Host reads: a SimTensor reaches the host only through `model.moe.host`'s door
  (`host_ints`, `host_flag`, `to_host`). Anything else that needs its value on the
  host (`item()`, `int()`, `float()`, `bool()`, `tolist()`, `numpy()`, ops that return
  Python numbers such as `torch.equal`, a copy into a CPU tensor) raises
  `SimHostReadError`. `x.cpu()` / `x.to("cpu")` outside the door return the SimTensor
  itself (the C++ side sees a tensor already on the CPU), so a stray one fails at the
  read that follows it.
- sm100 / sm103: the simulated `torch._grouped_mm` returns NaN as the weight gradient
  of an expert group with no rows, the known bug of those devices
  (pytorch/pytorch#172439), so the workaround is executed and checked.
- The CUDA environment the code queries: `torch.cuda.get_device_capability()` returns
  the simulated capability (default sm90, `simulate_cuda(capability=...)`),
  `torch.cuda.current_device()` 0, `torch.autocast("cuda")` works (bf16 included) and
  `torch.is_autocast_enabled("cuda")` answers True inside it; the casts themselves are
  done by CPU autocast, entered beside it (its op lists are close to CUDA's for the ops
  that matter here: matmuls, linear and batched matmuls run in the autocast dtype).
- Collectives: `SIM_BACKEND` ("simnccl") is a process-group backend whose groups refuse
  CPU tensors (NCCL takes device tensors only) and check, before every collective,
  that every rank of the group calls the same collective with the same dtype and
  sizes, and that uneven all-to-all split sizes agree (what rank i sends to j is what
  j expects from i); a disagreement raises `SimCollectiveError` on every rank instead
  of NCCL's hang or corruption. The data then moves over gloo, on the CPU tensors.
  Gloo groups (the trainer's host group) refuse SimTensors. `collective_log()` records
  the collectives run while it is active.

What it cannot show: CUDA kernels, streams, events and timings, NCCL's own behaviour,
memory, and code that reaches CUDA through C++ alone (DDP's reducer allocates its
buckets from the parameters' C++ options, TorchRec's sharded kernels are FBGEMM's
CUDA ops); see the README.

Legend: P ranks of a group.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from model.moe.host import in_door

SIM_BACKEND = "simnccl"
CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")
aten = torch.ops.aten


class SimDeviceError(RuntimeError):
    """An op mixed a simulated CUDA tensor with a CPU tensor."""


class SimHostReadError(RuntimeError):
    """A simulated CUDA tensor was read on the host outside `model.moe.host`'s door."""


class SimCollectiveError(RuntimeError):
    """A collective that NCCL would refuse, or one on which the ranks disagree."""


class SimTensor(torch.Tensor):
    """A tensor that reports device `cuda:0` and computes on its CPU `_data`."""

    _data: torch.Tensor
    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, data: torch.Tensor, requires_grad: bool = False) -> SimTensor:
        assert not isinstance(data, SimTensor) and data.device.type == "cpu"
        out = torch.Tensor._make_wrapper_subclass(
            cls,
            data.shape,
            strides=data.stride(),
            storage_offset=data.storage_offset(),
            dtype=data.dtype,
            device=CPU,  # what C++ sees: autograd and autocast work on a CPU-only build
            requires_grad=requires_grad,
        )
        out._data = data
        return out

    @property  # type: ignore[override]
    def device(self) -> torch.device:
        return CUDA

    @property  # type: ignore[override]
    def is_cuda(self) -> bool:
        return True

    def data_ptr(self) -> int:
        return self._data.data_ptr()

    def tolist(self) -> Any:
        _check_read("tolist()")
        return self._data.tolist()

    def numpy(self, *args: Any, **kwargs: Any) -> Any:
        _check_read("numpy()")
        return self._data.numpy(*args, **kwargs)

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        _check_read("__array__")
        return self._data.__array__(*args, **kwargs)

    def __repr__(self) -> str:  # type: ignore[override]
        return f"SimTensor(cuda:0, {self._data!r})"

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return _handle(func, args, kwargs or {})


def _check_read(what: str) -> None:
    if not in_door():
        raise SimHostReadError(
            f"{what} reads a CUDA tensor on the host outside model.moe.host (host_ints / host_flag / to_host): "
            "on a GPU this is an unplanned device-to-host sync"
        )


def to_sim(t: torch.Tensor, *, requires_grad: bool | None = None) -> SimTensor:
    """A SimTensor holding `t` (a host-to-device copy keeps the data; no copy here)."""
    if isinstance(t, SimTensor):
        return t
    rg = t.requires_grad if requires_grad is None else requires_grad
    return SimTensor(t.detach(), requires_grad=rg)


def sim_module(module: torch.nn.Module) -> torch.nn.Module:
    """Move `module`'s parameters and buffers onto the simulated device, in place."""
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and not isinstance(p, SimTensor):
                mod._parameters[name] = torch.nn.Parameter(to_sim(p.data), requires_grad=p.requires_grad)
        for name, b in list(mod._buffers.items()):
            if b is not None and not isinstance(b, SimTensor):
                mod._buffers[name] = to_sim(b)
    return module


def plain(t: Any) -> Any:
    """The CPU data of a SimTensor (for test assertions; not a host read of the code under test)."""
    return t._data if isinstance(t, SimTensor) else t


# -- the dispatch handler ----------------------------------------------------------


def _unwrap(x: Any) -> Any:
    return x._data if isinstance(x, SimTensor) else x


def _is_cpu_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and not isinstance(x, SimTensor)


_COPY_OPS = (aten.copy_.default, aten._to_copy.default)


def _handle(func: Any, args: Any, kwargs: dict) -> Any:
    if func.namespace == "c10d":
        return _collective(func, args, kwargs)
    leaves = tree_leaves((args, kwargs))
    sims = [x for x in leaves if isinstance(x, SimTensor)]
    on_sim = bool(sims)
    device = kwargs.get("device")
    if device is not None:
        target = torch.device(device)
        if target.type == "cuda":
            kwargs, on_sim = {**kwargs, "device": CPU}, True
        elif sims and func is aten._to_copy.default and in_door():
            return func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))  # the intended copy to the host
    if func is aten.copy_.default and _is_cpu_tensor(args[0]) and isinstance(args[1], SimTensor):
        _check_read("a copy into a CPU tensor")
        return func(args[0], args[1]._data, **kwargs)
    if on_sim and func not in _COPY_OPS and torch._C._current_autograd_node() is None:
        for x in leaves:
            if _is_cpu_tensor(x) and x.dim() > 0:
                raise SimDeviceError(
                    f"{func}: expected all tensors on the same device, found cuda:0 and a cpu tensor "
                    f"of shape {tuple(x.shape)}"
                )
    if func is aten._local_scalar_dense.default and sims:
        _check_read(f"{func} (item(), int(), float(), bool())")
    out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
    if func is aten._grouped_mm.default and _STATE["blackwell_grouped_mm"]:
        out = _blackwell_weight_grad(args, kwargs, out)
    if not on_sim:
        return out
    if (
        any(isinstance(x, bool | int | float) for x in tree_leaves(out))
        and func is not aten._local_scalar_dense.default
    ):
        _check_read(f"{func} (returns a Python number)")
    by_inner = {id(s._data): s for s in sims}  # in-place ops hand back their input

    def wrap(x: Any) -> Any:
        if not _is_cpu_tensor(x):
            return x
        return by_inner[id(x)] if id(x) in by_inner else SimTensor(x)

    return tree_map(wrap, out)


_STATE = {"blackwell_grouped_mm": False}


def _blackwell_weight_grad(args: Any, kwargs: dict, out: torch.Tensor) -> torch.Tensor:
    """What sm100 / sm103 return for the weight-gradient form of `torch._grouped_mm`
    (2-D x 2-D, one `[D, H]` block per group): garbage, here NaN, in the blocks of groups
    with no rows (pytorch/pytorch#172439)."""
    a, b = args[0], args[1]
    offs = kwargs.get("offs", args[2] if len(args) > 2 else None)
    if a.dim() != 2 or b.dim() != 2 or offs is None:
        return out
    offs = _unwrap(offs).long()
    empty_E = torch.diff(offs, prepend=offs.new_zeros(1)) == 0
    return out.masked_fill(empty_E.view(-1, 1, 1), float("nan"))


class _SimMode(TorchDispatchMode):
    """Sees every op, so that factories asked for `cuda` and collectives over CPU tensors
    are handled too (neither has a SimTensor argument)."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return _handle(func, args, kwargs or {})


# -- the CUDA environment ----------------------------------------------------------


class _Patches:
    def __init__(self) -> None:
        self.saved: list[tuple[Any, str, Any]] = []

    def set(self, owner: Any, name: str, value: Any) -> None:
        self.saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def set_item(self, owner: dict, key: str, value: Any) -> None:
        self.saved.append((owner, key, owner[key]))
        owner[key] = value

    def restore(self) -> None:
        for owner, name, value in reversed(self.saved):
            if isinstance(owner, dict):
                owner[name] = value
            else:
                setattr(owner, name, value)


def _mirrored_autocast(patches: _Patches) -> None:
    """`torch.autocast("cuda")` also enters CPU autocast with the same settings (SimTensors
    are CPU tensors to the autocast dispatch keys)."""
    cls = torch.amp.autocast_mode.autocast
    enter, exit_ = cls.__enter__, cls.__exit__

    def __enter__(self: Any) -> Any:  # noqa: N807
        out = enter(self)
        if self.device == "cuda":
            self._sim_cpu = torch.autocast("cpu", dtype=self.fast_dtype, enabled=self._enabled)
            self._sim_cpu.__enter__()
        return out

    def __exit__(self: Any, *exc: Any) -> Any:  # noqa: N807
        inner = getattr(self, "_sim_cpu", None)
        if inner is not None:
            inner.__exit__(*exc)
            self._sim_cpu = None
        return exit_(self, *exc)

    patches.set(cls, "__enter__", __enter__)
    patches.set(cls, "__exit__", __exit__)


def _tensor_factory(original: Any) -> Any:
    def factory(data: Any, *args: Any, device: Any = None, **kwargs: Any) -> Any:
        if device is not None and torch.device(device).type == "cuda":
            return original(data, *args, **kwargs).to(CUDA)
        return original(data, *args, device=device, **kwargs)

    return factory


@contextmanager
def simulate_cuda(capability: tuple[int, int] = (9, 0)) -> Iterator[None]:
    """Run the block with the simulated CUDA device of compute `capability` (module doc).

    On sm10x the simulated `torch._grouped_mm` has that device's known bug: the weight
    gradient of a group with no rows is garbage (NaN here), pytorch/pytorch#172439.
    """
    patches = _Patches()
    patches.set_item(_STATE, "blackwell_grouped_mm", capability[0] == 10)
    patches.set(torch.cuda, "_lazy_init", lambda: None)
    patches.set(torch.cuda, "get_device_capability", lambda device=None: capability)
    patches.set(torch.cuda, "current_device", lambda: 0)
    patches.set(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    patches.set(torch.cuda.amp.common, "amp_definitely_not_available", lambda: False)
    patches.set(torch, "tensor", _tensor_factory(torch.tensor))
    patches.set(torch, "as_tensor", _tensor_factory(torch.as_tensor))
    _mirrored_autocast(patches)
    try:
        with _SimMode():
            yield
    finally:
        patches.restore()


# -- collectives -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CollectiveRecord:
    """One collective run under `collective_log()`: op name, backend of its group,
    dtype, bytes of this rank's input, group size."""

    op: str
    backend: str
    dtype: str
    bytes: int
    group_size: int


_LOG: list[list[CollectiveRecord]] = []


@contextmanager
def collective_log() -> Iterator[list[CollectiveRecord]]:
    """Record the collectives run inside the block (this rank's)."""
    records: list[CollectiveRecord] = []
    _LOG.append(records)
    try:
        yield records
    finally:
        _LOG.remove(records)


def _create_backend(store: Any, rank: int, size: int, timeout: timedelta) -> Any:
    return dist.ProcessGroupGloo(store, rank, size, timeout)


def register_backend() -> None:
    """Make `SIM_BACKEND` known to `torch.distributed` (idempotent)."""
    if SIM_BACKEND not in dist.Backend.backend_list:
        dist.Backend.register_backend(SIM_BACKEND, _create_backend, devices=["cpu", "cuda"])


def _group_of(args: Any) -> dist.ProcessGroup:
    for x in tree_leaves(args):
        if isinstance(x, torch.ScriptObject):
            try:
                return dist.ProcessGroup.unbox(x)
            except RuntimeError:  # a ReduceOp
                continue
    raise SimCollectiveError("a c10d op without a process group")


_DTYPES = [
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool,
]  # fmt: skip


def _dtype_code(t: torch.Tensor) -> int:
    return _DTYPES.index(t.dtype) if t.dtype in _DTYPES else len(_DTYPES)


def _op_code(name: str) -> int:
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def _rows(t: torch.Tensor) -> tuple[int, int]:
    """(rows along dim 0, elements per row)."""
    if t.dim() == 0:
        return 1, 1
    per_row = 1
    for n in t.shape[1:]:
        per_row *= n
    return t.shape[0], per_row


def _metadata(name: str, args: Any, size: int) -> list[int]:
    """Fixed-length description of this rank's call: op, dtypes, sizes, split sizes."""
    tensors = [x for x in tree_leaves(args) if isinstance(x, torch.Tensor)]
    head = [_op_code(name), len(tensors)]
    dtypes = sorted({_dtype_code(t) for t in tensors})
    head += [dtypes[0] if dtypes else -1, dtypes[-1] if dtypes else -1]
    splits = [-1] * (2 * size)
    if name == "alltoall_base_":
        out, inp, _, out_splits, in_splits = args[:5]
        (rows_out, per_out), (rows_in, per_in) = _rows(out), _rows(inp)
        ins = list(in_splits) or [rows_in // size] * size
        outs = list(out_splits) or [rows_out // size] * size
        splits = [*ins, *outs]
        head += [per_in, per_out, rows_in, rows_out]
    else:
        head += [sum(t.numel() for t in tensors), 0, 0, 0]
    return head + splits


def _check_agreement(name: str, args: Any, group: dist.ProcessGroup) -> None:
    size, me = dist.get_world_size(group), dist.get_rank(group)
    mine = torch.tensor(_metadata(name, args, size), dtype=torch.int64)
    table = torch.empty(size * mine.numel(), dtype=torch.int64)
    dist.all_gather_into_tensor(table, mine, group=group)  # over gloo, beneath the simulation
    rows = table.view(size, -1).tolist()
    ops = {r[0] for r in rows}
    if len(ops) > 1:
        raise SimCollectiveError(f"{name}: the ranks of the group call different collectives (order differs)")
    if len({(r[2], r[3]) for r in rows}) > 1 or rows[me][2] != rows[me][3]:
        dtypes = [(_DTYPES + ["other"])[r[2]] for r in rows]
        raise SimCollectiveError(f"{name}: dtypes differ across ranks or tensors: {dtypes} (NCCL needs one dtype)")
    if name == "alltoall_base_":
        if len({r[4] for r in rows} | {r[5] for r in rows}) > 1:
            raise SimCollectiveError(f"{name}: row widths differ across ranks: {[(r[4], r[5]) for r in rows]}")
        for i, ri in enumerate(rows):
            ins, outs = ri[8 : 8 + size], ri[8 + size : 8 + 2 * size]
            if sum(ins) != ri[6] or sum(outs) != ri[7]:
                raise SimCollectiveError(f"{name}: rank {i}'s split sizes {ins} / {outs} do not sum to its rows")
            for j, rj in enumerate(rows):
                expects = rj[8 + size + i]
                if ins[j] != expects:
                    raise SimCollectiveError(
                        f"{name}: rank {i} sends {ins[j]} rows to rank {j}, which expects {expects} from it"
                    )
    elif len({r[4] for r in rows}) > 1 and name in ("allreduce_", "broadcast_", "reduce_", "_allgather_base_"):
        raise SimCollectiveError(f"{name}: sizes differ across ranks: {[r[4] for r in rows]}")


_DEVICE_GROUP_OPS = {"allreduce_", "alltoall_base_", "broadcast_", "_allgather_base_", "reduce_", "barrier"}


def _collective(func: Any, args: Any, kwargs: dict) -> Any:
    name = func._schema.name.split("::")[-1]
    group = _group_of(args)
    backend = str(dist.get_backend(group))
    tensors = [x for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
    sims = [t for t in tensors if isinstance(t, SimTensor)]
    if backend == SIM_BACKEND:
        if name not in _DEVICE_GROUP_OPS:
            raise SimCollectiveError(f"{name}: not simulated on the device group")
        cpu = [t for t in tensors if not isinstance(t, SimTensor)]
        if cpu and name != "barrier":
            raise SimCollectiveError(
                f"{name}: a CPU tensor of shape {tuple(cpu[0].shape)} on the device (NCCL) group; NCCL takes CUDA "
                "tensors only (host bookkeeping goes over parallel.dist.host_group())"
            )
        _check_agreement(name, args, group)
    elif sims:
        raise SimCollectiveError(f"{name}: a CUDA tensor on a {backend} group")
    if _LOG and tensors:
        record = CollectiveRecord(
            name, backend, str(tensors[0].dtype).replace("torch.", ""),
            sum(t.numel() * t.element_size() for t in tensors[-1:]), dist.get_world_size(group),
        )  # fmt: skip
        for records in _LOG:
            records.append(record)
    out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
    by_inner = {id(s._data): s for s in sims}
    return tree_map(lambda x: by_inner.get(id(x), x) if isinstance(x, torch.Tensor) else x, out)
