"""Sharded, resumable, reshardable checkpoints with torch.distributed.checkpoint (DCP).

A checkpoint is a folder `<run_dir>/checkpoints/step_<N>/` holding DCP shards of:

- `model`: the DMP state dict (embedding shards as ShardedTensors, network weights,
  expert-parallel expert slices as DTensors of the full expert stack);
- `optim/sparse`: the fused embedding optimizer (TorchRec `KeyedOptimizer`, sharded
  like the tables), `optim/dense`: the network optimizer keyed by parameter name (the key keeps its
  older name, so that older checkpoints load; with
  `trainer.engine=deepspeed`, the ZeRO-partitioned state gathered per parameter into
  the same layout, see `parallel.deepspeed_engine.ZeroNetworkOptimizer`),
  `optim/tables`: the optimizer of tables sharded `data_parallel`, if any;
- `ema`: the moving average of the network weights, with `trainer.ema` on
  (`trainer/ema.py`); `load_model` loads it over the trained weights, since it is the
  run's evaluated model;
- `meta`: step, scheduler, every rank's loader state (`data.loaders.in_memory.TrainBatches`: the
  in-memory loader's is global, the streaming loader's per rank), counters, and every
  rank's RNG states (pickled, written once). At the same world size each rank loads its
  own loader state; at another, every loader gets all old states (`load_resharded`, its
  documented policy).

DCP stores each tensor with its global shape, so a checkpoint written by W ranks loads
on any other number of ranks: every rank reads the slices its own shards cover.

Completeness: every rank writes its shards, all ranks meet at a barrier, then rank 0
writes `COMPLETE`. A folder without it (a crash mid-write) is ignored with a warning.
Only the newest `keep_last` complete checkpoints are kept. A checkpoint is never
written from non-finite weights.
"""

from __future__ import annotations

import json
import logging
import pickle
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.tensor import DTensor
from torchrec.optim.keyed import KeyedOptimizer

from parallel.dist import all_gather_object, all_reduce, barrier, host_group
from parallel.expert.checkpoint import checkpoint_view
from parallel.expert.mesh import ExpertMesh
from parallel.parallelize import network_parameters

log = logging.getLogger("trainer.checkpoint")
MARKER = "COMPLETE"


@dataclass(kw_only=True)
class CheckpointConfig:
    """`trainer.checkpoint` config.

    Attributes:
        every: write a checkpoint every N steps (0 = only at the end, if `at_end`).
        at_end: write one after the last step.
        keep_last: number of complete checkpoints kept (older ones are deleted).
    """

    every: int = 0
    at_end: bool = True
    keep_last: int = 2


@dataclass
class TrainState:
    """Everything a checkpoint restores. Tensor state is read and written in place."""

    model: nn.Module
    sparse_optim: KeyedOptimizer
    network_optim: Any  # KeyedOptimizer, or ZeroNetworkOptimizer (same state_dict layout)
    table_optim: KeyedOptimizer | None
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: Any  # TrainLoader (state_dict / load_state_dict)
    expert_mesh: ExpertMesh | None = None
    selection: Any = None  # ModelSelector (state_dict / load_state_dict), or None
    ema: Any = None  # trainer.ema.WeightAverage, or None
    step: int = 0
    skipped_steps: int = 0
    stopped_early: bool = False

    def tensor_state(self, *, ema: bool = True) -> dict[str, Any]:
        state: dict[str, Any] = {
            "model": self.model.state_dict(),
            "optim/sparse": self.sparse_optim.state_dict(),
            "optim/dense": self.network_optim.state_dict(),
        }
        if self.table_optim is not None:
            state["optim/tables"] = self.table_optim.state_dict()
        if self.ema is not None and ema:
            state["ema"] = self.ema.tensors()
        # sharded experts: global-shape DTensor views, so ep / world size can change
        return checkpoint_view(state, self.expert_mesh, model=self.model)


def _rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_finite(module: nn.Module) -> bool:
    ok = torch.tensor([1.0])
    for value in module.state_dict().values():
        tensors = [s.tensor for s in value.local_shards()] if hasattr(value, "local_shards") else [value]
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                ok.zero_()
    all_reduce(ok, "min")
    return bool(ok.item() == 1.0)


def _dcp_group() -> dist.ProcessGroup | None:
    """DCP exchanges only plans and metadata (objects): the host group carries them."""
    return host_group() if dist.is_initialized() else None


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def best_dir(root: Path, step: int) -> Path:
    return root / f"best_step_{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first; warns about partial ones."""
    if not root.exists():
        return []
    done, partial = [], []
    for d in sorted(root.glob("step_*")):
        (done if (d / MARKER).exists() else partial).append(d)
    for d in partial:
        log.warning("ignoring incomplete checkpoint %s (no %s marker)", d, MARKER)
    return done


