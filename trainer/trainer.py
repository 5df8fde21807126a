"""The `Trainer`: one training job on this rank, in named phases.

    Trainer(run, run_dir)           build: seed, data, model -> parallelize, engine,
                                    schedule, loader, pipeline, checkpoint state, logger
      .load()                       resume from a checkpoint (trainer.resume)
      .train()                      the loop: train_step, log, evaluate, save (a warm
                                    start validates its loaded model at step 0 first)
        .train_step()               one step through the pipeline (hooks below)
        .evaluate(split)            metrics over a whole split (every rank alike)
        .save()                     a checkpoint (collective)
      .finish()                     test metrics, summary.json (rank 0), close

One step (`StepHooks`, called by `trainer.pipeline`):

- `forward_step`: forward under `trainer.precision` autocast, loss
  `sum_t w_t BCE_t + aux`, then one all-reduce of the loss parts over all ranks on the
  device; a non-finite sum makes every rank skip the step *before* backward (the fused
  sparse optimizer updates embeddings during backward). Reading that decision is the
  step's one host sync outside the SMES layers (DESIGN section 5 allows one per SMES
  layer for the all-to-all split sizes).
- `backward_step`: backward (DDP all-reduces the network gradients, TorchRec updates its
  shards), the expert-gradient sync.
- `optimizer_step`: clipping, network optimizer, the weight average (`trainer.ema`),
  bias balancing; the loss parts and expert-load counters accumulate on the device and
  are read only at log time.

Validation and test evaluate the moving average of the network weights when
`trainer.ema.decay` > 0 (`averaged`, see `trainer/ema.py`), the trained weights otherwise.

Legend: T tasks.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from data.batch import Batch
from data.build import build_dataset, build_train_loader
from data.columns import Dataset, Split
from data.ids import records, write_records
from data.loaders.in_memory import TrainBatches, eval_batches
from model.build import ModelOutput, MultiTaskModel
from model.moe.host import host_flag, to_host
from model.moe.router import union_experts
from parallel.dist import DistInfo, all_gather_object, all_reduce, all_reduce_mean, init_distributed
from parallel.expert.params import smes_layers
from parallel.parallelize import ParallelModel, network_parameters, parallelize
from trainer import checkpoint
from trainer.checkpoint import TrainState
from trainer.config import RunConfig, to_plain, validate_against_data
from trainer.ema import WeightAverage
from trainer.engine import build_engine
from trainer.evaluation.experts import ClusterExpertMeter, ExpertLoadMeter
from trainer.evaluation.metrics import Predictions, compute_metrics
from trainer.faults import FaultInjector
from trainer.loss import total_loss
from trainer.optim import build_scheduler
from trainer.pipeline import InlineSteps, LoaderCursor, SparseDistPipeline
from trainer.reporting import report
from trainer.reporting.logger import MetricLogger
from trainer.selection import ModelSelector
from trainer.timer import StepTimer
from trainer.warm_start import base_vocabularies, read_record, warm_start

log = logging.getLogger("trainer")


@dataclass
class StepOut:
    """What `forward_step` hands to the later phases of its step."""

    out: ModelOutput
    parts_P: torch.Tensor  # loss parts, mean over ranks: [task..., aux, total]
    finite: bool


def build_model(run: RunConfig, dataset: Dataset, info: DistInfo) -> tuple[MultiTaskModel, ParallelModel]:
    model = MultiTaskModel(
        dataset.spec,
        core_cfg=run.model.core,
        embedding_dim=run.model.embedding_dim,
        tower=run.model.tower,
        ebc_device="meta",
    )
    # tables are filled from (seed, table, row block) generators: the same model at any world size
    return model, parallelize(model, run.parallel, info, engine=run.trainer.engine, seed=run.trainer.seed)


def build_data(run: RunConfig, info: DistInfo) -> Dataset:
    """The run's data set; a warm start's vocabularies extend its source's (trainer/warm_start.py)."""
    dataset = build_dataset(run.data, base_vocab=base_vocabularies(run))
    for name in ("train", "val", "test"):
        if len(dataset.split(name)) == 0:
            raise ValueError(
                f"data: the {name} split of {dataset.spec.name!r} is empty; check the data files / fractions"
            )
    validate_against_data(run, tasks=dataset.spec.tasks, features=dataset.spec.sparse_names, world=info.world_size)
    return dataset


