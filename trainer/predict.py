"""Score a split or other files with a trained run: `python -m trainer.predict run_dir=...`.

Hydra entry point with its own config (`conf/predict.yaml`); under torchrun on any
number of processes (`launch/predict.sh`), like training:

    python -m trainer.predict run_dir=RUN [checkpoint=best|last|DIR] [split=test|val|train] [experts=true]
    NPROC=2 bash launch/predict.sh run_dir=RUN files=[a.csv,b.csv] data.on_bad_row=skip

What it does, on every rank:

1. the run: `RUN/config.yaml` (the resolved training config) with the `data.*`
   overrides given here (`data.on_bad_row=skip`, a moved `data.root`, ...); relative
   data paths resolve against the current directory, as in training.
2. the data, built by the run's source as in training, so the vocabularies and dense
   statistics come from the run's own train split: `split=` scores one of its splits;
   `files=[...]` scores other files with the same schema (`Dataset.scored`: CSV /
   Parquet tables of `data=tabular`, Census-Income files, KuaiRand-format logs joined
   with the run's feature tables; other sources raise naming `files`). Bad rows are
   handled as in training (`data.on_bad_row`): an error naming file, row and column, or
   skipped and counted.
3. the model, built and parallelised at the current world size, and the checkpoint
   loaded into it (DCP reshards: any world size, any `ep` dividing it);
   `checkpoint=best` is the model whose test metrics `summary.json` reports as `eval`
   (`best_step`), `last` the newest periodic checkpoint, or a checkpoint folder.
4. scoring in evaluation mode (`model.eval()`, no grad, the run's `trainer.precision`):
   every rank takes a contiguous chunk of the rows (`data.loaders.in_memory.eval_batches`), a
   progress bar on rank 0.

Output (`out=`, default `RUN/predictions/<split, or the first file's name up to its
first '.'>.parquet`): one row per scored input row, in input order, padding dropped:

- the key columns the source keeps: `file` and `row` (the row number in that file,
  from 1, header excluded, as in data errors) for the file sources, plus `user_id`
  (KuaiRand; a tabular source's `data.user_id` column) and `video_id` (KuaiRand); a
  source that keeps no key columns (synthetic, parquet_stream) gets `row`, the position
  in the split, and with users `user`, the user's group index in the split (the GAUC
  group, not the raw id);
- one probability column per task, named after the task (float64:
  `sigmoid(logit)`);
- `label_<task>` (int8) for each task whose labels the rows have (a split always;
  files when they hold the task's label column);
- with `experts=true` (SMES cores only; other cores raise naming `experts`):
  `experts` (list<int16>), the distinct experts the row's union U ran in the first
  SMES layer, ascending: K_s + K_a to K_s + T*K_a of them with progressive routing
  (all E with `all`). Evaluation is dropless, so these are exactly the experts that
  computed the row. The layer keeps each batch's routing plan while
  `SMESLayer.record_plan` is set (only here; training never sets it) and
  `model.moe.router.union_experts` reads the rows' experts from it, one host copy per
  batch. `trainer.evaluation.experts.cluster_expert_nmi(table["experts"].to_pylist(),
  clusters)` then measures how specialised the experts are by a latent grouping
  of the rows.

Each rank writes its part (`<out>.parts/rank<r>.parquet`); after a barrier rank 0
concatenates them in rank order into `<out>` and deletes the parts. When labels are
present, the metrics of the scored rows (`trainer.evaluation.metrics.compute_metrics`, the run's
`trainer.eval_mode`) are printed and written to `<out stem>.metrics.json`; on the run's
own test split with the reported checkpoint they are the run's `summary.json` `eval`.

Errors a user fixes (`ValueError`, `FileNotFoundError`) end as one `error: ...` line,
as in `trainer/train.py`.

Legend: B rows per batch, N rows scored on this rank.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm import tqdm

from data.build import build_dataset
from data.columns import Dataset, Split
from data.ids import run_vocabularies
from data.loaders.in_memory import eval_batches
from model.moe.host import host_ints, to_host
from model.moe.router import union_experts
from model.smes import SMESLayer
from parallel.dist import DistInfo, barrier, init_distributed, shutdown
from parallel.expert.params import smes_layers
from trainer.checkpoint import resolve_checkpoint
from trainer.config import RunConfig
from trainer.evaluation.metrics import Predictions, compute_metrics
from trainer.serving.restore import load_model_from, run_config, run_node

log = logging.getLogger("trainer.predict")
RANK = int(os.environ.get("RANK", "0"))
SPLITS = ("train", "val", "test")
USER_ERRORS = (ValueError, FileNotFoundError)
USER_ERROR_CODE = 2
_user_error: str | None = None


@dataclass(kw_only=True)
class PredictConfig:
    """`conf/predict.yaml`; see the module doc."""

    run_dir: str
    checkpoint: str = "best"
    split: str = "test"
    files: list[str] | None = None
    out: str | None = None
    batch_size: int | None = None
    device: str | None = None
    ep: int | None = None
    metrics: bool = True
    progress: bool = True
    experts: bool = False
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Scoring:
    """What is scored: the rows, their name, the tasks they have labels for."""

    rows: Split
    name: str
    labelled: tuple[str, ...]


def output_name(cfg: PredictConfig) -> str:
    if cfg.files:
        stem = Path(cfg.files[0]).name.split(".")[0] or "scored"
        return stem if len(cfg.files) == 1 else f"{stem}_and_{len(cfg.files) - 1}_more"
    return cfg.split


def select_rows(cfg: PredictConfig, dataset: Dataset) -> Scoring:
    if cfg.files:
        if dataset.scored is None or len(dataset.scored) == 0:
            raise ValueError(f"files={cfg.files}: no row to score (empty, or every row skipped as bad)")
        return Scoring(rows=dataset.scored, name=output_name(cfg), labelled=dataset.scored_labels)
    if cfg.split not in SPLITS:
        raise ValueError(f"split={cfg.split!r}; choose one of {SPLITS} (or give files=[...])")
    rows = dataset.split(cfg.split)
    if not isinstance(rows, Split):
        raise ValueError(f"split={cfg.split}: the {dataset.spec.name!r} {cfg.split} split is streamed from its files; "
                         "score split=val or split=test")  # fmt: skip
    return Scoring(rows=rows, name=cfg.split, labelled=dataset.spec.tasks)


def _row_keys(rows: Split, index_B: np.ndarray) -> dict[str, np.ndarray]:
    """Keys of a source that keeps no key columns: `row` (the position in the split) and,
    when the rows have users, `user` (the user's group index in the split: the GAUC
    group, not the raw id)."""
    keys = {"row": index_B}
    if rows.user_id is not None:
        keys["user"] = np.asarray(rows.user_id)[index_B].astype(np.int64)
    return keys


def _schema(rows: Split, tasks: tuple[str, ...], labelled: tuple[str, ...], *, experts: bool = False) -> pa.Schema:
    """Output columns (the same on every rank: key dtypes are the global arrays')."""
    keys = rows.keys if rows.keys is not None else _row_keys(rows, np.zeros(0, dtype=np.int64))
    fields = [pa.field(k, pa.int64() if v.dtype.kind in "iu" else pa.string()) for k, v in keys.items()]
    fields += [pa.field(t, pa.float64()) for t in tasks]
    fields += [pa.field(f"label_{t}", pa.int8()) for t in labelled]
    if experts:
        fields.append(pa.field("experts", pa.list_(pa.int16())))
    names = [f.name for f in fields]
    if len(set(names)) != len(names):
        raise ValueError(f"output columns collide: {names} (a task is named like a key column)")
    return pa.schema(fields)


def _batch_table(
    schema: pa.Schema,
    rows: Split,
    index_B: np.ndarray,
    logits: dict[str, torch.Tensor],
    labelled: tuple[str, ...],
    experts: pa.Array | None = None,
) -> pa.Table:
    columns: dict[str, Any] = {}
    if rows.keys is None:
        columns.update(_row_keys(rows, index_B))
    else:
        columns.update({k: v[index_B] for k, v in rows.keys.items()})
    for t, z_B in logits.items():
        columns[t] = torch.sigmoid(z_B.double()).numpy()
    for t in labelled:
        columns[f"label_{t}"] = rows.labels[t][index_B].astype(np.int8)
    if experts is not None:
        columns["experts"] = experts
    return pa.Table.from_pydict(columns, schema=schema)


def experts_layer(model: torch.nn.Module, model_name: str) -> SMESLayer:
    """`experts=true`: the model's first SMES layer, set to keep its routing plans."""
    layers = smes_layers(model)
    if not layers:
        raise ValueError(f"experts=true needs an SMES core; the run's model is {model_name!r}")
    layer = layers[0]
    if layer.num_experts > np.iinfo(np.int16).max + 1:
        raise ValueError(f"experts=true writes int16 expert ids; the model has {layer.num_experts} experts")
    layer.record_plan = True
    return layer


def row_experts(layer: SMESLayer, valid: int) -> pa.Array:
    """The first `valid` rows' executed experts (list<int16>) from the layer's last plan."""
    plan = layer.last_plan
    assert plan is not None, "the SMES layer kept no routing plan"
    layer.last_plan = None  # a stale plan is never read twice
    table_BU = to_host(union_experts(plan)[:valid]).numpy()  # one host copy per batch
    ran_BU = table_BU >= 0  # each row's experts fill its first |U| slots
    offsets = np.concatenate([[0], np.cumsum(ran_BU.sum(1))]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(table_BU[ran_BU].astype(np.int16)))


def autocast(run: RunConfig, device: torch.device) -> Any:
    """The run's `trainer.precision` (bf16 autocast), as its evaluation ran."""
    if run.trainer.precision != "bf16":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16)


