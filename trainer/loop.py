"""The training and evaluation loops, independent of Hydra.

`train(run_cfg, run_dir)` runs one job on this rank: build data and model, shard,
train for `trainer.steps`, evaluate on validation (periodically and at the end) and on
test, write `summary.json` from rank 0, and return the summary.

Per step: batch -> forward -> loss = sum_t w_t * BCE_t + sum(aux losses) -> one
all-reduce of the loss parts (for logging; a non-finite sum on any rank makes every rank
skip the step *before* backward, because the fused sparse optimizer updates embeddings
during backward) -> backward (DDP all-reduces dense gradients, TorchRec updates its
shards) -> dense optimizer step. With `trainer.engine=deepspeed` the forward, backward
and step go through a DeepSpeed engine instead (`parallel/deepspeed_engine.py`), which
reduces the dense and expert gradients and steps the dense optimizer (ZeRO).

Legend: B local batch, T tasks.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchrec.optim.keyed import KeyedOptimizerWrapper
from tqdm import tqdm

from data.batch import Batch
from data.build import build_dataset
from data.columns import Split
from data.loader import TrainLoader, eval_batches
from data.spec import DatasetSpec
from model.build import ModelOutput, MultiTaskModel
from parallel.deepspeed_engine import DeepSpeedDense
from parallel.dist import DistInfo, all_reduce, all_reduce_mean, init_distributed
from parallel.expert_parallel import clip_grad_norm_
from parallel.parallelize import ParallelModel, dense_parameters, parallelize
from trainer import checkpoint, monitor
from trainer.checkpoint import TrainState
from trainer.config import RunConfig, to_plain, validate_against_data
from trainer.expert_stats import ExpertLoadMeter
from trainer.faults import FaultInjector
from trainer.logger import MetricLogger
from trainer.metrics import Predictions, task_metrics

log = logging.getLogger("trainer")


def build_dense_optimizer(run: RunConfig, params: list[Any]) -> torch.optim.Optimizer:
    """The dense optimizer over `params` (parameters or parameter groups)."""
    t = run.trainer
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    if t.optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.SGD(params, lr=t.lr, weight_decay=t.weight_decay)


@dataclass
class NativeDense:
    """`trainer.engine=native`: forward through the DMP (DDP inside), plain backward,
    grad clipping and the torch optimizers. Same interface as `DeepSpeedDense`."""

    pm: ParallelModel
    optimizers: list[Any]
    params: list[torch.nn.Parameter]
    grad_clip: float

    def __call__(self, dense_BDn: torch.Tensor, sparse: Any) -> ModelOutput:
        return self.pm.dmp(dense_BDn, sparse)

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        if self.grad_clip > 0:  # by the global norm: experts sharded over ranks count once
            clip_grad_norm_(
                self.params, self.grad_clip, sharded_experts=self.pm.sharded_expert_params, mesh=self.pm.mesh
            )
        for opt in self.optimizers:
            opt.step()


def lr_factor(step: int, *, steps: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base lr at `step` (0-based): linear warmup, then constant or cosine."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def task_losses(out: ModelOutput, batch: Batch, tasks: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Per-task BCE, averaged over the batch with the instance weights (padding = 0)."""
    denom = batch.weights.sum().clamp_min(1.0)
    return {
        t: (F.binary_cross_entropy_with_logits(out.logits[t], batch.labels[t], reduction="none") * batch.weights).sum()
        / denom
        for t in tasks
    }


