"""Inference artifact of a trained run: `python -m trainer.export RUN_DIR --out DIR`.

Writes what `trainer.serving.scorer.InferenceModel.load(DIR)` scores with on one process,
without the training stack (no torchrec, hydra or process group):

- `tables.safetensors`: every embedding table as a plain `[V, De]` tensor;
- `dense.pt2`: the network (the core and the task towers) in evaluation mode as one
  `torch.export` program, `x_BD -> logits_BT` (x = pooled embeddings in feature order,
  then the dense columns), with a dynamic batch dimension (the file keeps the name it
  had before issue 22, so that scorers of older artifacts find it);
- `model.json`: tasks, features, embedding width, dense columns with their train mean /
  std and transforms, the run, checkpoint and step, and the self-check below;
  `vocab.json`: feature -> train values of ids 1, 2, ... (file sources).

The weights come from the run's checkpoint (`--checkpoint best|last|DIR`, as in
`trainer.predict`), loaded into the plain single-process model: DCP reads the global
tensors whatever the world size, embedding sharding or `ep` they were written with.
The data are rebuilt from the run's config (vocabularies and sizes), so run from the
directory training ran in (relative data paths) or override `--data key=value`.
Evaluation semantics: dropless routing (no capacity limit), batch norm with its running
statistics, no dropout, fp32 (a bf16 run's evaluation autocast is not part of the
program).

Why `torch.export` and what it exports. MMoE, PLE, SharedBottom and HoME export as
they are (their forwards have static shapes; HoME's batch norm traces in eval mode).
The SMES layer's forward as a whole does not trace (tried, torch 2.13, `strict=False`,
dynamic batch): its one host read of N (`host_ints`, `.tolist()`) traces as an
unbacked SymInt, but the grouped experts then branch on it (`if x_ND.shape[0] == 0`:
a guard on a data-dependent value), the plan of `all` routing specialises the batch size
(`torch.full((E,), B)`), and the grouped kernel's tracing rule accepts bf16 only,
although the CPU kernel runs fp32. (The layer before the one-sync rework failed
earlier, on data-dependent output sizes and `if N == 0`.) Also tried: a grouped-kernel
call on fp32 rows inside a traced function (rejected by its fake kernel), hence the
custom op. Not tried: TorchScript (deprecated in favour of `torch.export`; the layer's
frozen-dataclass plan and keyword-only helpers would need rewriting for it anyway),
and routing and experts as two programs (the data-dependent N would still sit between
them, now in the serving code). Chosen: the program holds `SMESInference` below, which
runs the layer's own code from `model/` with the same parameters and swaps only what
does not trace: the routing plan is `Router.forward` (selection, mixing weights, the
expert-contiguous pairs of `model.moe.router.sparse_plan`) with a size reader that
bounds the traced N by `torch._check`, so expert compute scales with |U| per instance
as in training; the experts are the opaque custom op `smes_serving::grouped_mlp`
(`trainer/serving/scorer.py`), which runs `model.moe.grouped.expert_mlp`; the tasks are mixed
by `model.smes.mix_tasks`. `all` routing runs every expert as one batched matmul
(`model.moe.grouped.all_experts_mlp`) without a plan. The tests check every task's logits
against the training model's on real evaluation batches: SMES progressive,
independent, all and with a selection bias, MMoE, HoME, PLE and SharedBottom all
export and agree to 1e-5.

Legend: B instances, D core input width, E experts, H width, K experts per task,
N (instance, expert) pairs, T tasks.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch import nn

from data.build import build_dataset
from data.columns import Dataset, Split
from data.ids import run_vocabularies
from data.loaders.in_memory import eval_batches
from model.build import MultiTaskModel, table_name
from model.core import CoreOutput
from model.moe.grouped import all_experts_mlp
from model.moe.router import PlanSizes, read_local_sizes
from model.smes import SMES, mix_all, mix_tasks
from trainer.checkpoint import MARKER, checkpoint_step, resolve_checkpoint
from trainer.config import RunConfig
from trainer.serving import scorer
from trainer.serving.restore import check_shapes, run_config, run_node

log = logging.getLogger("trainer.export")
CHECK_ROWS = 2048


class SMESInference(nn.Module):
    """Evaluation-mode forward of a trained `SMES` core that `torch.export` traces
    (module doc). Shares the core's parameters and buffers (no copies); the math is the
    layer's own: `Router.forward` (selection, pairs, slots, mixing weights), the grouped
    expert MLP of `model.moe.grouped` (behind the serving op) and `model.smes`'s mixing."""

    def __init__(self, core: SMES) -> None:
        super().__init__()
        layer = core.layer
        self.tasks = core.tasks
        self.router = layer.router
        self.routing = layer.router.routing
        self.num_experts, self.num_tasks = layer.num_experts, layer.num_tasks
        self.bias_E: torch.Tensor | None
        self.register_buffer("bias_E", layer.expert_bias_E.detach().clone() if layer.bias_balance else None)
        experts = layer.experts
        self.weights, self.biases = experts.weights, experts.biases
        self.out_dim = layer.out_dim

    def forward(self, x_BD: torch.Tensor) -> CoreOutput:
        weights, biases = list(self.weights), list(self.biases)
        if self.routing == "all":  # every expert on every instance, no plan (its B would be specialised)
            probs_BTE = torch.softmax(self.router.gating(x_BD), dim=-1)
            out_BTH = mix_all(probs_BTE, all_experts_mlp(x_BD, weights, biases))
        else:
            max_pairs = x_BD.shape[0] * self.num_tasks * (self.router.shared_top_k + self.router.adaptive_top_k)
            plan = self.router(x_BD, self.bias_E, read_sizes=partial(traced_sizes, max_pairs=max_pairs))
            x_ND = x_BD.index_select(0, plan.pair_instance_N)
            y_NH = torch.ops.smes_serving.grouped_mlp(x_ND, plan.counts_E, weights, biases)
            out_BTH = mix_tasks(y_NH, plan)
        return CoreOutput(task_reprs={t: out_BTH[:, i] for i, t in enumerate(self.tasks)})


