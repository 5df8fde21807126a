"""Typed run configuration, built from the Hydra config and validated before any work.

Hydra composes `conf/` into a plain `DictConfig`; `build_run_config` turns each section
into its dataclass (the data source and the core pick theirs by `name`), so that a typo
or a wrong type fails here, naming the key, before any process group or data work
starts. Model-level fields shared by every core (`embedding_dim`, `tower`) live beside
the core's own fields in the `model` group, so users write `model.num_experts=16`.

Renamed keys (issue 22, `RENAMED_KEYS`): for one release the old keys stay in `conf/` as
null placeholders (Hydra's struct mode would otherwise reject them before this code
runs), and setting one fails here with a message that names the new key. Saved run
configs (`RUN/config.yaml`, `.hydra/config.yaml`) written before the rename still load:
every reader of a saved config goes through `load_saved_config`, which moves the old
keys to the new ones (`migrate_saved_config`).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data.build import SOURCES, declared_names, task_names
from data.parsing.bad_rows import check_policy
from model.build import CORES, TowerConfig
from model.smes import SMESConfig, auto_num_experts, validate_smes_config
from parallel.deepspeed_engine import DeepSpeedConfig, check_engine
from parallel.embedding_sharding import SHARDING_TYPES, SPARSE_OPTIMIZERS
from parallel.expert.mesh import check_ep
from parallel.parallelize import ParallelConfig
from trainer.checkpoint import CheckpointConfig
from trainer.ema import EMAConfig
from trainer.ema import check_config as check_ema
from trainer.evaluation.metrics import check_mode
from trainer.selection import EarlyStoppingConfig, check_config

NETWORK_OPTIMIZERS = ("adam", "adamw", "adagrad", "sgd")
PIPELINES = ("sparse_dist", "none")
PRECISIONS = ("fp32", "bf16")
LR_SCHEDULES = ("constant", "cosine")
INIT_VOCAB = ("extend", "rebuild")
# Config keys renamed in issue 22 (old -> new), and the renamed value of model.routing.
# The old keys are null placeholders in conf/ for one release (removed in the next).
RENAMED_KEYS = {
    "model.num_shared": "model.shared_top_k",
    "model.num_adaptive": "model.adaptive_top_k",
    "model.task_weights": "model.selection_weights",
    "parallel.capacity_factor": "model.capacity_factor",
}
RENAMED_ROUTING = {"dense": "all"}


@dataclass(kw_only=True)
class TrainerConfig:
    """`trainer` config group.

    Attributes:
        steps: optimizer steps.
        batch_size: global batch size (split evenly over ranks; must be divisible by
            the world size), so results do not depend on the number of processes.
        eval_batch_size: per-rank evaluation batch size.
        eval_every: evaluate on the validation split every N steps (0 = only at the end);
            each evaluation is a candidate for model selection.
        early_stopping: which validation metric selects the reported model, and when to
            stop (`metric`, `mode`, `patience`, `min_delta`; see `trainer/selection.py`).
        ema: `decay` of an exponential moving average of the network weights, which is
            then the evaluated, selected, reported and exported model (0 = off; see
            `trainer/ema.py`).
        eval_mode: exact (every rank gathers all rows: O(N) memory per rank) |
            distributed (distributed sort, O(N / W) per rank) | auto (distributed above
            2M evaluation rows on more than one rank). See `trainer/evaluation/metrics.py`.
        log_every: log training metrics every N steps.
        seed: seed of model init and data order.
        device: auto | cpu | cuda.
        optimizer, lr, weight_decay: network optimizer (the network parameters:
            everything but the embedding tables, experts included).
        lr_schedule: constant | cosine (to 10% of lr), after `warmup_steps` linear warmup.
        grad_clip: clip the network gradient norm (0 = off).
        router_lr_scale: learning-rate multiplier of the SMES routers' parameters
            (`model.moe.router.Router` modules; default 1). Native engine only.
        task_weights: task -> loss weight (default 1 for every task); not the SMES
            Stage I selection weights (`model.selection_weights`).
        prefetch: batches built ahead by the loader thread.
        max_bad_steps: abort after this many consecutive non-finite losses.
        progress: show a progress bar on rank 0.
        resume: "auto" = continue from the newest complete checkpoint in the run
            directory if there is one (so a restarted job picks up where it died), a
            checkpoint folder, or null to always start fresh.
        checkpoint: when checkpoints are written and how many are kept.
        init_from: start from another run's model: its run directory (the reported
            model) or a checkpoint folder; embedding rows carried by id, a larger SMES
            pool upcycled, an MMoE core converted (`trainer/warm_start.py`). With
            `steps=0` the loaded model is only evaluated. None = random initialisation.
        init_from_optimizer: with `init_from`, also carry the optimizer states.
        init_vocab: with `init_from`: `extend` the source's vocabularies (every id it
            knew keeps its row) or `rebuild` them from this run's train rows.
        upcycle_noise: relative std of the perturbation of upcycled expert copies.
        engine: native (DDP + the torch network optimizer) | deepspeed (a DeepSpeed
            engine with ZeRO trains the network parameters, experts included; the embedding
            tables stay TorchRec's). See `parallel/deepspeed_engine.py`.
        deepspeed: DeepSpeed settings (`zero_stage`, `bf16`), used with engine=deepspeed.
        pipeline: sparse_dist (TorchRec's TrainPipelineSparseDist: the embedding input
            distribution and host-to-device copy of the next batches overlap the
            current step) | none (in line). See `trainer/pipeline.py`.
        precision: fp32 | bf16 (bf16 autocast for the core and towers; fp32 master
            weights and optimizer state; embedding tables keep their TorchRec dtype).
    """

    steps: int = 1500
    batch_size: int = 1024
    eval_batch_size: int = 8192
    eval_every: int = 250
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    eval_mode: str = "auto"
    log_every: int = 50
    seed: int = 2026
    device: str = "auto"
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    grad_clip: float = 0.0
    router_lr_scale: float = 1.0
    task_weights: dict[str, float] = field(default_factory=dict)
    prefetch: int = 4
    max_bad_steps: int = 10
    progress: bool = True
    resume: str | None = "auto"
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    init_from: str | None = None
    init_from_optimizer: bool = False
    init_vocab: str = "extend"
    upcycle_noise: float = 0.01
    engine: str = "native"
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    pipeline: str = "sparse_dist"
    precision: str = "fp32"


@dataclass(kw_only=True)
class LoggerConfig:
    """`logger` config group: `wandb` (offline by default) or `none`.

    Metrics always also go to `metrics.jsonl` in the run directory.
    """

    name: str = "wandb"
    project: str = "smes-rec"
    entity: str | None = None
    mode: str = "offline"
    group: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class ModelConfig:
    """The model: shared fields plus the selected core's config (`core`)."""

    name: str
    embedding_dim: int
    tower: TowerConfig
    core: Any


@dataclass(kw_only=True)
class RunConfig:
    data: Any
    model: ModelConfig
    parallel: ParallelConfig
    trainer: TrainerConfig
    logger: LoggerConfig
    experiment: str | None = None


def _structured(cls: type, node: Any, key: str) -> Any:
    """`node` merged into dataclass `cls`; unknown keys or bad types -> ValueError naming them."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), node)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        full_key = f"{key}.{e.full_key}" if getattr(e, "full_key", None) else key
        raise ValueError(f"invalid config at {full_key}: {e.msg if hasattr(e, 'msg') else e}") from None


def _by_name(registry: dict[str, tuple[type, Any]], node: Any, key: str, drop: tuple[str, ...] = ()) -> Any:
    name = node.get("name") if node is not None else None
    if name not in registry:
        raise ValueError(f"{key}.name={name!r} is unknown; choose one of {sorted(registry)}")
    section = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k not in drop}  # type: ignore[union-attr]
    return _structured(registry[name][0], section, key)


def _override(value: Any) -> str:
    """`value` as a command-line override value (lists without spaces)."""
    if isinstance(value, ListConfig | list | tuple):
        return "[" + ",".join(_override(v) for v in value) + "]"
    return str(value)


def _renamed(cfg: DictConfig, *, saved: bool) -> DictConfig:
    """A copy of `cfg` without the renamed keys of `RENAMED_KEYS` (issue 22).

    Null old keys (the placeholders in conf/) are dropped. A non-null one, or
    `model.routing=dense`: with `saved` its value moves to the new key, else it is an
    error naming the new key.
    """
    out = copy.deepcopy(cfg)
    OmegaConf.set_struct(out, False)
    OmegaConf.set_readonly(out, False)
    for old, new in RENAMED_KEYS.items():
        section, _, key = old.rpartition(".")
        node = OmegaConf.select(out, section)
        if not isinstance(node, DictConfig) or key not in node:
            continue
        value = node[key]
        del node[key]
        if value is None:
            continue
        if not saved:
            raise ValueError(f"{old} was renamed {new} (issue 22); use {new}={_override(value)}")
        OmegaConf.update(out, new, value, force_add=True)
    routing = OmegaConf.select(out, "model.routing")
    if routing in RENAMED_ROUTING:
        new_routing = RENAMED_ROUTING[routing]
        if not saved:
            raise ValueError(
                f"model.routing={routing} was renamed model.routing={new_routing} (issue 22); "
                f"use model.routing={new_routing}"
            )
        out.model.routing = new_routing
    return out


def reject_renamed_keys(cfg: DictConfig) -> DictConfig:
    """`cfg` without the null placeholders of renamed keys; ValueError naming the new
    key if an old one is set (`RENAMED_KEYS`, or `model.routing=dense`)."""
    return _renamed(cfg, saved=False)


def migrate_saved_config(cfg: DictConfig) -> DictConfig:
    """A saved run config with the keys renamed in issue 22 moved to their new names
    (`model.num_shared` -> `model.shared_top_k`, ..., `model.routing: dense` -> `all`;
    `RENAMED_KEYS`) and the null placeholders dropped; a copy, valid for
    `build_run_config`. Configs written after the rename pass through unchanged."""
    return _renamed(cfg, saved=True)


def load_saved_config(path: str | Path) -> DictConfig:
    """A run's saved config (`RUN/config.yaml` or `RUN/.hydra/config.yaml`), migrated
    (`migrate_saved_config`): what every reader of a finished run's config uses."""
    node = OmegaConf.load(path)
    if not isinstance(node, DictConfig):
        raise ValueError(f"{path}: not a run config (a mapping expected)")
    return migrate_saved_config(node)


def resolve_num_experts(cfg: DictConfig) -> DictConfig:
    """`cfg` with `model.num_experts=auto` (the SMES default) replaced by its pool size,
    `model.smes.auto_num_experts` of the run's K_s, K_a, routing, `parallel.ep` and task
    count; `cfg` itself when there is nothing to resolve (a copy otherwise).

    The task count is the data's (`data.build.task_names`: from the config, or for
    `data=kuairand` with `data.tasks=null` from the log files' headers). Training saves
    the resolved config (`RUN/config.yaml`), so every reader of a run (predict, export,
    warm start, the benchmarks) sees the pool it trained.
    """
    model = cfg.get("model")
    if model is None or model.get("name") != "smes" or model.get("num_experts") != "auto":
        return cfg
    if cfg.get("data") is None:
        raise ValueError("config lacks the `data` section (model.num_experts=auto needs the task count)")
    tasks = task_names(_by_name(SOURCES, cfg.data, "data"))
    defaults = SMESConfig()

    def _int(key: str, default: int) -> int:
        value = model.get(key, default)
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"model.{key} must be an integer, got {value!r}") from None

    ep = cfg.get("parallel", {}).get("ep", 1)
    num = auto_num_experts(
        shared_top_k=_int("shared_top_k", defaults.shared_top_k),
        adaptive_top_k=_int("adaptive_top_k", defaults.adaptive_top_k),
        num_tasks=len(tasks),
        routing=str(model.get("routing", defaults.routing)),
        multiple_of=int(ep) if isinstance(ep, int) and ep > 0 else 1,
    )
    out = copy.deepcopy(cfg)
    out.model.num_experts = num
    return out


