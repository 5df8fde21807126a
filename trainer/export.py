"""Inference artifact of a trained run: `python -m trainer.export RUN_DIR --out DIR`.

Writes what `trainer.serving.InferenceModel.load(DIR)` scores with on one process,
without the training stack (no torchrec, hydra or process group):

- `tables.safetensors`: every embedding table as a plain `[V, De]` tensor;
- `dense.pt2`: the core and the task towers in evaluation mode as one `torch.export`
  program, `x_BD -> logits_BT` (x = pooled embeddings in feature order, then the
  dense columns), with a dynamic batch dimension;
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
The SMES layer's training forward does not trace (tried, torch 2.13, `strict=False`,
dynamic batch): its one host read of N (`host_ints`, `.tolist()`) traces as an
unbacked SymInt, but the grouped experts then branch on it (`if x_ND.shape[0] == 0`:
a guard on a data-dependent value), the dense plan specialises the batch size
(`torch.full((E,), B)`), and `torch._grouped_mm`'s tracing rule accepts bf16 only,
although the CPU kernel runs fp32. (The layer before the one-sync rework failed
earlier, on `torch.unique` / `bincount` sizes and `if N == 0`.) Also tried: a
`torch._grouped_mm` call on fp32 rows inside a traced function (rejected by its fake
kernel), hence the custom op below. Not tried: TorchScript (deprecated in favour of
`torch.export`; the layer's frozen-dataclass plan and keyword-only helpers would need
rewriting for it anyway), and routing and experts as two programs (the data-dependent
N would still sit between them, now in the serving code). Chosen: the program
holds `SMESInference` below, the evaluation-mode formulation of the same layer with the
same parameters: routers, Stage I / II selection by the trained `Router.select`,
mixing weights as the softmax of the selected logits (= the probabilities renormalised
over each task's set), deduplication by a sort with static shapes, and one
data-dependent size, N (pairs to run), read once with `.item()` and traced as an
unbacked SymInt (bounded by `torch._check`), so expert compute scales with |U| per
instance as in training. The experts are the opaque custom op
`smes_serving::grouped_mlp` (`trainer/serving.py`); dense routing runs every expert
as one batched matmul. The tests check every task's logits against the training
model's on real evaluation batches: SMES progressive, independent, dense and with a
selection bias, MMoE, HoME, PLE and SharedBottom all export and agree to 1e-5.

Legend: B instances, D core input width, E experts, H width, K experts per task,
M = B*T*K selections, N deduplicated pairs, T tasks, U max experts per instance.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch import nn

from data.build import build_dataset
from data.columns import Dataset, Split
from data.loaders.in_memory import eval_batches
from model.build import MultiTaskModel, table_name
from model.core import CoreOutput
from model.smes import SMES
from trainer import serving
from trainer.checkpoint import MARKER
from trainer.config import RunConfig
from trainer.restore import check_shapes, checkpoint_step, resolve_checkpoint, run_config, run_node

log = logging.getLogger("trainer.export")
CHECK_ROWS = 2048


class SMESInference(nn.Module):
    """Evaluation-mode forward of a trained `SMES` core that `torch.export` traces
    (module doc). Shares the core's parameters and buffers (no copies)."""

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
        logits_BTE = self.router.gating(x_BD)
        if self.routing == "dense":
            out_BTH = self._dense(x_BD, torch.softmax(logits_BTE, dim=-1))
        else:
            out_BTH = self._sparse(x_BD, logits_BTE)
        return CoreOutput(task_reprs={t: out_BTH[:, i] for i, t in enumerate(self.tasks)})

    def _dense(self, x_BD: torch.Tensor, probs_BTE: torch.Tensor) -> torch.Tensor:
        """Every expert on every instance (`GroupedExperts.forward_dense`), mixed by p."""
        h_EBH = x_BD.unsqueeze(0).expand(self.num_experts, -1, -1)
        for w_EDH, b_EH in zip(self.weights, self.biases, strict=True):
            h_EBH = torch.relu(torch.baddbmm(b_EH.unsqueeze(1), h_EBH, w_EDH))
        return torch.einsum("bte,ebh->bth", probs_BTE, h_EBH)

    def _sparse(self, x_BD: torch.Tensor, logits_BTE: torch.Tensor) -> torch.Tensor:
        B, T, E = logits_BTE.shape
        experts_BTK = self.router.select(torch.softmax(logits_BTE, dim=-1), self.bias_E, logits_BTE=logits_BTE)
        weights_BTK = torch.softmax(logits_BTE.gather(-1, experts_BTK), dim=-1)
        K = experts_BTK.shape[-1]
        # deduplicate: sort keys expert*B + instance; a run's first key is a pair
        instance_B11 = torch.arange(B, device=x_BD.device).view(B, 1, 1)
        key_M, order_M = (experts_BTK * B + instance_B11).reshape(-1).sort(stable=True)
        expert_M = torch.div(key_M, B, rounding_mode="floor")
        first_M = torch.cat([key_M.new_ones(1, dtype=torch.bool), key_M[1:] != key_M[:-1]])
        pair_M = torch.cumsum(first_M, 0) - 1
        counts_E = torch.zeros(E, dtype=torch.long, device=x_BD.device).scatter_add_(0, expert_M, first_M.long())
        num_pairs = cast(int, counts_E.sum().item())  # the one data-dependent size (an unbacked SymInt)
        torch._check(num_pairs >= 0)
        torch._check(num_pairs <= B * T * K)
        dest_M = torch.where(first_M, pair_M, num_pairs)  # duplicates go to a discarded row N
        instance_M = key_M - expert_M * B
        instance_N = instance_M.new_empty(num_pairs + 1).index_copy_(0, dest_M, instance_M)[:num_pairs]
        y_NH = torch.ops.smes_serving.grouped_mlp(
            x_BD.index_select(0, instance_N), counts_E, list(self.weights), list(self.biases)
        )
        index_BTK = torch.empty_like(pair_M).scatter_(0, order_M, pair_M).view(B, T, K)
        return (weights_BTK.unsqueeze(-1) * y_NH[index_BTK]).sum(dim=2)


