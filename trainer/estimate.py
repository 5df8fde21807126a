"""Per-GPU memory before launch: `python -m trainer.estimate <training overrides> estimate.*`.

    python -m trainer.estimate experiment=census_smes estimate.world_size=2 estimate.out=est.json
    python -m trainer.estimate experiment=kuairand_smes model.num_experts=256 parallel.ep=8 \\
        trainer.batch_size=65536 trainer.precision=bf16 estimate.world_size=64 estimate.gpu_memory_gb=80

Takes the same overrides as training (the recipe, model, data, parallel and trainer
keys) plus `estimate.*` (`conf/estimate.yaml`), builds nothing on a device, and writes
JSON with the largest rank's bytes per part, `per_gpu_bytes` = {`embeddings`,
`non_expert_params`, `expert_params`, `grads`, `optimizer`, `weight_average`, `activations`,
`dispatch_buffers`, `reserved`, `total`}, every rank's parts (`per_rank`),
`a2a_bytes_per_step` (and its parts) and `fits` (total <= `estimate.gpu_memory_gb`),
plus a table on stdout. Like torchtitan's estimator and TorchRec's planner statistics:

- embeddings: TorchRec's planner (the run's constraints and sharder) on a topology of
  `world_size` ranks of `gpu_memory_gb` on hosts of `gpus_per_node`; every shard it
  places on a rank counts its rows x columns (fp32 tables) plus the fused optimizer's
  state for them (adagrad: one value per element, rowwise_adagrad: one per row, adam:
  two per element, sgd: none). `estimate.device=cpu` plans for the CPU instead (the
  plan a CPU run builds, which the tests compare against).
- parameters: the core and towers are replicated (`non_expert_params`); SMES experts are
  sharded over `parallel.ep` (`expert_params` = E / ep experts). Gradients: one per
  parameter in the parameter's dtype (native engine; DeepSpeed ZeRO-2: partitioned
  over the ranks that hold the parameter). Optimizer: the network optimizer's states
  shaped like the parameters (adam / adamw: two, adagrad: one, sgd: none; the step
  counters live on the host), partitioned by ZeRO stage 1 and 2 (plus ZeRO's float32
  partition of the weights). `weight_average`: the `trainer.ema` copy (float32).
- activations: the peak of one training step's network part (core, towers, loss,
  backward) at the per-rank batch, traced with fake tensors (`FakeTensorMode`, nothing
  allocated) under `torch.distributed._tools.mem_tracker.MemTracker`, under the run's
  precision: the largest live memory during the step minus the parameters and the
  gradients alive at that moment. It includes the core input (the pooled embeddings
  and dense features) and its gradient; TorchRec's own lookup buffers are not traced.
  The SMES pair count is the static bound `B * max|U|` (worst case) or
  `B * estimate.mean_active`. Under expert parallelism the received rows and the
  outputs sent back are added (`dispatch_buffers`, rows balanced over the ep ranks).
- `a2a_bytes_per_step`: what one rank sends in the all-to-alls of one step: the SMES
  dispatch (remote pairs times (D + H + H + D) elements in the compute dtype, pairs
  spread evenly over the ep ranks) and the pooled embeddings of model-parallel tables
  (each rank's pooled rows for the other ranks' instances, forward and backward;
  the id lists of the input distribution are not counted).
- `reserved`: `estimate.reserved_gb` for the CUDA context, NCCL and the caching
  allocator's fragmentation.

Legend: B per-rank batch, D core input width, E experts, H expert width, W world size.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from data.build import build_dataset
from model.build import MultiTaskModel, table_name
from model.moe.grouped import any_dtype_kernel_meta
from model.moe.router import PlanSizes
from model.smes import SMES
from parallel.embedding_sharding import RecEBCSharder, build_constraints, describe_plan, quiet_torchrec
from parallel.parallelize import table_specs
from trainer.config import RunConfig, build_run_config, reject_renamed_keys, validate_against_data
from trainer.loss import total_loss

GIB = 2**30
PARTS = (
    "embeddings", "non_expert_params", "expert_params", "grads", "optimizer", "weight_average", "activations",
    "dispatch_buffers", "reserved",
)  # fmt: skip
OPTIMIZER_STATES = {"adam": 2, "adamw": 2, "adagrad": 1, "sgd": 0}


@dataclass(kw_only=True)
class EstimateConfig:
    """`estimate.*`, see the module doc.

    Attributes:
        world_size: W, the ranks (GPUs) of the job.
        gpus_per_node: ranks per host (the planner's local world size).
        gpu_memory_gb: memory of one GPU, GiB.
        device: cuda (plan and dtypes of a GPU run) or cpu (the plan a CPU run builds).
        mean_active: mean distinct experts per instance for the SMES pair count; None
            = the static bound max|U| (worst case).
        reserved_gb: CUDA context, NCCL and allocator headroom per GPU, GiB.
        out: JSON file to write (None: stdout only).
    """

    world_size: int = 1
    gpus_per_node: int = 8
    gpu_memory_gb: float = 80.0
    device: str = "cuda"
    mean_active: float | None = None
    reserved_gb: float = 1.5
    out: str | None = None


def check_estimate(cfg: EstimateConfig, run: RunConfig) -> None:
    """ValueError naming the key."""
    if cfg.world_size < 1 or cfg.gpus_per_node < 1:
        raise ValueError("estimate.world_size and estimate.gpus_per_node must be >= 1")
    if cfg.gpu_memory_gb <= 0 or cfg.reserved_gb < 0:
        raise ValueError("estimate.gpu_memory_gb must be > 0 and estimate.reserved_gb >= 0")
    if cfg.device not in ("cuda", "cpu"):
        raise ValueError(f"estimate.device must be cuda or cpu, got {cfg.device!r}")
    if cfg.world_size % run.parallel.ep:
        raise ValueError(f"parallel.ep={run.parallel.ep} must divide estimate.world_size={cfg.world_size}")
    if run.trainer.batch_size % cfg.world_size:
        raise ValueError(
            f"trainer.batch_size={run.trainer.batch_size} must be divisible by estimate.world_size={cfg.world_size}"
        )


# -- embeddings --------------------------------------------------------------------

TABLE_STATES = {"adagrad": ("element", 1), "rowwise_adagrad": ("row", 1), "adam": ("element", 2), "sgd": ("row", 0)}


def embedding_bytes(model: MultiTaskModel, run: RunConfig, cfg: EstimateConfig) -> tuple[list[int], dict[str, str]]:
    """Bytes of embedding shards and their fused optimizer state on each rank, and the plan."""
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology

    W = cfg.world_size
    features = {f: table_name(f) for f in model.spec.sparse_names}
    constraints = build_constraints(
        run.parallel.embedding, feature_to_table=features, embedding_dim=model.embedding_dim
    )
    kind, states = TABLE_STATES[run.parallel.sparse_optimizer.name]
    with quiet_torchrec():
        caps = {"hbm_cap": int(cfg.gpu_memory_gb * GIB)} if cfg.device == "cuda" else {}
        topology = Topology(world_size=W, compute_device=cfg.device, local_world_size=min(W, cfg.gpus_per_node), **caps)
        planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
        plan = planner.plan(model, [RecEBCSharder()])  # type: ignore[list-item]
    per_rank = [0] * W
    shapes = table_specs(model)
    for module_plan in plan.plan.values():
        for table, ps in module_plan.items():  # type: ignore[attr-defined]
            if ps.sharding_spec is None:  # data_parallel: a full replica on every rank
                rows, cols = shapes[table][:2]
                for r in range(W):
                    per_rank[r] += _shard_bytes(rows, cols, kind, states)
                continue
            for shard in ps.sharding_spec.shards:
                rank = shard.placement.rank()
                rows, cols = shard.shard_sizes
                per_rank[rank] += _shard_bytes(rows, cols, kind, states)
    return per_rank, describe_plan(plan)


def _shard_bytes(rows: int, cols: int, kind: str, states: int) -> int:
    weights = rows * cols * 4
    return weights + states * 4 * (rows * cols if kind == "element" else rows)


# -- parameters, gradients, optimizer ------------------------------------------------


def parameter_counts(model: MultiTaskModel) -> tuple[int, int]:
    """(network parameters other than the experts, all E experts' parameters); the tables
    are not network parameters."""
    experts = 0
    if isinstance(model.core, SMES):
        experts = sum(p.numel() for p in model.core.layer.experts.parameters())
    non_expert = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("ebc.")) - experts
    return non_expert, experts


def state_bytes(run: RunConfig, cfg: EstimateConfig, non_expert: int, experts: int) -> dict[str, int]:
    """Per-rank bytes of parameters, gradients, optimizer state and the weight average."""
    t, ep, W = run.trainer, run.parallel.ep, cfg.world_size
    local_experts = experts // ep
    params = non_expert + local_experts
    bf16_weights = t.engine == "deepspeed" and t.deepspeed.bf16
    weight_bytes = 2 if bf16_weights else 4
    states = OPTIMIZER_STATES[t.optimizer]
    out = {
        "non_expert_params": non_expert * weight_bytes,
        "expert_params": local_experts * weight_bytes,
        "weight_average": 4 * params if t.ema.decay > 0 else 0,
    }
    if t.engine != "deepspeed" or t.deepspeed.zero_stage == 0:
        master = 4 * params if bf16_weights else 0
        out["grads"] = weight_bytes * params
        out["optimizer"] = 4 * states * params + master
        return out
    # ZeRO: non-expert state partitioned over the W data-parallel ranks, expert state over the
    # W / ep ranks that hold the same experts; the float32 partition of the weights too
    edp = W // ep
    partition = math.ceil(non_expert / W) + math.ceil(local_experts / edp)
    out["optimizer"] = 4 * (states + 1) * partition
    out["grads"] = weight_bytes * (partition if t.deepspeed.zero_stage == 2 else params)
    return out


# -- activations -------------------------------------------------------------------


def pairs_per_instance(model: MultiTaskModel, cfg: EstimateConfig) -> float:
    """The mean |U| the estimate assumes (the bound unless given)."""
    if not isinstance(model.core, SMES):
        return 0.0
    return cfg.mean_active if cfg.mean_active is not None else float(model.core.layer.router.max_union)


def trace_activations(run: RunConfig, spec: Any, batch: int, pairs: float) -> dict[str, int]:
    """Peak activation bytes of one training step of the network at local batch `batch` (module doc)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    with FakeTensorMode(), any_dtype_kernel_meta(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = MultiTaskModel(
            spec, core_cfg=run.model.core, embedding_dim=run.model.embedding_dim, tower=run.model.tower,
            ebc_device="meta",
        )  # fmt: skip
        if isinstance(model.core, SMES):
            N = int(round(batch * pairs))
            setattr(model.core.layer.dispatcher, "plan_sizes", lambda _counts: PlanSizes(num_pairs=N))  # noqa: B010
        D = len(spec.sparse) * run.model.embedding_dim + spec.num_dense
        x_BD = torch.randn(batch, D, requires_grad=True)
        labels = {t: torch.randint(0, 2, (batch,)).float() for t in spec.tasks}
        fake_batch = SimpleNamespace(dense=x_BD, labels=labels, weights=torch.ones(batch))
        tracker = MemTracker()
        tracker.track_external(model.core, model.towers)
        with tracker:
            bf16 = run.trainer.precision == "bf16"
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = model.forward_core(x_BD)
            loss, _ = total_loss(out, fake_batch, {t: 1.0 for t in spec.tasks})  # type: ignore[arg-type]
            loss.backward()
        (snap,) = tracker.get_tracker_snapshot("peak").values()
    by = {str(k).rsplit(".", 1)[-1].lower(): int(v) for k, v in snap.items()}
    held = by.get("param", 0) + by.get("buffer", 0) + by.get("grad", 0)
    return {"activations": by["total"] - held, "traced_peak": by["total"]}


def dispatch_buffers(model: MultiTaskModel, run: RunConfig, batch: int, pairs: float) -> int:
    """Extra rows of an expert-parallel step: the received rows and the outputs sent back."""
    if run.parallel.ep == 1 or not isinstance(model.core, SMES):
        return 0
    experts = model.core.layer.experts
    width = experts.in_dim + (-experts.in_dim) % 8 + experts.out_dim
    return int(batch * pairs) * width * (2 if run.trainer.precision == "bf16" else 4)


def a2a_bytes(
    model: MultiTaskModel, run: RunConfig, cfg: EstimateConfig, plan: dict[str, str], batch: int, pairs: float
) -> dict[str, int]:
    """Bytes one rank sends in the all-to-alls of one training step (module doc)."""
    W, ep = cfg.world_size, run.parallel.ep
    el = 2 if run.trainer.precision == "bf16" else 4
    experts = 0
    if ep > 1 and isinstance(model.core, SMES):
        e = model.core.layer.experts
        remote = batch * pairs * (ep - 1) / ep
        experts = int(remote * (2 * (e.in_dim + (-e.in_dim) % 8) + 2 * e.out_dim) * el)
    model_parallel = sum(
        c.embedding_dim for c in model.ebc.embedding_bag_configs() if not plan[c.name].startswith("data_parallel")
    )
    embeddings = int(2 * batch * model_parallel * 4 * (W - 1) / W)
    return {"experts": experts, "embeddings": embeddings, "total": experts + embeddings}


# -- the estimate ------------------------------------------------------------------


def estimate(run: RunConfig, cfg: EstimateConfig) -> dict[str, Any]:
    """The estimate as a JSON-ready dict (module doc)."""
    check_estimate(cfg, run)
    dataset = build_dataset(run.data)
    spec = dataset.spec
    validate_against_data(run, tasks=spec.tasks, features=spec.sparse_names, world=cfg.world_size)
    with torch.device("meta"):
        model = MultiTaskModel(
            spec, core_cfg=run.model.core, embedding_dim=run.model.embedding_dim, tower=run.model.tower,
            ebc_device="meta",
        )  # fmt: skip
    batch = run.trainer.batch_size // cfg.world_size
    tables, plan = embedding_bytes(model, run, cfg)
    non_expert, experts = parameter_counts(model)
    states = state_bytes(run, cfg, non_expert, experts)
    pairs = pairs_per_instance(model, cfg)
    traced = trace_activations(run, spec, batch, pairs)
    fixed = {
        **states,
        "activations": traced["activations"],
        "dispatch_buffers": dispatch_buffers(model, run, batch, pairs),
        "reserved": int(cfg.reserved_gb * GIB),
    }
    per_rank = []
    for r in range(cfg.world_size):
        parts = {"embeddings": tables[r], **fixed}
        per_rank.append({k: parts[k] for k in PARTS} | {"total": sum(parts[k] for k in PARTS)})
    worst = max(per_rank, key=lambda p: p["total"])
    a2a = a2a_bytes(model, run, cfg, plan, batch, pairs)
    return {
        "config": asdict(cfg),
        "run": {
            "model": run.model.name,
            "data": run.data.name,
            "precision": run.trainer.precision,
            "engine": run.trainer.engine,
            "ep": run.parallel.ep,
            "global_batch": run.trainer.batch_size,
            "per_rank_batch": batch,
            "optimizer": run.trainer.optimizer,
        },  # fmt: skip
        "pairs_per_instance": pairs,
        "parameters": {"non_expert": non_expert, "experts": experts},
        "embedding_plan": plan,
        "per_gpu_bytes": worst,
        "per_rank": per_rank,
        "a2a_bytes_per_step": a2a["total"],
        "a2a_bytes_per_step_parts": a2a,
        "traced_peak_bytes": traced["traced_peak"],
        "gpu_memory_bytes": int(cfg.gpu_memory_gb * GIB),
        "fits": worst["total"] <= cfg.gpu_memory_gb * GIB,
    }


def table(result: dict[str, Any]) -> str:
    """The readable form: one line per part (the largest rank), the verdict."""
    per = result["per_gpu_bytes"]
    cfg, run = result["config"], result["run"]
    lines = [
        f"{run['model']} on {run['data']}: {cfg['world_size']} x {cfg['gpu_memory_gb']:g} GiB ({cfg['device']}), "
        f"ep={run['ep']}, {run['engine']}, {run['precision']}, batch {run['per_rank_batch']} per rank",
        f"{'part':<18}{'GiB per GPU':>14}",
    ]
    lines += [f"{k:<18}{per[k] / GIB:>14.3f}" for k in (*PARTS, "total")]
    lines.append(f"all-to-all per step and rank: {result['a2a_bytes_per_step'] / GIB:.3f} GiB")
    lines.append(f"fits: {result['fits']} ({per['total'] / GIB:.2f} of {cfg['gpu_memory_gb']:g} GiB)")
    return "\n".join(lines)


@hydra.main(config_path="../conf", config_name="estimate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        est_node = cfg.get("estimate") or {}
        ecfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(EstimateConfig), est_node))
        world = ecfg.world_size  # type: ignore[union-attr]
        cfg = reject_renamed_keys(cfg)  # its errors do not depend on the world size
        try:
            run = build_run_config(cfg, world_size=world)
        except ValueError as e:  # the job's world size is this key's
            raise ValueError(f"{e} (the world size is estimate.world_size={world})") from None
        result = estimate(run, ecfg)  # type: ignore[arg-type]
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}")
        raise SystemExit(2) from None
    print(table(result))
    if ecfg.out:  # type: ignore[union-attr]
        out = Path(ecfg.out)  # type: ignore[union-attr]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