@dataclass
class StepTimer:
    """Wall time per phase, summed over steps (CUDA-synchronised when on GPU).

    `totals` holds the laps (data, forward, backward, optimizer: they add up to the
    step); `parts` holds sub-phases timed inside a lap (comm: the blocking collectives
    the loop issues itself, i.e. the loss all-reduce and the expert-gradient sync; DDP's
    gradient all-reduce overlaps backward and the expert all-to-alls run inside
    forward/backward, so they are not in it).
    """

    device: torch.device
    totals: dict[str, float] = field(default_factory=dict)
    parts: dict[str, float] = field(default_factory=dict)
    num_steps: int = 0

    def __post_init__(self) -> None:
        self._t = time.perf_counter()
        self._mark: tuple[int, dict[str, float]] = (0, {})

    def start(self) -> None:
        self._sync()
        self.num_steps += 1
        self._t = time.perf_counter()

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        self._sync()
        t0 = time.perf_counter()
        yield
        self._sync()
        self.parts[name] = self.parts.get(name, 0.0) + time.perf_counter() - t0

    def window_ms(self) -> dict[str, float]:
        """Mean ms per step of each phase since the previous call, averaged over ranks.

        Collective when a process group of more than one rank is up: every rank calls it.
        """
        phases = ("data", "forward", "backward", "optimizer", "comm")
        now = {**self.totals, **self.parts}
        steps, before = self._mark
        delta = torch.tensor([now.get(k, 0.0) - before.get(k, 0.0) for k in phases], dtype=torch.float64)
        all_reduce_mean(delta)
        self._mark = (self.num_steps, now)
        per_step = 1e3 / max(1, self.num_steps - steps)
        return {k: float(v) * per_step for k, v in zip(phases, delta, strict=True)}

    def lap(self, phase: str) -> None:
        self._sync()
        now = time.perf_counter()
        self.totals[phase] = self.totals.get(phase, 0.0) + now - self._t
        self._t = now

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@torch.no_grad()
def evaluate(
    pm: ParallelModel, split: Split, spec: DatasetSpec, *, batch_size: int, info: DistInfo
) -> dict[str, dict[str, float | None]]:
    """Per-task metrics over the whole split (every rank returns the same values)."""
    pm.dmp.eval()
    preds = Predictions(spec.tasks)
    for batch in eval_batches(split, spec=spec, batch_size=batch_size, rank=info.rank, world_size=info.world_size):
        batch = batch.to(info.device)
        out: ModelOutput = pm.dmp(batch.dense, batch.sparse)
        preds.add(out.logits, batch.labels, batch.weights, batch.user_id)
    pm.dmp.train()
    return task_metrics(preds.gather(), spec.tasks)


def _flat(prefix: str, metrics: dict[str, dict[str, float | None]]) -> dict[str, float | None]:
    return {f"{prefix}/{t}/{k}": v for t, m in metrics.items() for k, v in m.items() if k in ("auc", "gauc", "ne")}


def _expert_log(figures: dict[str, Any], tasks: tuple[str, ...], max_keys: int = 64) -> dict[str, Any]:
    """Scalar load figures, per-expert keys (only up to `max_keys` experts, so large E
    does not flood the dashboard), and the full vectors (pooled and per task) as lists,
    which go to metrics.jsonl only (the expert-load heatmap is drawn from them)."""
    out: dict[str, Any] = {f"experts/{k}": v for k, v in figures.items() if not isinstance(v, list | dict)}
    frac = figures["selection_fraction"]
    if len(frac) <= max_keys:
        out.update({f"experts/fraction/e{e:03d}": v for e, v in enumerate(frac)})
    out["experts/selection_fraction"] = frac
    out["experts/selection_fraction_per_task"] = figures["selection_fraction_per_task"]
    return out