def traced_sizes(counts_E: torch.Tensor, *, max_pairs: int) -> PlanSizes:
    """The router's size reader in the exported program: N, the one data-dependent size,
    read as in training (`read_local_sizes`) and traced as an unbacked SymInt, bounded
    by `0 <= N <= max_pairs` (B*T*K) for the tracer."""
    sizes = read_local_sizes(counts_E)
    torch._check(sizes.num_pairs >= 0)
    torch._check(sizes.num_pairs <= max_pairs)
    return sizes


class NetworkProgram(nn.Module):
    """Core + towers: `x_BD -> logits_BT` (task order), what `dense.pt2` holds."""

    def __init__(self, model: MultiTaskModel) -> None:
        super().__init__()
        self.tasks = model.tasks
        self.core = SMESInference(model.core) if isinstance(model.core, SMES) else model.core
        self.towers = model.towers

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        out: CoreOutput = self.core(x_BD)
        return torch.stack([self.towers[t](out.task_reprs[t]) for t in self.tasks], dim=1)


def load_plain_model(run: RunConfig, dataset: Dataset, path: Path) -> MultiTaskModel:
    """The run's model on one CPU process with the checkpoint's weights (evaluation mode)."""
    model = MultiTaskModel(
        dataset.spec, core_cfg=run.model.core, embedding_dim=run.model.embedding_dim, tower=run.model.tower
    )
    state = {"model": model.state_dict()}
    check_shapes(state["model"], path)
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    model.load_state_dict(state["model"])
    return model.eval()


def example_batches(split: Split, dataset: Dataset, *, rows: int, batch_size: int = 256) -> list[Any]:
    """Up to `rows` rows of `split` as evaluation batches (padding rows dropped)."""
    part = split.take(np.arange(min(rows, len(split))))
    out = []
    for batch in eval_batches(part, spec=dataset.spec, batch_size=batch_size):
        valid = int((batch.weights > 0).sum())
        if valid:
            out.append((batch, valid))
    return out


def export_program(model: MultiTaskModel, x_BD: torch.Tensor) -> torch.export.ExportedProgram:
    """`torch.export` of `NetworkProgram(model)` with a dynamic batch size."""
    program = NetworkProgram(model).eval()
    batch = torch.export.Dim("batch", min=1, max=1 << 24)
    with torch.no_grad():
        return torch.export.export(program, (x_BD,), dynamic_shapes=({0: batch},), strict=False)


