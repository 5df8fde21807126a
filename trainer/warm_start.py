"""Warm start: a new run begins from another run's model (`trainer.init_from`).

`trainer.init_from` names a run directory (its reported model: `summary.json`
`best_step`, as `trainer.predict` resolves `checkpoint=best`) or a complete checkpoint
folder. The new run builds its own data, model and optimizers as usual, then, before
its first step:

- network weights (core, experts, towers): from the checkpoint; the moving average
  instead when the checkpoint holds one (`trainer.ema`), since that is the source's
  evaluated model. Under another world size or `parallel.ep` each rank copies its own
  expert slices out of the global tensors.
- vocabularies (`trainer.init_vocab`): `extend` (default) builds this run's vocabularies
  of the file sources on the source's (`data.build.build_dataset(base_vocab=...)`): every
  id the source knew keeps its id, in every split, and this run's new train values are
  appended, so an id absent from today's rows still has yesterday's trained row;
  `rebuild` builds them from this run's train rows alone (ids unseen today fall back to
  the "unseen" row 0; the table does not grow without bound). The streaming source's ids
  come from its vocabulary file (`python -m data.stream vocab --extend`).
- embedding rows: carried by id (`data/ids.py`): the row of an id the source knew gets
  the source's row for that id (found by raw value in the source's vocabulary, or row to
  row for hashed ids); ids new to this run keep the usual seeded initialisation. Works
  for any sharding of either run: each rank reads one source table at a time, whole,
  and fills the rows of its own shards (peak memory: the largest source table).
- a larger SMES pool (`model.num_experts` a multiple of the source's) is upcycled, and
  an MMoE source becomes an SMES model of the same expert width (`model/moe/upcycle.py`;
  `trainer.upcycle_noise` perturbs the copies).
- `trainer.init_from_optimizer=true` also carries the optimizer states: the embedding
  optimizer's per-row state by the same row map (a fresh Adagrad accumulator would take
  full-size steps on every trained row), the network optimizer's by parameter name when
  the network is the same (after upcycling or a conversion it starts fresh, noted in
  the record). Otherwise the optimizers start fresh. The step counter, schedule and
  data position always start at 0: the new run trains on its own data with its own
  schedule, and validates the loaded model at step 0 first (the first model-selection
  candidate; `trainer/trainer.py`).

Checks before any weight is read: the source is a complete checkpoint; its run's model
kind, embedding dim, expert and tower widths, tasks, dense columns and sparse features
agree with this run's (a ValueError names the config key that differs); after the
transforms every tensor's shape is compared.

A resumed run (`trainer.resume` finds a checkpoint of this run) continues from its own
checkpoint and does not warm start again; the warm-start record
(`<run_dir>/init_from.json`, summary.json `init_from`) stays.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from omegaconf import DictConfig, OmegaConf

from data.columns import Dataset
from data.ids import DataRecord, id_counts, read_records, records, row_map, vocabularies
from model.build import table_name
from model.moe.upcycle import mmoe_to_smes, upcycle_smes
from parallel.expert.checkpoint import checkpoint_view
from parallel.expert.params import expert_parameter_names
from parallel.parallelize import EMBEDDING_PREFIX, ParallelModel
from trainer import checkpoint
from trainer.checkpoint import MARKER, TrainState
from trainer.config import RunConfig, load_saved_config

log = logging.getLogger("trainer.warm_start")
RECORD_FILE = "init_from.json"
# target state held by an SMES model and absent from an MMoE one: kept at its initialisation
SMES_ONLY = ("core.layer.router.norm.", "core.layer.router.task_weights_T", "core.layer.expert_bias_E")


@dataclass(frozen=True)
class Source:
    """A resolved `trainer.init_from`: its checkpoint, its run's config and id records."""

    checkpoint: Path
    run_dir: Path
    config: DictConfig
    data: DataRecord
    step: int