@torch.no_grad()
def score(
    model: torch.nn.Module,
    scoring: Scoring,
    *,
    run: RunConfig,
    dataset: Dataset,
    info: DistInfo,
    batch_size: int,
    part: Path,
    preds: Predictions | None,
    progress: bool,
    experts: SMESLayer | None = None,
) -> int:
    """Score this rank's chunk into the Parquet file `part`; returns its row count.
    `experts`: the SMES layer whose plans give the `experts` column (None: no column)."""
    rows, spec = scoring.rows, dataset.spec
    schema = _schema(rows, spec.tasks, scoring.labelled, experts=experts is not None)
    n = len(rows)
    per_rank = math.ceil(n / info.world_size)
    lo = min(info.rank * per_rank, n)
    num_batches = max(1, math.ceil(per_rank / batch_size))
    batches = eval_batches(rows, spec=spec, batch_size=batch_size, rank=info.rank, world_size=info.world_size)
    model.eval()
    written = 0
    with pq.ParquetWriter(part, schema) as writer:
        bar = tqdm(batches, total=num_batches, disable=not (info.is_main and progress), desc=f"scoring {scoring.name}")
        for i, batch in enumerate(bar):
            batch = batch.to(info.device)
            with autocast(run, info.device):
                out = model(batch)
            if preds is not None:
                preds.add(out.logits, batch.labels, batch.weights, batch.user_id)
            valid = host_ints((batch.weights > 0).sum())[0]
            index_B = np.arange(lo + i * batch_size, lo + i * batch_size + valid)
            logits = {t: to_host(out.logits[t][:valid].float()) for t in spec.tasks}
            ran = None if experts is None else row_experts(experts, valid)
            writer.write_table(_batch_table(schema, rows, index_B, logits, scoring.labelled, ran))
            written += valid
        if written == 0:
            writer.write_table(schema.empty_table())
    return written


