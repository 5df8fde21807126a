"""The collective rule (DESIGN section 5): every collective goes through `parallel/dist.py`.

1. A source walk lists any direct `torch.distributed` collective call in the packages
   outside `parallel/dist.py`, so a new call site cannot slip in.
2. A 2-rank gloo run exercises every helper and checks its result.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from parallel import dist as pdist
from tests._dist import run_ranks

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("trainer", "parallel", "data", "model")
COLLECTIVES = {
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "broadcast",
    "broadcast_object_list",
    "gather",
    "gather_object",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "scatter",
    "scatter_object_list",
    "send",
    "recv",
    "isend",
    "irecv",
    "monitored_barrier",
}


def _dist_aliases(tree: ast.AST) -> set[str]:
    """Names bound to torch.distributed (or its nn.functional / _functional_collectives)."""
    names = set()
    modules = ("torch.distributed", "torch.distributed.nn.functional", "torch.distributed._functional_collectives")
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in modules and a.asname:
                    names.add(a.asname)
        elif isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.distributed", "torch.distributed.nn"):
            for a in node.names:
                if f"{node.module}.{a.name}" in modules:
                    names.add(a.asname or a.name)
    return names


def _direct_calls(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    aliases = _dist_aliases(tree)
    hits = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        fn = node.func
        if isinstance(fn, ast.Attribute) and fn.attr in COLLECTIVES:
            base = ast.unparse(fn.value)
            if base in aliases or base.startswith("torch.distributed"):
                hits.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(fn)}")
        elif isinstance(node.func, ast.Name) and node.func.id in COLLECTIVES:
            # `from torch.distributed import all_reduce`
            for imp in ast.walk(tree):
                if (
                    isinstance(imp, ast.ImportFrom)
                    and imp.module
                    and imp.module.startswith("torch.distributed")
                    and any((a.asname or a.name) == node.func.id for a in imp.names)
                ):
                    hits.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.func.id}")
    return hits


def test_no_direct_collectives_outside_parallel_dist() -> None:
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    assert len(files) > 20
    hits = [h for p in files if p != ROOT / "parallel" / "dist.py" for h in _direct_calls(p)]
    assert not hits, "direct torch.distributed collectives (use the parallel/dist.py helpers):\n" + "\n".join(hits)


def test_the_walk_finds_a_direct_call(tmp_path: Path) -> None:
    """The walk itself must catch each spelling (else the rule test passes vacuously)."""
    global ROOT
    samples = {
        "a.py": "import torch.distributed as dist\ndist.all_reduce(x)\n",
        "b.py": "import torch\ntorch.distributed.barrier()\n",
        "c.py": "from torch.distributed import all_gather_object\nall_gather_object(o, x)\n",
        "d.py": "import torch.distributed.nn.functional as F\nF.all_to_all_single(o, x)\n",
        "e.py": "import torch.distributed as dist\nn = dist.get_world_size()\n",
    }
    old, ROOT = ROOT, tmp_path
    try:
        for name, text in samples.items():
            (tmp_path / name).write_text(text)
        found = {name: bool(_direct_calls(tmp_path / name)) for name in samples}
    finally:
        ROOT = old
    assert found == {"a.py": True, "b.py": True, "c.py": True, "d.py": True, "e.py": False}


def _every_helper(rank: int, world: int) -> dict[str, object]:
    out: dict[str, object] = {}
    out["world"] = pdist.world_size()
    out["host_is_world"] = pdist.host_group() is torch.distributed.GroupMember.WORLD  # gloo main group
    out["sum"] = pdist.all_reduce(torch.tensor([rank + 1.0, 2.0])).tolist()
    out["max"] = pdist.all_reduce(torch.tensor([float(rank)]), "max").tolist()
    out["min"] = pdist.all_reduce(torch.tensor([float(rank)]), "min").tolist()
    out["mean"] = pdist.all_reduce_mean(torch.tensor([float(rank)], dtype=torch.float64)).tolist()
    out["gather"] = pdist.all_gather_cat(torch.full((2, 1), float(rank))).flatten().tolist()
    out["objects"] = pdist.all_gather_object({"rank": rank})
    out["bcast_obj"] = pdist.broadcast_object(f"from {rank}", src=1)
    out["bcast"] = pdist.broadcast(torch.tensor([float(rank)]), src=1).tolist()
    pdist.barrier()
    # uneven all-to-all: rank r sends r+1 rows to each peer; with autograd, the
    # gradient of the received rows flows back to the sender
    x = torch.arange(2 * (rank + 1), dtype=torch.float32).view(-1, 1) + 10 * rank
    x.requires_grad_(True)
    in_splits = [rank + 1] * world
    out_splits = [r + 1 for r in range(world)]
    recv = pdist.all_to_all_single(x.new_empty(sum(out_splits), 1), x, out_splits, in_splits, autograd=True)
    (recv * (rank + 1)).sum().backward()
    out["a2a"] = recv.detach().flatten().tolist()
    assert x.grad is not None
    out["a2a_grad"] = x.grad.flatten().tolist()
    pending = torch.tensor([float(rank + 1)])
    work = pdist.all_reduce_async(pending)
    work.wait()
    out["ar_async"] = pending.item()
    plain = pdist.all_to_all_single(torch.empty(world, dtype=torch.int64), torch.full((world,), rank))
    out["a2a_plain"] = plain.tolist()
    sub = pdist.new_group([0, 1])
    out["sub_sum"] = pdist.all_reduce(torch.tensor([1.0]), group=sub).tolist()
    return out


@pytest.mark.slow
def test_every_helper_on_two_gloo_ranks() -> None:
    r0, r1 = run_ranks(_every_helper, 2)
    for res in (r0, r1):
        assert res["world"] == 2 and res["host_is_world"]
        assert res["sum"] == [3.0, 4.0] and res["max"] == [1.0] and res["min"] == [0.0]
        assert res["mean"] == [0.5]
        assert res["gather"] == [0.0, 0.0, 1.0, 1.0]
        assert res["objects"] == [{"rank": 0}, {"rank": 1}]
        assert res["bcast_obj"] == "from 1" and res["bcast"] == [1.0]
        assert res["a2a_plain"] == [0, 1]
        assert res["sub_sum"] == [2.0]
        assert res["ar_async"] == 3.0
    # rank 0 sent rows [0] / [1] (one each), rank 1 rows [10, 11] / [12, 13]
    assert r0["a2a"] == [0.0, 10.0, 11.0] and r1["a2a"] == [1.0, 12.0, 13.0]
    # d(sum of recv * (receiver + 1)) / d x: rows sent to rank 0 get 1, to rank 1 get 2
    assert r0["a2a_grad"] == [1.0, 2.0] and r1["a2a_grad"] == [1.0, 1.0, 2.0, 2.0]


def test_cpu_tensor_on_a_non_gloo_subgroup_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """On NCCL runs a CPU tensor over an expert subgroup would fail inside NCCL: refused here."""
    monkeypatch.setattr(pdist, "_uses_gloo", lambda group: False)
    with pytest.raises(ValueError, match="non-gloo subgroup"):
        pdist._route(torch.zeros(1), object())  # type: ignore[arg-type]
    monkeypatch.setattr(pdist, "host_group", lambda: "HOST")
    assert pdist._route(torch.zeros(1), None) == "HOST"