def resolve_source(init_from: str) -> Source:
    """The checkpoint and run of `trainer.init_from` (a run dir or a checkpoint folder)."""
    path = Path(init_from)
    key = f"trainer.init_from={init_from!r}"
    if not path.exists():
        raise FileNotFoundError(f"{key}: no such run directory or checkpoint folder")
    if (path / "config.yaml").is_file():
        run_dir = path
        ckpt = checkpoint.resolve_checkpoint("best", run_dir)
    elif path.name.startswith(("step_", "best_step_")):
        if not (path / MARKER).exists():
            raise ValueError(f"{key} is a partial checkpoint (no {MARKER} marker: its writing did not finish)")
        ckpt, run_dir = path, path.parent.parent
        if not (run_dir / "config.yaml").is_file():
            raise FileNotFoundError(f"{key}: the checkpoint's run directory {run_dir} has no config.yaml")
    else:
        raise ValueError(f"{key} is neither a run directory (config.yaml) nor a checkpoint folder (step_<N>)")
    try:
        data = read_records(run_dir)
    except FileNotFoundError as e:
        raise ValueError(f"{key}: {e}; its embedding rows cannot be matched to ids") from None
    return Source(checkpoint=ckpt, run_dir=run_dir, config=load_saved_config(run_dir / "config.yaml"), data=data,
                  step=checkpoint.checkpoint_step(ckpt))  # fmt: skip


def base_vocabularies(run: RunConfig) -> dict[str, Any] | None:
    """The vocabularies this run's data extends (`trainer.init_vocab=extend` with
    `trainer.init_from`), None otherwise. Resolving the source here makes a missing or
    partial one fail before any data is read."""
    t = run.trainer
    if not t.init_from:
        return None
    source = resolve_source(t.init_from)
    return vocabularies(source.data) if t.init_vocab == "extend" else None


def _differs(key: str, source: Any, here: Any, hint: str = "") -> ValueError:
    return ValueError(
        f"trainer.init_from: {key} is {source!r} in the source run but {here!r} here{hint}; "
        "a warm start needs the same value"
    )


def check_compatible(source: Source, run: RunConfig, data: DataRecord) -> str:
    """ValueError naming the first config key that differs (module doc). Returns the
    transform: `same`, `upcycle` (larger SMES pool) or `mmoe_to_smes`."""
    src = OmegaConf.to_container(source.config.model, resolve=True)
    assert isinstance(src, dict)
    core = run.model.core
    here_name = getattr(core, "name", None)
    transform = "same"
    if src.get("name") != here_name:
        if not (src.get("name") == "mmoe" and here_name == "smes"):
            raise _differs("model.name", src.get("name"), here_name, " (only mmoe -> smes converts)")
        transform = "mmoe_to_smes"
    if int(src.get("embedding_dim", -1)) != run.model.embedding_dim:
        raise _differs("model.embedding_dim", src.get("embedding_dim"), run.model.embedding_dim)
    tower = (src.get("tower") or {}).get("hidden")
    if list(tower or []) != list(run.model.tower.hidden):
        raise _differs("model.tower.hidden", tower, list(run.model.tower.hidden))
    hidden = getattr(core, "expert_hidden", None)
    if hidden is not None and list(src.get("expert_hidden") or []) != list(hidden):
        raise _differs("model.expert_hidden", src.get("expert_hidden"), list(hidden))
    if here_name == "smes":
        n_src, n_here = int(src.get("num_experts", 0)), int(core.num_experts)
        if n_here != n_src:
            if n_src < 1 or n_here % n_src:
                raise _differs("model.num_experts", n_src, n_here, " (a pool grows by a whole factor: use a multiple)")
            transform = "upcycle" if transform == "same" else transform
        if transform != "mmoe_to_smes" and src.get("router_norm", "none") != core.router_norm:
            raise _differs("model.router_norm", src.get("router_norm"), core.router_norm)
        if transform != "mmoe_to_smes" and bool(src.get("router_bias", False)) != bool(core.router_bias):
            raise _differs("model.router_bias", src.get("router_bias", False), core.router_bias)
    elif here_name is not None and "num_experts" in src and int(src["num_experts"]) != int(core.num_experts):
        raise _differs("model.num_experts", src["num_experts"], core.num_experts)
    old = source.data
    if old.tasks != data.tasks:
        raise _differs("data.tasks", list(old.tasks), list(data.tasks))
    if old.dense != data.dense:
        raise _differs("the dense columns (data.*dense*)", list(old.dense), list(data.dense))
    if list(old.ids) != list(data.ids):
        raise _differs("the sparse features (data.*categorical* / multi_hot)", list(old.ids), list(data.ids))
    return transform


# ----------------------------------------------------------------------------- reading


def _stored(path: Path) -> dict[str, Any]:
    return dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata


def _read(path: Path, wanted: dict[str, tuple[int, ...]], group: str) -> dict[str, torch.Tensor]:
    """Full tensors `group.<name>` of the checkpoint (collective: every rank reads them)."""
    stored = _stored(path)
    tensors = {name: torch.empty(shape, dtype=stored[f"{group}.{name}"].properties.dtype)
               for name, shape in wanted.items()}  # fmt: skip
    if tensors:
        dcp.load({group: tensors}, checkpoint_id=str(path), process_group=checkpoint._dcp_group())
    return tensors


def _source_network(path: Path) -> dict[str, torch.Tensor]:
    """The source's evaluated network weights: its state dict but the tables, with the
    moving average over the parameters when the checkpoint holds one."""
    stored = _stored(path)
    shapes = {k[len("model."):]: tuple(v.size) for k, v in stored.items()
              if k.startswith("model.") and not k.startswith("model." + EMBEDDING_PREFIX)}  # fmt: skip
    state = _read(path, shapes, "model")
    averaged = {k[len("ema.") :]: tuple(v.size) for k, v in stored.items() if k.startswith("ema.")}
    if averaged:
        for name, value in _read(path, averaged, "ema").items():
            key = _state_key(name, state)
            if key is not None:
                state[key] = value.to(state[key].dtype)
    return state


def _state_key(param_name: str, state: dict[str, Any]) -> str | None:
    """The state-dict key of a parameter name (DDP / DMP wrappers may prefix it)."""
    if param_name in state:
        return param_name
    hits = [k for k in state if param_name.endswith("." + k)]
    return max(hits, key=len) if hits else None


# ----------------------------------------------------------------------------- writing