def saved_config_yaml(cfg: DictConfig) -> str:
    """What training saves as `RUN/config.yaml`: the composed config, interpolations and
    `model.num_experts=auto` resolved."""
    return OmegaConf.to_yaml(resolve_num_experts(cfg), resolve=True)


def build_run_config(cfg: DictConfig, *, world_size: int | None = None) -> RunConfig:
    """Validate the composed Hydra config into a `RunConfig` (raises ValueError).

    A renamed key (`RENAMED_KEYS`) fails first, naming its new key; a saved config of an
    older run must go through `migrate_saved_config` (`load_saved_config`) first.
    `model.num_experts=auto` is resolved here (`resolve_num_experts`).

    `world_size`: the job's ranks (default: torchrun's `WORLD_SIZE`, else 1).
    """
    cfg = resolve_num_experts(reject_renamed_keys(cfg))
    for key in ("data", "model", "parallel", "trainer", "logger"):
        if key not in cfg or cfg[key] is None:
            raise ValueError(f"config lacks the `{key}` section")
    model_node = cfg.model
    core = _by_name(CORES, model_node, "model", drop=("embedding_dim", "tower"))
    model = ModelConfig(
        name=core.name,
        embedding_dim=int(model_node.get("embedding_dim", 16)),
        tower=_structured(TowerConfig, model_node.get("tower", {}), "model.tower"),
        core=core,
    )
    run = RunConfig(
        data=_by_name(SOURCES, cfg.data, "data"),
        model=model,
        parallel=_structured(ParallelConfig, cfg.parallel, "parallel"),
        trainer=_structured(TrainerConfig, cfg.trainer, "trainer"),
        logger=_structured(LoggerConfig, cfg.logger, "logger"),
        experiment=cfg.get("experiment_name"),
    )
    validate(run, world_size=world_size)
    return run