def train(run: RunConfig, run_dir: Path, *, info: DistInfo | None = None) -> dict[str, Any]:
    """Run one training job on this rank; rank 0 writes `summary.json`. Returns the summary."""
    wall_start = time.perf_counter()
    info = info or init_distributed(device=run.trainer.device)
    t = run.trainer
    torch.manual_seed(t.seed)
    np.random.seed(t.seed)

    dataset = build_dataset(run.data)
    spec = dataset.spec
    for name in ("train", "val", "test"):
        if len(dataset.split(name)) == 0:
            raise ValueError(f"data: the {name} split of {spec.name!r} is empty; check the data files / fractions")
    validate_against_data(run, tasks=spec.tasks, features=spec.sparse_names, world=info.world_size)
    task_w = {task: float(t.task_weights.get(task, 1.0)) for task in spec.tasks}

    model = MultiTaskModel(
        spec,
        core_cfg=run.model.core,
        embedding_dim=run.model.embedding_dim,
        tower=run.model.tower,
        ebc_device="meta",
    )
    pm = parallelize(model, run.parallel, info, dense_engine=t.engine)
    core = model.core
    named_dense = dict(dense_parameters(pm.dmp))
    dense_params = list(named_dense.values())
    dense: NativeDense | DeepSpeedDense
    if t.engine == "deepspeed":
        dense = DeepSpeedDense(
            pm,
            cfg=t.deepspeed,
            build_optimizer=lambda groups: build_dense_optimizer(run, groups),
            global_batch=t.batch_size,
            grad_clip=t.grad_clip,
        )
        optimizer, scheduled = dense.keyed_optimizer, dense.base_optimizer
    else:
        # keyed by parameter name, so checkpoints do not depend on parameter order
        optimizer = scheduled = KeyedOptimizerWrapper(named_dense, lambda ps: build_dense_optimizer(run, list(ps)))
        # data_parallel tables: replicated, stepped with the dense optimizer (see parallelize)
        step_optimizers = [optimizer] + ([pm.replicated_table_optimizer] if pm.replicated_table_optimizer else [])
        dense = NativeDense(pm, step_optimizers, dense_params, t.grad_clip)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        scheduled, lambda s: lr_factor(s, steps=t.steps, warmup=t.warmup_steps, schedule=t.lr_schedule)
    )
    loader = TrainLoader(
        dataset.train,
        spec=spec,
        batch_size=t.batch_size // info.world_size,
        rank=info.rank,
        world_size=info.world_size,
        seed=t.seed,
        prefetch=t.prefetch,
    )

    logger = None
    if info.is_main:
        logger = MetricLogger(run.logger, run_dir=run_dir, run_config=to_plain(run), name=run_dir.name)
        log.info(
            "world %d (%s on %s), %d train / %d val / %d test rows, %d tasks %s, %d sparse features",
            info.world_size, info.backend, info.device, len(dataset.train), len(dataset.val),
            len(dataset.test), len(spec.tasks), list(spec.tasks), len(spec.sparse),
        )  # fmt: skip
        log.info("embedding plan: %s", pm.plan)
        log.info("dense parameters: %d", sum(p.numel() for p in dense_params))

    state = TrainState(
        model=pm.dmp,
        sparse_optim=pm.dmp.fused_optimizer,
        dense_optim=optimizer,
        table_optim=pm.replicated_table_optimizer,
        scheduler=scheduler,
        loader=loader,
        expert_mesh=pm.mesh,
    )
    ckpt_root = run_dir / "checkpoints"
    resume_from = checkpoint.resolve(t.resume, ckpt_root)
    if resume_from is not None:
        checkpoint.load(state, resume_from)
        if info.is_main:
            log.info("resumed from %s at step %d", resume_from, state.step)
    setup_s = time.perf_counter() - wall_start
    timer = StepTimer(info.device)
    window_meter, run_meter = ExpertLoadMeter(), ExpertLoadMeter()
    window_loss = torch.zeros(len(spec.tasks) + 2, dtype=torch.float64)  # tasks, aux, total
    window_steps, bad_in_a_row = 0, 0
    start_step = state.step
    last_val: dict[str, dict[str, float | None]] | None = None
    eval_s = ckpt_s = 0.0
    train_start = time.perf_counter()
    window_start = train_start
    batches = iter(loader)
    bar = tqdm(
        total=t.steps, initial=start_step, disable=not (info.is_main and t.progress), mininterval=1.0,
        dynamic_ncols=True,
    )  # fmt: skip
    faults = FaultInjector(info.rank, info.world_size)
    for step in range(start_step, t.steps):
        faults.before_step(step)
        timer.start()
        batch = next(batches).to(info.device, non_blocking=True)
        timer.lap("data")
        out: ModelOutput = dense(batch.dense, batch.sparse)
        losses = task_losses(out, batch, spec.tasks)
        aux = sum(out.aux_losses.values(), torch.zeros((), device=info.device))
        loss = sum((task_w[k] * v for k, v in losses.items()), torch.zeros((), device=info.device)) + aux
        loss = faults.loss(step, loss)
        parts = torch.stack([*(v.detach() for v in losses.values()), aux.detach(), loss.detach()])
        parts = parts.double().cpu()
        with timer.part("comm"):
            all_reduce_mean(parts)
        timer.lap("forward")
        dense.zero_grad()
        if torch.isfinite(parts).all():  # same decision on every rank: parts are all-reduced
            bad_in_a_row = 0
            dense.backward(loss)
            with timer.part("comm"):
                pm.after_backward()
            timer.lap("backward")
            dense.step()  # grad clipping, dense (+ replicated table) optimizer step
            if hasattr(core, "update_bias"):  # aux-loss-free balancing, outside backward
                core.update_bias()
            timer.lap("optimizer")
            if out.load is not None:
                window_meter.add(out.load)
                run_meter.add(out.load)
            window_loss += parts
            window_steps += 1
        else:  # no backward: the fused sparse optimizer would update during it
            state.skipped_steps += 1
            bad_in_a_row += 1
            log.warning("step %d: non-finite loss %s, step skipped", step, parts.tolist())
            if bad_in_a_row >= t.max_bad_steps:
                raise FloatingPointError(
                    f"{bad_in_a_row} consecutive non-finite losses "
                    f"(trainer.max_bad_steps={t.max_bad_steps}); "
                    "lower trainer.lr or check the data"
                )
        scheduler.step()  # the schedule follows the step count, skipped steps included
        state.step = step + 1
        bar.update(1)

        last = step + 1 == t.steps
        if (step + 1) % t.log_every == 0 or last:
            now = time.perf_counter()
            figures = window_meter.compute(spec.tasks)
            window_meter.reset()
            times_ms = timer.window_ms()
            if info.is_main and logger is not None:
                mean = (window_loss / max(1, window_steps)).tolist()
                metrics: dict[str, Any] = {f"loss/{task}": mean[i] for i, task in enumerate(spec.tasks)}
                metrics.update({"loss/aux": mean[-2], "loss/total": mean[-1], "lr": scheduler.get_last_lr()[0]})
                metrics["train/samples_per_s"] = window_steps * t.batch_size / max(1e-9, now - window_start)
                metrics["train/skipped_steps"] = state.skipped_steps
                metrics.update({f"time/{k}_ms": v for k, v in times_ms.items()})
                if figures is not None:
                    metrics.update(_expert_log(figures, spec.tasks))
                logger.log(step + 1, metrics)
                bar.set_postfix(loss=f"{mean[-1]:.4f}")
            window_loss.zero_()
            window_steps = 0
            window_start = time.perf_counter()
        if (t.eval_every and (step + 1) % t.eval_every == 0) or last:
            e0 = time.perf_counter()
            last_val = evaluate(pm, dataset.val, spec, batch_size=t.eval_batch_size, info=info)
            eval_s += time.perf_counter() - e0
            if info.is_main and logger is not None:
                logger.log(step + 1, _flat("val", last_val))
                log.info("step %d val %s", step + 1, _fmt(last_val))
            window_start += time.perf_counter() - e0  # keep eval out of throughput
        if (t.checkpoint.every and (step + 1) % t.checkpoint.every == 0) or (last and t.checkpoint.at_end):
            c0 = time.perf_counter()
            checkpoint.save(state, ckpt_root, keep_last=t.checkpoint.keep_last)
            ckpt_s += time.perf_counter() - c0
            window_start += time.perf_counter() - c0
    bar.close()
    train_s = time.perf_counter() - train_start - eval_s - ckpt_s

    e0 = time.perf_counter()
    test = evaluate(pm, dataset.test, spec, batch_size=t.eval_batch_size, info=info)
    eval_s += time.perf_counter() - e0
    experts = run_meter.compute(spec.tasks)
    loader_rate = torch.tensor([loader.built_rows / max(1e-9, loader.build_s)], dtype=torch.float64)
    all_reduce(loader_rate)  # sum of per-rank rates = global loader throughput
    if last_val is None:  # resumed at the final step: nothing trained in this process
        last_val = evaluate(pm, dataset.val, spec, batch_size=t.eval_batch_size, info=info)
    run_steps = t.steps - start_step
    done_steps = t.steps - state.skipped_steps
    samples = done_steps * t.batch_size
    summary: dict[str, Any] = {
        "model": run.model.name,
        "dataset": spec.name,
        "world_size": info.world_size,
        "ep_size": run.parallel.ep,
        "engine": t.engine,
        "zero_stage": t.deepspeed.zero_stage if t.engine == "deepspeed" else None,
        "steps": done_steps,
        "samples": samples,
        "train_samples_per_s": run_steps * t.batch_size / max(1e-9, train_s) if run_steps else None,
        "loader_samples_per_s": float(loader_rate),
        "eval": {task: {k: m[k] for k in ("auc", "gauc", "ne")} for task, m in test.items()},
        "val": {task: {k: m[k] for k in ("auc", "gauc", "ne")} for task, m in (last_val or {}).items()},
        "experts": None
        if experts is None
        else {k: v for k, v in experts.items() if k != "selection_fraction_per_task"},
        "restarts": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
        "skipped_rows": dataset.skipped_rows,
        "skipped_rows_by_reason": dict((dataset.info.get("skipped") or {}).get("by_reason", {})),
        "skipped_steps": state.skipped_steps,
        "resumed_from": None if resume_from is None else str(resume_from),
        "resumed_at_step": start_step,
        "batch_size": t.batch_size,
        "step_time_ms": {k: 1e3 * v / max(1, run_steps) for k, v in {**timer.totals, **timer.parts}.items()},
        "checkpoint_s": ckpt_s,
        "setup_s": setup_s,
        "train_s": train_s,
        "eval_s": eval_s,
        "wall_s": time.perf_counter() - wall_start,
        "embedding_plan": pm.plan,
        "backend": info.backend,
        "device": str(info.device),
    }
    if info.is_main and logger is not None:
        logger.log(t.steps, _flat("test", test))
        logger.summary({k: v for k, v in _flat("test", test).items()})
        summary["wandb_dir"] = logger.wandb_dir
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        monitor.write_plots(run_dir, logger=logger, step=t.steps)  # warns, never raises
        log.info("test %s", _fmt(test))
        logger.close()
    return summary


def _fmt(metrics: dict[str, dict[str, float | None]]) -> str:
    parts = []
    for task, m in metrics.items():
        vals = " ".join(f"{k}={m[k]:.4f}" for k in ("auc", "gauc", "ne") if m.get(k) is not None)
        parts.append(f"{task}: {vals}")
    return "; ".join(parts)