def _global_shapes(pm: ParallelModel, state: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    view = checkpoint_view({"model": state}, pm.mesh, model=pm.dmp)["model"]
    return {k: tuple(v.size()) for k, v in view.items() if hasattr(v, "size")}


def _expert_slice(pm: ParallelModel, local: torch.Tensor) -> slice:
    if pm.mesh is None or pm.mesh.ep == 1:
        return slice(None)
    n = local.shape[0]
    return slice(pm.mesh.ep_rank * n, (pm.mesh.ep_rank + 1) * n)


def _local_shards(value: Any) -> list[tuple[int, int, torch.Tensor]]:
    """(first row, first column, tensor) of each local shard of a table state."""
    if hasattr(value, "local_shards"):
        return [(s.metadata.shard_offsets[0], s.metadata.shard_offsets[1] if len(s.metadata.shard_offsets) > 1 else 0,
                 s.tensor) for s in value.local_shards()]  # fmt: skip
    return [(0, 0, value)]


@torch.no_grad()
def _fill_rows(target: Any, old: torch.Tensor, mapping: np.ndarray) -> None:
    """Rows of `target` (sharded or not) whose id the source knew get the source's row."""
    for row0, col0, t in _local_shards(target):
        rows = torch.from_numpy(mapping[row0 : row0 + t.shape[0]])
        keep = rows >= 0
        if not bool(keep.any()):
            continue
        src = old[rows[keep]]
        if t.dim() > 1:
            src = src[:, col0 : col0 + t.shape[1]]
        t[keep.to(t.device)] = src.to(t.device, t.dtype)


def _network_state(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if not k.startswith(EMBEDDING_PREFIX)}


def warm_start(
    state: TrainState, pm: ParallelModel, run: RunConfig, dataset: Dataset, *, run_dir: Path | None, is_main: bool
) -> dict[str, Any]:
    """Load `run.trainer.init_from` into the freshly built run (collective). Returns the
    record written to `init_from.json` and summary.json."""
    t = run.trainer
    assert t.init_from
    source = resolve_source(t.init_from)
    here = records(dataset)
    transform = check_compatible(source, run, here)
    dmp = pm.dmp
    live = dmp.state_dict()
    shapes = _global_shapes(pm, _network_state(live))
    network = _source_network(source.checkpoint)
    notes: list[str] = []
    tasks = tuple(dataset.spec.tasks)
    if transform == "mmoe_to_smes":
        network, notes = mmoe_to_smes(network, shapes, tasks=tasks)
    factor = 1
    if run.model.core.name == "smes":
        network, factor = upcycle_smes(network, shapes, num_tasks=len(tasks), noise=t.upcycle_noise, seed=t.seed)
    kept_init = [k for k in shapes if k not in network and transform == "mmoe_to_smes" and k.startswith(SMES_ONLY)]
    missing = [k for k in shapes if k not in network and k not in kept_init]
    extra = [k for k in network if k not in shapes]
    if missing or extra:
        raise ValueError(
            f"trainer.init_from: the source checkpoint {source.checkpoint} and this model differ: "
            f"tensors only here {missing[:5]}, only in the source {extra[:5]} (the model config differs)"
        )
    for key, want in shapes.items():
        if key in network and tuple(network[key].shape) != want:
            raise ValueError(
                f"trainer.init_from: {key} has shape {tuple(network[key].shape)} in the source checkpoint "
                f"{source.checkpoint} but {want} here (the model or data config differ)"
            )
    experts = expert_parameter_names(dmp)
    with torch.no_grad():
        for key, value in _network_state(live).items():
            if key in network and isinstance(value, torch.Tensor):
                src = network[key][_expert_slice(pm, value)] if key in experts else network[key]
                value.copy_(src.to(value.device, value.dtype))
    # embedding rows by id, one source table at a time
    carried: dict[str, int] = {}
    new_ids: dict[str, int] = {}
    maps: dict[str, np.ndarray] = {}
    stored = _stored(source.checkpoint)
    for feature, rec in here.ids.items():
        mapping = row_map(source.data.ids[feature], rec)
        maps[feature] = mapping
        carried[feature], new_ids[feature] = id_counts(mapping)
        key = f"{EMBEDDING_PREFIX}embedding_bags.{table_name(feature)}.weight"
        old = _read(source.checkpoint, {key: tuple(stored[f"model.{key}"].size)}, "model")[key]
        _fill_rows(live[key], old, mapping)
    dmp.load_state_dict(live)
    if t.init_from_optimizer:
        _load_sparse_optimizer(state, source, maps)
        if transform == "same":
            _load_network_optimizer(state, pm, source)
        else:
            notes.append(f"the network optimizer starts fresh: the network changed ({transform})")
    refresh = getattr(state.network_optim, "refresh_master", None)
    if refresh is not None:  # DeepSpeed: its fp32 master weights follow the loaded weights
        refresh()
    if state.ema is not None:
        state.ema.reset()  # the average starts from the loaded model
    record = {
        "path": str(source.checkpoint),
        "run_dir": str(source.run_dir),
        "step": source.step,
        "transform": transform,
        "expert_copies": factor,
        "optimizer": bool(t.init_from_optimizer),
        "carried_ids": carried,
        "new_ids": new_ids,
        "notes": notes,
    }
    for note in notes:
        log.warning("trainer.init_from: %s", note)
    if is_main:
        log.info(
            "warm start from %s (step %d, %s): ids carried %d, new %d",
            source.checkpoint, source.step, transform, sum(carried.values()), sum(new_ids.values()),
        )  # fmt: skip
        if run_dir is not None:
            (run_dir / RECORD_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return record


def _load_sparse_optimizer(state: TrainState, source: Source, maps: dict[str, np.ndarray]) -> None:
    """The embedding optimizer's per-row states, by the tables' row maps."""
    stored = _stored(source.checkpoint)
    sparse = state.sparse_optim.state_dict()
    for param, entries in sparse["state"].items():
        feature = next((f for f in maps if param == f"{EMBEDDING_PREFIX}embedding_bags.{table_name(f)}.weight"), None)
        if feature is None:
            continue
        for name, value in entries.items():
            key = f"state.{param}.{name}"
            meta = stored.get(f"optim/sparse.{key}")
            if meta is None or not hasattr(value, "size") or value.dim() == 0:
                continue
            old = _read(source.checkpoint, {key: tuple(meta.size)}, "optim/sparse")[key]
            _fill_rows(value, old, maps[feature])
    state.sparse_optim.load_state_dict(sparse)


def _load_network_optimizer(state: TrainState, pm: ParallelModel, source: Source) -> None:
    """The network optimizer's states by parameter name (the same network; global views
    of the expert slices, so another world size or ep loads them)."""
    state.network_optim.init_state()
    tensors = checkpoint_view({"optim/dense": state.network_optim.state_dict()}, pm.mesh, model=pm.dmp)
    dcp.load(tensors, checkpoint_id=str(source.checkpoint), process_group=checkpoint._dcp_group())
    sharded = pm.mesh is not None and pm.mesh.ep > 1
    network = checkpoint._local_tensors(tensors["optim/dense"]) if sharded else tensors["optim/dense"]
    state.network_optim.load_state_dict(network)


def read_record(run_dir: Path) -> dict[str, Any] | None:
    """The warm-start record of a run (None when it did not warm start)."""
    path = run_dir / RECORD_FILE
    return json.loads(path.read_text()) if path.is_file() else None