def combine_parts(parts: list[Path], out: Path) -> int:
    """Rank 0: the parts, in order, into `out` (row group by row group); returns rows."""
    tmp = out.with_name(out.name + ".tmp")
    total = 0
    with pq.ParquetWriter(tmp, pq.read_schema(parts[0])) as writer:
        for path in parts:
            f = pq.ParquetFile(path)
            for g in range(f.num_row_groups):
                table = f.read_row_group(g)
                writer.write_table(table)
                total += table.num_rows
    os.replace(tmp, out)
    return total


def predict(cfg: PredictConfig, info: DistInfo, run: RunConfig) -> dict[str, Any]:
    """Score on this rank, rank 0 writes the outputs; returns the metrics record (every rank)."""
    run_dir = Path(cfg.run_dir)
    ckpt = resolve_checkpoint(cfg.checkpoint, run_dir)
    # the ids the run trained with (a warm-started run extended its source's vocabularies)
    dataset = build_dataset(run.data, score_files=cfg.files, keep_keys=True, base_vocab=run_vocabularies(run_dir))
    scoring = select_rows(cfg, dataset)
    model, step = load_model_from(run, dataset, info, ckpt)
    layer = experts_layer(model, run.model.name) if cfg.experts else None
    out = Path(cfg.out) if cfg.out else run_dir / "predictions" / f"{scoring.name}.parquet"
    parts_dir = out.with_name(out.name + ".parts")
    if info.is_main:
        parts_dir.mkdir(parents=True, exist_ok=True)
        log.info("scoring %d rows of %s with %s (step %d) on %d rank(s)", len(scoring.rows), scoring.name, ckpt,
                 step, info.world_size)  # fmt: skip
    barrier()
    preds = Predictions(scoring.labelled) if cfg.metrics and scoring.labelled else None
    batch_size = cfg.batch_size or run.trainer.eval_batch_size
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    part = parts_dir / f"rank{info.rank:05d}.parquet"
    score(model, scoring, run=run, dataset=dataset, info=info, batch_size=batch_size, part=part, preds=preds,
          progress=cfg.progress, experts=layer)  # fmt: skip
    metrics = compute_metrics(preds, scoring.labelled, mode=run.trainer.eval_mode) if preds is not None else None
    barrier()  # every part is on disk
    record = {
        "run_dir": str(run_dir),
        "checkpoint": str(ckpt),
        "step": step,
        "scored": scoring.name,
        "files": cfg.files,
        "rows": len(scoring.rows),
        "skipped_rows": dataset.skipped_rows,
        "world_size": info.world_size,
        "output": str(out),
        "metrics": metrics,
    }
    if info.is_main:
        parts = [parts_dir / f"rank{r:05d}.parquet" for r in range(info.world_size)]
        written = combine_parts(parts, out)
        assert written == len(scoring.rows), (written, len(scoring.rows))
        shutil.rmtree(parts_dir, ignore_errors=True)
        if metrics is not None:
            out.with_suffix(".metrics.json").write_text(json.dumps(record, indent=2) + "\n")
            for task, m in metrics.items():
                print(f"{task}: " + " ".join(f"{k}={m[k]:.6f}" for k in ("auc", "gauc", "ne") if m.get(k) is not None))
        print(f"predictions: {out} ({written} rows)", flush=True)
    barrier()
    return record