class DenseProgram(nn.Module):
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
    """`torch.export` of `DenseProgram(model)` with a dynamic batch size."""
    program = DenseProgram(model).eval()
    batch = torch.export.Dim("batch", min=1, max=1 << 24)
    with torch.no_grad():
        return torch.export.export(program, (x_BD,), dynamic_shapes=({0: batch},), strict=False)


def metadata(run: RunConfig, dataset: Dataset, *, run_dir: Path, ckpt: Path) -> dict[str, Any]:
    spec, info = dataset.spec, dataset.info
    stats: dict = info.get("dense_stats") or {}  # type: ignore[assignment]
    transforms = info.get("dense_transforms") or [None] * spec.num_dense
    return {
        "format": serving.FORMAT,
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
    torch.export.save(export_program(model, x_BD), str(out / serving.PROGRAM))
    tables = {
        table_name(f.name): model.ebc.embedding_bags[table_name(f.name)].weight.detach().contiguous()
        for f in dataset.spec.sparse
    }
    save_file(tables, str(out / serving.TABLES))
    vocab = dataset.info.get("vocab")
    if vocab:
        (out / serving.VOCAB_JSON).write_text(json.dumps({k: v.to_pylist() for k, v in vocab.items()}))  # type: ignore[attr-defined]
    (out / serving.MODEL_JSON).write_text(json.dumps(meta, indent=2) + "\n")


@torch.no_grad()
def check_artifact(model: MultiTaskModel, dataset: Dataset, out: Path, *, rows: int) -> dict[str, Any]:
    """Max |logit difference| of the loaded artifact vs the model on `rows` test rows."""
    loaded = serving.InferenceModel.load(out)
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
    dataset = build_dataset(run.data)
    model = load_plain_model(run, dataset, ckpt)
    meta = metadata(run, dataset, run_dir=run_dir, ckpt=ckpt)
    write_artifact(model, dataset, meta, out)
    meta["check"] = check_artifact(model, dataset, out, rows=check_rows)
    (out / serving.MODEL_JSON).write_text(json.dumps(meta, indent=2) + "\n")
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
