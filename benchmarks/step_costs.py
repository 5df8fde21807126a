"""Per-step costs of the SMES layer that grow with E or waste a GPU's time, counted on CPU.

    python -m benchmarks.step_costs --out outputs/bench/step_costs.json
    python benchmarks/step_costs.py --root <another checkout> --out before.json   # the same counts of another tree

Counts, not timings (these machines are noisy; the counts are exact and what a GPU pays
for), for E in `--experts` at Census widths (D = 519, experts [128, 64], T = 2, B per
rank `--batch`), under bf16 autocast with fp32 weights (`trainer.precision=bf16`):

- `weight_cast_bytes`: bytes written by dtype casts of tensors shaped like the experts'
  weights (the copy the bf16 kernel reads, and the gradient cast back), in one training
  step (forward + backward), in the first evaluation batch and in each later one;
- `dispatch_bytes_per_step`: pair-row bytes both ranks put on the wire in one training
  step at ep = 2 on 2 gloo ranks (rows out, outputs back, their gradients; the
  dispatcher's `A2AStats.bytes_sent`), and the per-row bytes of the rows sent out;
- `collectives_per_eval_batch`: collectives one rank issues in one evaluation forward
  (`model.eval()`, no grad) at ep = 1 and ep = 2 on 2 gloo ranks, counted by a dispatch
  mode over `c10d` ops.

`--root` imports `model` and `parallel` from another checkout (e.g. the tree before a
change) so that both sides are counted by the same script.

Legend: B instances per rank, D core input width, E experts, H expert width, T tasks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

D, HIDDEN, T = 519, [128, 64], 2


def _import_root(root: str | None) -> None:
    if root:
        sys.path.insert(0, str(Path(root).resolve()))


def _layer(num_experts: int, seed: int = 0) -> Any:
    import torch

    from model.smes import SMESConfig, SMESLayer

    torch.manual_seed(seed)
    return SMESLayer(SMESConfig(num_experts=num_experts, expert_hidden=HIDDEN), in_dim=D, num_tasks=T)


def _cast_counter(shapes: list) -> Any:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Casts(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.bytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default and args[0].shape in shapes and "dtype" in (kwargs or {}):
                self.bytes += out.numel() * out.element_size()
            return out

    return Casts()


def weight_casts(num_experts: int, batch: int) -> dict[str, int]:
    import torch

    layer = _layer(num_experts)
    shapes = [w.shape for w in layer.experts.weights]
    x_BD = torch.randn(batch, D, requires_grad=True)
    out: dict[str, int] = {}
    counter = _cast_counter(shapes)
    with counter:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, aux, _ = layer(x_BD)
        (y.float().square().mean() + sum(aux.values())).backward()
    out["train_step"] = counter.bytes
    layer.eval()
    for key in ("eval_first_batch", "eval_later_batch"):
        counter = _cast_counter(shapes)
        with counter, torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            layer(x_BD)
        out[key] = counter.bytes
    return out


def _collectives_counter() -> Any:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Collectives(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "c10d":
                self.ops.append(func.__name__)
            return func(*args, **(kwargs or {}))

    return Collectives()


def _rank(rank: int, port: int, root: str | None, experts: list[int], batch: int, out_dir: str) -> None:
    _import_root(root)
    import torch
    import torch.distributed as dist

    from parallel.dist import local_rank_env

    os.environ.update(local_rank_env(rank, 2, port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from parallel.expert.dispatcher import a2a_stats, apply_expert_parallel
    from parallel.expert.mesh import build_mesh

    result: dict[str, Any] = {}
    for num_experts in experts:
        row: dict[str, Any] = {}
        for ep in (1, 2):
            mesh = build_mesh(ep)
            holder = torch.nn.Module()
            holder.layer = _layer(num_experts)
            apply_expert_parallel(holder, mesh)
            torch.manual_seed(1 + rank)
            x_BD = torch.randn(batch, D, requires_grad=True)
            if ep == 2:
                stats = a2a_stats(holder)
                for s in stats:
                    s.reset()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    y, aux, _ = holder.layer(x_BD)
                (y.float().square().mean() + sum(aux.values())).backward()
                sent = torch.tensor([float(sum(s.bytes_sent for s in stats)), float(sum(s.rows_sent for s in stats))])
                dist.all_reduce(sent)
                row["dispatch_bytes_per_step"] = int(sent[0])
                row["dispatch_rows_per_step"] = int(sent[1])
            holder.layer.eval()
            counter = _collectives_counter()
            with counter, torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                holder.layer(x_BD)
            row[f"collectives_per_eval_batch_ep{ep}"] = counter.ops
        result[str(num_experts)] = row
    if rank == 0:
        Path(out_dir, "dist.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def distributed(root: str | None, experts: list[int], batch: int) -> dict[str, Any]:
    import torch.multiprocessing as mp

    from parallel.dist import free_port

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(free_port(), root, experts, batch, tmp), nprocs=2, join=True)
        return json.loads(Path(tmp, "dist.json").read_text())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--root", default=None, help="import model/ and parallel/ from this checkout")
    p.add_argument("--experts", default="8,64,256")
    p.add_argument("--batch", type=int, default=4096, help="instances per rank")
    args = p.parse_args(argv)
    _import_root(args.root)
    experts = [int(e) for e in args.experts.split(",")]
    casts = {str(e): weight_casts(e, args.batch) for e in experts}
    dist_rows = distributed(args.root, experts, args.batch)
    rows = []
    for e in experts:
        d = dist_rows[str(e)]
        rows.append(
            {
                "E": e,
                "weight_cast_bytes": casts[str(e)],
                "dispatch_bytes_per_step": d["dispatch_bytes_per_step"],
                "dispatch_rows_per_step": d["dispatch_rows_per_step"],
                "dispatch_bytes_per_row": d["dispatch_bytes_per_step"] / max(1, d["dispatch_rows_per_step"]),
                "collectives_per_eval_batch": {
                    "ep1": d["collectives_per_eval_batch_ep1"],
                    "ep2": d["collectives_per_eval_batch_ep2"],
                },
            }
        )
    result = {
        "config": {"D": D, "hidden": HIDDEN, "tasks": T, "batch_per_rank": args.batch, "precision": "bf16"},
        "root": str(Path(args.root).resolve()) if args.root else str(Path(__file__).resolve().parents[1]),
        "rows": rows,
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(rows, indent=1))
    return result


if __name__ == "__main__":
    main()