def validate(run: RunConfig, *, world_size: int | None = None) -> None:
    """Checks that need no data or process group."""
    t = run.trainer
    if t.steps < (0 if t.init_from else 1):
        raise ValueError(
            f"trainer.steps must be >= 1 (or 0 with trainer.init_from: evaluate the loaded model), got {t.steps}"
        )
    if t.init_from_optimizer and not t.init_from:
        raise ValueError("trainer.init_from_optimizer=true needs trainer.init_from (the run to start from)")
    if t.init_vocab not in INIT_VOCAB:
        raise ValueError(f"trainer.init_vocab={t.init_vocab!r}; choose one of {INIT_VOCAB}")
    if t.upcycle_noise < 0:
        raise ValueError(f"trainer.upcycle_noise must be >= 0, got {t.upcycle_noise}")
    if t.batch_size < 1 or t.eval_batch_size < 1:
        raise ValueError("trainer.batch_size and trainer.eval_batch_size must be >= 1")
    if t.optimizer not in NETWORK_OPTIMIZERS:
        raise ValueError(f"trainer.optimizer={t.optimizer!r}; choose one of {NETWORK_OPTIMIZERS}")
    if t.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"trainer.lr_schedule={t.lr_schedule!r}; choose one of {LR_SCHEDULES}")
    if t.lr <= 0:
        raise ValueError(f"trainer.lr must be > 0, got {t.lr}")
    if t.router_lr_scale <= 0:
        raise ValueError(f"trainer.router_lr_scale must be > 0, got {t.router_lr_scale}")
    if t.router_lr_scale != 1.0 and t.engine == "deepspeed":
        raise ValueError(
            "trainer.router_lr_scale applies to trainer.engine=native only (DeepSpeed builds its own parameter "
            "groups); set trainer.router_lr_scale=1 or trainer.engine=native"
        )
    if t.checkpoint.every < 0 or t.checkpoint.keep_last < 1:
        raise ValueError("trainer.checkpoint.every must be >= 0 and trainer.checkpoint.keep_last >= 1")
    if t.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"trainer.device must be auto, cpu or cuda, got {t.device!r}")
    check_mode(t.eval_mode)
    check_engine(t.engine, t.deepspeed, device=t.device, optimizer=t.optimizer)
    if t.eval_every < 0:
        raise ValueError(f"trainer.eval_every must be >= 0, got {t.eval_every}")
    check_config(t.early_stopping)
    check_ema(t.ema)
    if t.pipeline not in PIPELINES:
        raise ValueError(f"trainer.pipeline={t.pipeline!r}; choose one of {PIPELINES}")
    if t.precision not in PRECISIONS:
        raise ValueError(f"trainer.precision={t.precision!r}; choose one of {PRECISIONS}")
    if t.precision == "bf16" and t.engine == "deepspeed" and t.deepspeed.bf16:
        raise ValueError(
            "trainer.precision=bf16 and trainer.deepspeed.bf16=true both ask for bf16: the first autocasts "
            "with fp32 weights, the second keeps DeepSpeed's weights in bf16; set one of them"
        )
    if run.model.embedding_dim < 1:
        raise ValueError(f"model.embedding_dim must be >= 1, got {run.model.embedding_dim}")
    emb = run.parallel.embedding
    if emb.sharding_type is not None and emb.sharding_type not in SHARDING_TYPES:
        raise ValueError(
            f"parallel.embedding.sharding_type={emb.sharding_type!r}; choose one of {sorted(SHARDING_TYPES)}"
        )
    if t.engine == "deepspeed" and "data_parallel" in (emb.sharding_type, *emb.tables.values()):
        raise ValueError(
            "parallel.embedding: data_parallel tables are not supported with trainer.engine=deepspeed "
            "(their gradients would need DDP); choose another sharding type"
        )
    if run.parallel.sparse_optimizer.name not in SPARSE_OPTIMIZERS:
        raise ValueError(
            f"parallel.sparse_optimizer.name={run.parallel.sparse_optimizer.name!r}; "
            f"choose one of {sorted(SPARSE_OPTIMIZERS)}"
        )
    # the world size is known from torchrun's environment (or given: trainer.estimate)
    world = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if t.batch_size % world:
        raise ValueError(f"trainer.batch_size={t.batch_size} must be divisible by the world size {world}")
    check_ep(run.parallel.ep, world, getattr(run.model.core, "num_experts", None))
    if run.parallel.ep > 1 and run.model.name != "smes":
        raise ValueError(f"parallel.ep={run.parallel.ep} needs model=smes (got model={run.model.name})")
    # names the data config declares (a superset for KuaiRand, whose defaults depend on
    # the files' columns; exact names are checked again after loading)
    if hasattr(run.data, "on_bad_row"):
        check_policy(run.data.on_bad_row)
    tasks, features = declared_names(run.data)
    check_names(run, tasks=tasks, features=features)
    if isinstance(run.model.core, SMESConfig):
        exact = run.data.name != "kuairand" or run.data.tasks is not None
        weights = run.model.core.selection_weights
        num_tasks = len(tasks) if exact else len(weights) if weights is not None else 1
        validate_smes_config(run.model.core, num_tasks=num_tasks)
    if run.logger.name not in ("wandb", "none"):
        raise ValueError(f"logger.name={run.logger.name!r}; choose wandb or none")
    if run.logger.mode not in ("offline", "online", "disabled"):
        raise ValueError(f"logger.mode={run.logger.mode!r}; choose offline, online or disabled")