def save(state: TrainState, root: Path, *, keep_last: int, best: bool = False) -> Path | None:
    """Write a checkpoint of `state` (collective). Returns its folder, or None if skipped.

    `best=True` writes the model-selection checkpoint `best_step_<N>` instead (same
    layout and marker) and, once it is complete, deletes the previous best ones;
    `keep_last` applies to the periodic `step_<N>` ones only.
    """
    rank, world = _world()
    if not _all_finite(state.model):
        log.error("step %d: non-finite weights, checkpoint not written", state.step)
        return None
    path = best_dir(root, state.step) if best else step_dir(root, state.step)
    if rank == 0 and path.exists():
        shutil.rmtree(path)  # a stale partial write of the same step
    barrier()
    rngs = all_gather_object(_rng_state())
    meta = {
        "step": state.step,
        "skipped_steps": state.skipped_steps,
        "scheduler": state.scheduler.state_dict(),
        "loader": all_gather_object(state.loader.state_dict()),  # per rank (streaming positions differ)
        "world_size": world,
        "rng": rngs,
        "selection": None if state.selection is None else state.selection.state_dict(),
        "stopped_early": state.stopped_early,
        "ema_updates": None if state.ema is None else state.ema.num_updates,
    }
    dcp.save(state.tensor_state(), checkpoint_id=str(path), process_group=_dcp_group())
    barrier()  # every rank's shards are on disk
    if rank == 0:
        (path / "meta.pkl").write_bytes(pickle.dumps(meta))
        (path / MARKER).write_text(f"step {state.step}\n")
        if best:
            stale = [d for d in root.glob("best_step_*") if d != path]
        else:
            stale = complete_checkpoints(root)[:-keep_last] if keep_last > 0 else []
        for old in stale:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return path


def resolve(resume: str | None, root: Path) -> Path | None:
    """`trainer.resume`: None/"" = fresh start, "auto" = newest complete under `root`
    (fresh start if there is none), else an explicit checkpoint folder."""
    if not resume:
        return None
    if resume == "auto":
        done = complete_checkpoints(root)
        return done[-1] if done else None
    path = Path(resume)
    if not (path / MARKER).exists():
        raise ValueError(f"trainer.resume={resume!r} is not a complete checkpoint folder (no {MARKER} marker)")
    return path


def resolve_checkpoint(choice: str, run_dir: Path) -> Path:
    """The checkpoint folder meant by `checkpoint=`: best | last | a folder.

    `best` is the model whose test metrics `summary.json` reports (`best_step`): its
    `best_step_<N>` folder, or `step_<N>` when model selection was off (the last step is
    reported); without a summary (a run still training), the newest best so far.
    `last` is the newest complete periodic checkpoint.
    """
    root = run_dir / "checkpoints"
    if choice == "last":
        done = complete_checkpoints(root)
        if not done:
            raise ValueError(f"checkpoint=last: no complete checkpoint under {root}")
        return done[-1]
    if choice != "best":
        path = Path(choice)
        if not (path / MARKER).exists():
            raise ValueError(f"checkpoint={choice!r} is not a complete checkpoint folder (no {MARKER} marker)")
        return path
    summary = run_dir / "summary.json"
    if summary.is_file():
        step = json.loads(summary.read_text()).get("best_step")
        if step is not None:
            for path in (best_dir(root, int(step)), step_dir(root, int(step))):
                if (path / MARKER).exists():
                    return path
            raise ValueError(
                f"checkpoint=best: the reported step {step} (summary.json best_step) has no complete checkpoint "
                f"under {root}; use checkpoint=last or a checkpoint folder"
            )
    best = [d for d in sorted(root.glob("best_step_*")) if (d / MARKER).exists()]
    if not best:
        raise ValueError(f"checkpoint=best: {run_dir} has no summary.json best_step and no best checkpoint; "
                         "use checkpoint=last or a checkpoint folder")  # fmt: skip
    log.warning("no summary.json in %s (still training?): using the best checkpoint so far, %s", run_dir, best[-1])
    return best[-1]


def checkpoint_step(path: Path) -> int:
    return int(pickle.loads((path / "meta.pkl").read_bytes())["step"])


def _local_tensors(tree: Any) -> Any:
    """`tree` with every DTensor replaced by its local tensor (which shares its storage)."""
    if isinstance(tree, dict):
        return {k: _local_tensors(v) for k, v in tree.items()}
    return tree.to_local() if isinstance(tree, DTensor) else tree


def _fit_groups(scheduler_state: dict[str, Any], num_groups: int) -> dict[str, Any]:
    """The scheduler state for `num_groups` parameter groups. The network optimizer's parameter groups
    share one lr; their number depends on the engine and `ep` (DeepSpeed keeps experts
    in a group of their own), so a checkpoint may come from a run with another count."""
    out = dict(scheduler_state)
    for key in ("base_lrs", "_last_lr"):
        values = out.get(key)
        if values is not None and len(values) != num_groups:
            if len(set(values)) != 1:
                raise ValueError(f"cannot map the scheduler's per-group {key} {values} onto {num_groups} groups")
            out[key] = [values[0]] * num_groups
    return out