class Trainer:
    """One training job on this rank; see the module doc.

    Args:
        run: the validated run config.
        run_dir: the run directory (shared by all ranks).
        info: this rank's process-group info (default: `init_distributed`).
    """

    def __init__(self, run: RunConfig, run_dir: Path, *, info: DistInfo | None = None) -> None:
        self.wall_start = time.perf_counter()
        self.run, self.run_dir = run, run_dir
        t = self.cfg = run.trainer
        self.info = info or init_distributed(device=t.device)
        torch.manual_seed(t.seed)
        np.random.seed(t.seed)
        self.dataset = build_data(run, self.info)
        self.spec = self.dataset.spec
        if self.info.is_main:  # what each embedding row means, for a later warm start (data/ids.py)
            write_records(records(self.dataset), run_dir)
        self.task_w = {task: float(t.task_weights.get(task, 1.0)) for task in self.spec.tasks}
        self.model, self.pm = build_model(run, self.dataset, self.info)
        built = build_engine(run, self.pm)
        self.engine, self.num_network_params = built.engine, built.num_network_params
        self.scheduler = build_scheduler(run, built.scheduled_optimizer)
        self.cursor = LoaderCursor(self._train_loader())
        self.selector = ModelSelector(t.early_stopping)
        self.ema = WeightAverage(dict(network_parameters(self.pm.dmp)), decay=t.ema.decay) if t.ema.decay > 0 else None
        self.state = TrainState(
            model=self.pm.dmp,
            sparse_optim=self.pm.dmp.fused_optimizer,
            network_optim=built.keyed_optimizer,
            table_optim=self.pm.replicated_table_optimizer,
            scheduler=self.scheduler,
            loader=self.cursor,
            expert_mesh=self.pm.mesh,
            selection=self.selector,
            ema=self.ema,
        )
        self.pipeline = (
            SparseDistPipeline(self.pm.dmp, self, self.info.device)
            if t.pipeline == "sparse_dist"
            else InlineSteps(self, self.info.device)
        )
        self.logger = self._build_logger()
        self.timer = StepTimer(self.info.device)
        self.window_meter, self.run_meter = ExpertLoadMeter(), ExpertLoadMeter()
        self.window_loss = torch.zeros(len(self.spec.tasks) + 2, dtype=torch.float64, device=self.info.device)
        self.window_steps = self.bad_in_a_row = 0
        self.faults = FaultInjector(self.info.rank, self.info.world_size)
        self.ckpt_root = run_dir / "checkpoints"
        self.resumed_from: Path | None = None
        self.init_from: dict[str, Any] | None = None
        self.start_step = 0
        self.last_val: dict[str, dict[str, float | None]] | None = None
        # cluster-expert NMI of the last evaluated split, and of each validation by step
        self.last_cluster_nmi: float | None = None
        self.val_cluster_nmi: dict[int, float | None] = {}
        self.cluster_nmi: dict[str, float | None] = {}  # the reported model's val / test (summary)
        self.eval_s = self.ckpt_s = 0.0
        self._current: StepOut | None = None

    # -- build helpers ---------------------------------------------------------------

    def _train_loader(self) -> TrainBatches:
        """In-memory or streaming, per the data source; pinned batches on CUDA so the
        host-to-device copy can run asynchronously."""
        t, info = self.cfg, self.info
        return build_train_loader(
            self.dataset,
            batch_size=t.batch_size // info.world_size,
            rank=info.rank,
            world_size=info.world_size,
            seed=t.seed,
            prefetch=t.prefetch,
            pin_memory=info.device.type == "cuda",
        )

    def _build_logger(self) -> MetricLogger | None:
        if not self.info.is_main:
            return None
        logger = MetricLogger(
            self.run.logger, run_dir=self.run_dir, run_config=to_plain(self.run), name=self.run_dir.name
        )
        d, info = self.dataset, self.info
        log.info(
            "world %d (%s on %s), %d train / %d val / %d test rows, %d tasks %s, %d sparse features",
            info.world_size, info.backend, info.device, len(d.train), len(d.val), len(d.test),
            len(self.spec.tasks), list(self.spec.tasks), len(self.spec.sparse),
        )  # fmt: skip
        for split, stats in (d.info.get("label_stats") or {}).items():  # type: ignore[union-attr]
            log.info(
                "%s labels: %s", split,
                ", ".join(f"{t} {s['positive_rate']:.4f} of {s['rows']}" for t, s in stats.items()
                          if s.get("positive_rate") is not None),
            )  # fmt: skip
        log.info("embedding plan: %s", self.pm.plan)
        log.info("network parameters: %d; pipeline %s; precision %s", self.num_network_params, self.cfg.pipeline,
                 self.cfg.precision)  # fmt: skip
        return logger

    def autocast(self) -> Any:
        """`trainer.precision`: bf16 autocast for the core and towers (fp32 master
        weights and optimizer state; the TorchRec tables keep their dtype)."""
        if self.cfg.precision != "bf16":
            return nullcontext()
        return torch.autocast(self.info.device.type, dtype=torch.bfloat16)

    def averaged(self) -> Any:
        """`trainer.ema`: the moving average in the model, for evaluation (trainer/ema.py)."""
        return nullcontext() if self.ema is None else self.ema.applied()

    # -- save / load -----------------------------------------------------------------

    def load(self) -> None:
        """Resume from `trainer.resume` (auto: the newest complete checkpoint), if any;
        else warm start from `trainer.init_from`, if set (a resumed warm-started run
        continues itself: `trainer/warm_start.py`)."""
        self.resumed_from = checkpoint.resolve(self.cfg.resume, self.ckpt_root)
        if self.resumed_from is not None:
            checkpoint.load(self.state, self.resumed_from)
            if self.info.is_main:
                log.info("resumed from %s at step %d", self.resumed_from, self.state.step)
            self.init_from = read_record(self.run_dir)
        elif self.cfg.init_from:
            self.init_from = warm_start(
                self.state, self.pm, self.run, self.dataset, run_dir=self.run_dir, is_main=self.info.is_main
            )
        self.start_step = self.state.step

    def save(self, *, best: bool = False) -> None:
        """A periodic checkpoint, or (`best`) the model-selection one (collective)."""
        c0 = time.perf_counter()
        path = checkpoint.save(self.state, self.ckpt_root, keep_last=self.cfg.checkpoint.keep_last, best=best)
        if best and path is not None:
            self.selector.best_dir = path.name
        self.ckpt_s += time.perf_counter() - c0

    # -- one step (StepHooks) --------------------------------------------------------

    def zero_grad(self) -> None:
        self.engine.zero_grad()
        self.pm.prepare_grads()  # sharded experts: backward accumulates into their all-reduce buckets

    def forward_step(self, batch: Batch) -> tuple[torch.Tensor, StepOut]:
        self.timer.lap("data")
        step = self.state.step
        with self.autocast():
            out: ModelOutput = self.engine(batch)
        loss, parts_P = total_loss(out, batch, self.task_w)
        loss = self.faults.loss(step, loss)
        parts_P[-1] = loss.detach()
        with self.timer.part("comm"):
            all_reduce_mean(parts_P)  # device tensor: same skip decision on every rank
        finite = host_flag(torch.isfinite(parts_P).all())  # host sync: the skip decision (module doc)
        self._current = StepOut(out=out, parts_P=parts_P, finite=finite)
        self.timer.lap("forward")
        return loss, self._current

    def backward_step(self, loss: torch.Tensor) -> None:
        assert self._current is not None
        self.timer.lap("data")  # the pipeline's wait for the next batch's input dist
        if self._current.finite:
            self.engine.backward(loss)
            with self.timer.part("comm"):
                self.pm.after_backward()  # sharded experts: reduce inside their replica group
        self.timer.lap("backward")

    def optimizer_step(self) -> None:
        cur = self._current
        assert cur is not None
        if cur.finite:
            self.engine.step()  # grad clipping, network (+ replicated table) optimizer step
            if self.ema is not None:
                self.ema.update()
            core = self.model.core
            if hasattr(core, "update_bias"):  # aux-loss-free balancing, outside backward
                core.update_bias()
            if cur.out.load is not None:
                self.window_meter.add(cur.out.load)
                self.run_meter.add(cur.out.load)
            self.window_loss += cur.parts_P
            self.window_steps += 1
            self.bad_in_a_row = 0
        self.timer.lap("optimizer")

    def train_step(self) -> None:
        """One optimizer step (or a skipped one) through the pipeline."""
        step = self.state.step
        self.faults.before_step(step)
        self.timer.start()
        self.pipeline.progress(self.cursor)
        self.cursor.trained()
        cur = self._current
        assert cur is not None
        if not cur.finite:  # no backward ran: the fused sparse optimizer would update during it
            self.state.skipped_steps += 1
            self.bad_in_a_row += 1
            log.warning("step %d: non-finite loss %s, step skipped", step, to_host(cur.parts_P).tolist())
            if self.bad_in_a_row >= self.cfg.max_bad_steps:
                raise FloatingPointError(
                    f"{self.bad_in_a_row} consecutive non-finite losses "
                    f"(trainer.max_bad_steps={self.cfg.max_bad_steps}); lower trainer.lr or check the data"
                )
        self.scheduler.step()  # the schedule follows the step count, skipped steps included
        self.state.step = step + 1
        self._current = None

    # -- evaluate --------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, split: Split) -> dict[str, dict[str, float | None]]:
        """Per-task metrics over the whole split (every rank returns the same values).
        Sets `last_cluster_nmi`: the cluster-expert NMI of the split's rows when its
        source gives `Split.clusters` and the model has an SMES layer (its first), else None."""
        e0 = time.perf_counter()
        info, dmp = self.info, self.pm.dmp
        layers = smes_layers(dmp) if split.clusters is not None and len(split) else []
        meter = None
        if layers:
            assert split.clusters is not None
            meter = ClusterExpertMeter(int(split.clusters.max()) + 1, layers[0].num_experts, info.device)
        with self.pipeline.paused():
            dmp.eval()
            if meter is not None:
                layers[0].record_plan = True
            try:
                preds = Predictions(self.spec.tasks)
                batches = eval_batches(
                    split,
                    spec=self.spec,
                    batch_size=self.cfg.eval_batch_size,
                    rank=info.rank,
                    world_size=info.world_size,
                )
                for batch in batches:
                    batch = batch.to(info.device)
                    with self.autocast():
                        out: ModelOutput = dmp(batch)
                    preds.add(out.logits, batch.labels, batch.weights, batch.user_id)
                    if meter is not None and batch.cluster_id is not None:
                        plan, layers[0].last_plan = layers[0].last_plan, None
                        assert plan is not None, "the SMES layer kept no routing plan"
                        meter.add(union_experts(plan), batch.cluster_id, batch.weights)
            finally:
                if meter is not None:
                    layers[0].record_plan, layers[0].last_plan = False, None
            dmp.train()
        metrics = compute_metrics(preds, self.spec.tasks, mode=self.cfg.eval_mode)
        self.last_cluster_nmi = None if meter is None else meter.compute()
        self.eval_s += time.perf_counter() - e0
        return metrics

    # -- the loop --------------------------------------------------------------------

    def train(self) -> None:
        t = self.cfg
        self.setup_s = time.perf_counter() - self.wall_start
        self.train_start = time.perf_counter()
        if self.state.stopped_early:  # resumed after early stopping: nothing left to train
            self.train_s = 0.0
            return
        if self.init_from is not None and self.start_step == 0 and t.steps > 0 and self.resumed_from is None:
            # a warm start's loaded model is the first candidate: a run whose training
            # only makes it worse reports the loaded model (and logs where it started)
            self.validate(0)
        bar = tqdm(
            total=t.steps, initial=self.start_step, disable=not (self.info.is_main and t.progress),
            mininterval=1.0, dynamic_ncols=True,
        )  # fmt: skip
        window_start = self.train_start
        for step in range(self.start_step, t.steps):
            self.train_step()
            bar.update(1)
            last = step + 1 == t.steps
            paused = self.eval_s + self.ckpt_s
            if (step + 1) % t.log_every == 0 or last:
                self._log_window(step + 1, time.perf_counter() - window_start, bar)
                window_start = time.perf_counter()
            stop = False
            if (t.eval_every and (step + 1) % t.eval_every == 0) or last:
                stop = self.validate(step + 1) and not last
                self.state.stopped_early = stop
            if (t.checkpoint.every and (step + 1) % t.checkpoint.every == 0) or (
                (last or stop) and t.checkpoint.at_end
            ):
                self.save()
            window_start += self.eval_s + self.ckpt_s - paused  # keep eval and checkpoints out of throughput
            if stop:
                log.info(
                    "early stopping at step %d: %s has not improved for %d evaluations (best %.6f at step %s)",
                    step + 1, t.early_stopping.metric, self.selector.evals_since_best, self.selector.best_value,
                    self.selector.best_step,
                )  # fmt: skip
                break
        bar.close()
        self.train_s = time.perf_counter() - self.train_start - self.eval_s - self.ckpt_s

    def validate(self, step: int) -> bool:
        """Validation at `step`, model selection (the best checkpoint) and whether to
        stop early (every rank decides alike: the metrics are global)."""
        with self.averaged():
            self.last_val = self.evaluate(self.dataset.val)
        self.val_cluster_nmi[step] = self.last_cluster_nmi
        if self.logger is not None:
            logged = report.flat("val", self.last_val)
            if self.last_cluster_nmi is not None:
                logged["val/experts/cluster_expert_nmi"] = self.last_cluster_nmi
            self.logger.log(step, logged)
            log.info("step %d val %s", step, report.fmt(self.last_val))
        if self.selector.update(step, self.last_val):
            self.save(best=True)
        return self.selector.should_stop()

    def _log_window(self, step: int, seconds: float, bar: Any) -> None:
        """Window figures (collective: every rank reduces the timer and expert counts)."""
        figures = self.window_meter.compute(self.spec.tasks)
        self.window_meter.reset()
        times_ms = self.timer.window_ms()
        if self.logger is not None:
            mean = to_host(self.window_loss / max(1, self.window_steps)).tolist()  # host read at log time
            metrics: dict[str, Any] = {f"loss/{task}": mean[i] for i, task in enumerate(self.spec.tasks)}
            metrics.update({"loss/aux": mean[-2], "loss/total": mean[-1], "lr": self.scheduler.get_last_lr()[0]})
            metrics["train/samples_per_s"] = self.window_steps * self.cfg.batch_size / max(1e-9, seconds)
            metrics["train/skipped_steps"] = self.state.skipped_steps
            metrics.update({f"time/{k}_ms": v for k, v in times_ms.items()})
            if figures is not None:
                metrics.update(report.expert_log(figures))
            self.logger.log(step, metrics)
            if math.isfinite(mean[-1]):
                bar.set_postfix(loss=f"{mean[-1]:.4f}")
        self.window_loss.zero_()
        self.window_steps = 0

    # -- finish ----------------------------------------------------------------------

    def finish(self) -> dict[str, Any]:
        """Test metrics and the run summary (`summary.json` from rank 0). Returns it."""
        if not hasattr(self, "train_s"):  # resumed at the final step: nothing trained here
            self.setup_s = time.perf_counter() - self.wall_start
            self.train_s = 0.0
        with self.averaged():
            if self.last_val is None:
                self.last_val = self.evaluate(self.dataset.val)
                self.val_cluster_nmi[self.state.step] = self.last_cluster_nmi
            test_last = test = self.evaluate(self.dataset.test)
        val = self.last_val
        sel = self.selector
        reported = self.state.step
        if sel.enabled and sel.best_dir is not None and sel.best_step != self.state.step:
            checkpoint.load_model(self.state, self.ckpt_root / sel.best_dir)  # the reported model (its average)
            best = sel.best_step
            if best is not None and best not in self.val_cluster_nmi and self.dataset.val.clusters is not None:
                # its validation ran in an earlier process (this one resumed after it): recompute the NMI
                self.evaluate(self.dataset.val)
                self.val_cluster_nmi[best] = self.last_cluster_nmi
            test, val = self.evaluate(self.dataset.test), sel.best_val or self.last_val
            reported = sel.best_step
            if self.info.is_main:
                log.info("reporting the best step %s (%s = %.6f)", sel.best_step, sel.cfg.metric, sel.best_value)
        self.cluster_nmi = {"val": self.val_cluster_nmi.get(reported), "test": self.last_cluster_nmi}
        loader = self.cursor.loader
        loader_rate = torch.tensor([loader.built_rows / max(1e-9, loader.build_s)], dtype=torch.float64)
        all_reduce(loader_rate)  # sum of per-rank rates = global loader throughput
        summary = report.summary(
            self,
            test=test,
            test_last=test_last,
            val=val,
            loader_samples_per_s=float(loader_rate),
            streamed_skips=all_gather_object(loader.skipped_by_reason),
        )
        if self.logger is not None:
            report.write(self, summary, test)
        return summary


def train(run: RunConfig, run_dir: Path, *, info: DistInfo | None = None) -> dict[str, Any]:
    """Run one training job on this rank; rank 0 writes `summary.json`. Returns the summary."""
    trainer = Trainer(run, run_dir, info=info)
    trainer.load()
    trainer.train()
    return trainer.finish()