def check_names(run: RunConfig, *, tasks: tuple[str, ...], features: tuple[str, ...]) -> None:
    """Task and feature names used in the config must exist in the data."""
    t = run.trainer
    unknown = set(t.task_weights) - set(tasks)
    if unknown:
        raise ValueError(f"trainer.task_weights names unknown tasks {sorted(unknown)}; tasks: {list(tasks)}")
    check_config(t.early_stopping, tasks=tasks)
    unknown = set(run.parallel.embedding.tables) - set(features)
    if unknown:
        raise ValueError(
            f"parallel.embedding.tables names unknown features {sorted(unknown)}; features: {list(features)}"
        )


def validate_against_data(run: RunConfig, *, tasks: tuple[str, ...], features: tuple[str, ...], world: int) -> None:
    """Checks that need the loaded dataset's exact schema and the world size."""
    if run.trainer.batch_size % world:
        raise ValueError(f"trainer.batch_size={run.trainer.batch_size} must be divisible by the world size {world}")
    check_names(run, tasks=tasks, features=features)
    if isinstance(run.model.core, SMESConfig):
        validate_smes_config(run.model.core, num_tasks=len(tasks))


def to_plain(obj: Any) -> Any:
    """Dataclasses -> dicts (for the summary and the logger)."""
    if hasattr(obj, "__dataclass_fields__"):
        return {f.name: to_plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_plain(v) for v in obj]
    return obj