def metadata(run: RunConfig, dataset: Dataset, *, run_dir: Path, ckpt: Path) -> dict[str, Any]:
    spec, info = dataset.spec, dataset.info
    stats: dict = info.get("dense_stats") or {}  # type: ignore[assignment]
    transforms = info.get("dense_transforms") or [None] * spec.num_dense
    return {
        "format": scorer.FORMAT,
        "dataset": spec.name,
        "model": run.model.name,
        "tasks": list(spec.tasks),
        "embedding_dim": run.model.embedding_dim,
        "features": [
            {"name": f.name, "table": table_name(f.name), "num_embeddings": f.num_embeddings, "multi_hot": f.multi_hot}
            for f in spec.sparse
        ],
        "dense": {
            "names": list(spec.dense_names),
            "mean": np.asarray(stats.get("mean", np.zeros(spec.num_dense))).tolist(),
            "std": np.asarray(stats.get("std", np.ones(spec.num_dense))).tolist(),
            "transforms": list(transforms),  # type: ignore[call-overload]
        },
        "input": "x_BD = [pooled embeddings of `features` in order (sum pooling), dense columns]",
        "run_dir": str(run_dir),
        "checkpoint": str(ckpt),
        "step": checkpoint_step(ckpt),
    }


def write_artifact(model: MultiTaskModel, dataset: Dataset, meta: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    batches = example_batches(dataset.test if len(dataset.test) else dataset.val, dataset, rows=64)
    if not batches:
        raise ValueError("the run's val and test splits are empty: no example batch to trace the program with")
    batch, valid = batches[0]
    with torch.no_grad():
        x_BD = model.embed(batch.dense, batch.sparse)[:valid]
    torch.export.save(export_program(model, x_BD), str(out / scorer.PROGRAM))
    tables = {
        table_name(f.name): model.ebc.embedding_bags[table_name(f.name)].weight.detach().contiguous()
        for f in dataset.spec.sparse
    }
    save_file(tables, str(out / scorer.TABLES))
    vocab = dataset.info.get("vocab")
    if vocab:
        (out / scorer.VOCAB_JSON).write_text(json.dumps({k: v.to_pylist() for k, v in vocab.items()}))  # type: ignore[attr-defined]
    (out / scorer.MODEL_JSON).write_text(json.dumps(meta, indent=2) + "\n")


@torch.no_grad()
def check_artifact(model: MultiTaskModel, dataset: Dataset, out: Path, *, rows: int) -> dict[str, Any]:
    """Max |logit difference| of the loaded artifact vs the model on `rows` test rows."""
    loaded = scorer.InferenceModel.load(out)
    worst, n = 0.0, 0
    for batch, valid in example_batches(dataset.test, dataset, rows=rows):
        want = model(batch).logits
        got = loaded(batch)
        for t in dataset.spec.tasks:
            worst = max(worst, float((want[t][:valid] - got[t][:valid]).abs().max()))
        n += valid
    return {"rows": n, "max_abs_logit_diff": worst}


def export(run_dir: Path, out: Path, *, checkpoint: str = "best", data: dict[str, Any] | None = None,
           check_rows: int = CHECK_ROWS) -> dict[str, Any]:  # fmt: skip
    """Write the artifact of `run_dir` to `out`; returns its `model.json`."""
    run = run_config(run_node(run_dir), world_size=1, data=data, device="cpu", ep=1)
    ckpt = resolve_checkpoint(checkpoint, run_dir)
    if not (ckpt / MARKER).exists():
        raise ValueError(f"{ckpt} is not a complete checkpoint")
    dataset = build_dataset(run.data, base_vocab=run_vocabularies(run_dir))  # the ids the run trained with
    model = load_plain_model(run, dataset, ckpt)
    meta = metadata(run, dataset, run_dir=run_dir, ckpt=ckpt)
    write_artifact(model, dataset, meta, out)
    meta["check"] = check_artifact(model, dataset, out, rows=check_rows)
    (out / scorer.MODEL_JSON).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _parse_overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--data {item!r}: expected key=value (a key of the run's data config)")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="the training run's directory")
    parser.add_argument("--out", type=Path, required=True, help="artifact folder to write")
    parser.add_argument("--checkpoint", default="best", help="best | last | a checkpoint folder (default best)")
    parser.add_argument("--data", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the run's data config (repeatable)")  # fmt: skip
    parser.add_argument("--check-rows", type=int, default=CHECK_ROWS, help="test rows the self-check scores")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        meta = export(args.run_dir, args.out, checkpoint=args.checkpoint, data=_parse_overrides(args.data),
                      check_rows=args.check_rows)  # fmt: skip
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    check = meta["check"]
    print(f"exported {meta['model']} (step {meta['step']}) to {args.out}; self-check on {check['rows']} test rows: "
          f"max |logit diff| {check['max_abs_logit_diff']:.3g}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