@hydra.main(config_path="../conf", config_name="predict", version_base="1.3")
def main(node: DictConfig) -> None:
    global _user_error
    try:
        cfg = predict_config(node)
        run = run_node(cfg.run_dir)
        info = init_distributed(device=cfg.device or str(OmegaConf.select(run, "trainer.device", default="auto")))
        if not info.is_main:
            logging.getLogger().setLevel(logging.WARNING)
            logging.getLogger("data").setLevel(logging.ERROR)  # every rank loads the same data: rank 0 warns
        config = run_config(run, world_size=info.world_size, data=cfg.data, device=cfg.device, ep=cfg.ep)
        predict(cfg, info, config)
    except USER_ERRORS as e:
        _user_error = str(e)
        log.debug("rank %d failed", RANK, exc_info=True)
        raise SystemExit(USER_ERROR_CODE) from None


def predict_config(node: DictConfig) -> PredictConfig:
    """The composed `conf/predict.yaml` as a `PredictConfig` (ValueError naming the key)."""
    plain = {k: v for k, v in node.items() if k != "hydra"}
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PredictConfig), plain))
    except OmegaConfBaseException as e:
        raise ValueError(f"invalid predict config at {getattr(e, 'full_key', '') or '?'}: {e}") from None
    assert isinstance(cfg, PredictConfig)
    return cfg


def data_overrides(argv: list[str]) -> list[str]:
    """`data.X=Y` -> `++data.X=Y`: the run's data keys are not in `conf/predict.yaml`, and
    Hydra refuses new keys without `++`; users write the keys they trained with."""
    return [f"++{a}" if a.startswith("data.") and "=" in a else a for a in argv]


if __name__ == "__main__":
    sys.argv = data_overrides(sys.argv)
    code = 0
    try:
        main()
    except SystemExit as e:  # hydra exits on composition errors, main on user errors
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        logging.getLogger("trainer").exception("rank %d failed", RANK)
        code = 1
    if _user_error is not None:
        from trainer.train import report_error

        report_error(_user_error)
    shutdown(code)