def holds_average(path: Path) -> bool:
    """Whether the checkpoint at `path` holds a moving average of the weights (`ema`)."""
    keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return any(key.startswith("ema.") for key in keys)


def load_model(state: TrainState, path: Path) -> None:
    """Load the evaluated model of the checkpoint at `path` into `state.model`
    (collective; e.g. the best step's model for the final test evaluation): its weights
    and, if it holds one, the moving average over the network weights (`trainer/ema.py`)."""
    if not (path / MARKER).exists():
        raise ValueError(f"{path} is not a complete checkpoint folder (no {MARKER} marker)")
    tensors = checkpoint_view({"model": state.model.state_dict()}, state.expert_mesh, model=state.model)
    dcp.load(tensors, checkpoint_id=str(path), process_group=_dcp_group())
    sharded_experts = state.expert_mesh is not None and state.expert_mesh.ep > 1
    state.model.load_state_dict(state.model.state_dict() if sharded_experts else tensors["model"])
    if holds_average(path):  # into the parameters in place (expert slices through their DTensor views)
        network = {name: p.detach() for name, p in network_parameters(state.model)}
        dcp.load(checkpoint_view({"ema": network}, state.expert_mesh, model=state.model), checkpoint_id=str(path),
                 process_group=_dcp_group())  # fmt: skip


def _load_loader(loader: Any, saved: Any, *, saved_world: int, rank: int, world: int) -> None:
    """Each rank its own loader state at the same world size; all of them otherwise."""
    states = [saved] * saved_world if isinstance(saved, dict) else saved  # older checkpoints: one global state
    if saved_world == world:
        loader.load_state_dict(states[rank])
    else:
        loader.load_resharded(states)


def load(state: TrainState, path: Path) -> None:
    """Restore `state` in place from the checkpoint at `path` (collective)."""
    rank, world = _world()
    # lazily created optimizer state must exist before it can be loaded into in place
    state.network_optim.init_state()
    if state.table_optim is not None:
        state.table_optim.init_state()
    saved_average = state.ema is not None and holds_average(path)
    tensors = state.tensor_state(ema=saved_average)
    dcp.load(tensors, checkpoint_id=str(path), process_group=_dcp_group())
    # expert DTensor views were loaded in place; the plain state dict holds their slices
    sharded_experts = state.expert_mesh is not None and state.expert_mesh.ep > 1
    plain = {**tensors, "model": state.model.state_dict()} if sharded_experts else tensors
    state.model.load_state_dict(plain["model"])
    state.sparse_optim.load_state_dict(tensors["optim/sparse"])
    # the views' local tensors already hold the loaded values (re-reading the optimizer's
    # state instead would re-gather a DeepSpeed optimizer's old state over them)
    network = _local_tensors(tensors["optim/dense"]) if sharded_experts else tensors["optim/dense"]
    state.network_optim.load_state_dict(network)  # after the model: DeepSpeed refreshes its fp32 weights from it
    if state.table_optim is not None:
        state.table_optim.load_state_dict(tensors["optim/tables"])
    meta = pickle.loads((path / "meta.pkl").read_bytes())
    state.step = int(meta["step"])
    state.skipped_steps = int(meta["skipped_steps"])
    state.stopped_early = bool(meta.get("stopped_early", False))
    if state.ema is not None and saved_average:
        state.ema.num_updates = int(meta["ema_updates"])
    elif state.ema is not None:  # trainer.ema turned on for a run whose checkpoint has no average
        state.ema.reset()
        log.warning("%s holds no moving average of the weights: trainer.ema starts from its weights", path)
    if state.selection is not None and meta.get("selection") is not None:
        state.selection.load_state_dict(meta["selection"])
    state.scheduler.load_state_dict(_fit_groups(meta["scheduler"], len(state.scheduler.optimizer.param_groups)))
    # LambdaLR.load_state_dict restores its counters but not the optimizer's current lr:
    # without this the first resumed step would run at the lr of step 0 (warmup, cosine)
    for group, lr in zip(state.scheduler.optimizer.param_groups, state.scheduler.get_last_lr(), strict=True):
        group["lr"] = lr
    _load_loader(state.loader, meta["loader"], saved_world=meta["world_size"], rank=rank, world=world)
    if meta["world_size"] == world:
        _set_rng_state(meta["rng"][rank])
    else:  # resharded: RNG streams cannot map one to one; reseed deterministically
        torch.manual_seed(1_000_003 * state.step + rank)
        np.random.seed((1_000_003 * state.step + rank) % 2**32)
    log.info("resumed from %s (step %d, written by %d ranks)", path, state.step, meta["world_size"])
