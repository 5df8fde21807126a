"""Model selection and early stopping: the selector on scripted metric sequences, and
the real `Trainer` with a scripted validation metric: it stops at the right step, the
reported test metrics are those of the best checkpoint, and a resumed run keeps its
best so far."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from data.columns import Split
from parallel.dist import DistInfo
from tests._dist import run_ranks
from trainer import checkpoint
from trainer.config import build_run_config
from trainer.selection import EarlyStoppingConfig, ModelSelector, check_config, metric_value
from trainer.trainer import Trainer

CONF = Path(__file__).resolve().parents[2] / "conf"


def val(auc0: float | None, auc1: float | None = 0.5, ne: float = 1.0) -> dict:
    return {"t0": {"auc": auc0, "gauc": None, "ne": ne}, "t1": {"auc": auc1, "gauc": None, "ne": ne}}


def test_metric_value_per_task_and_mean() -> None:
    assert metric_value("val/t0/auc", val(0.7)) == 0.7
    assert metric_value("val/mean/auc", val(0.7, 0.5)) == pytest.approx(0.6)
    assert metric_value("val/mean/auc", val(None, 0.5)) == 0.5  # mean over tasks that have it
    assert metric_value("val/mean/gauc", val(0.7)) is None


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        (EarlyStoppingConfig(metric="test/t0/auc"), "expected val/<task>/<metric>"),
        (EarlyStoppingConfig(metric="val/t0/loss"), "expected val/<task>/<metric>"),
        (EarlyStoppingConfig(metric="val/t9/auc"), "unknown task 't9'"),
        (EarlyStoppingConfig(mode="biggest"), "mode='biggest'"),
        (EarlyStoppingConfig(patience=0), "patience must be >= 1"),
        (EarlyStoppingConfig(metric=None, patience=3), "needs trainer.early_stopping.metric"),
    ],
)
def test_bad_config_names_the_key(cfg: EarlyStoppingConfig, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_config(cfg, tasks=("t0", "t1"))


def test_selector_stops_after_patience_and_keeps_the_best() -> None:
    sel = ModelSelector(EarlyStoppingConfig(metric="val/t0/auc", patience=2, min_delta=0.001))
    improved = [sel.update(step, val(a)) for step, a in ((10, 0.6), (20, 0.7), (30, 0.7005), (40, 0.69))]
    assert improved == [True, True, False, False]  # 0.7005 is within min_delta
    assert sel.should_stop() and (sel.best_step, sel.best_value) == (20, 0.7)
    lower = ModelSelector(EarlyStoppingConfig(metric="val/mean/ne"))  # auto -> minimise NE
    assert [lower.update(s, val(0.5, ne=n)) for s, n in ((1, 0.9), (2, 0.8), (3, 0.85))] == [True, True, False]
    assert lower.best_step == 2 and not lower.should_stop()  # patience null: never stops
    restored = ModelSelector(sel.cfg)
    restored.load_state_dict(sel.state_dict())
    assert restored.state_dict() == sel.state_dict()


SCRIPT = [0.60, 0.70, 0.65, 0.64, 0.90]  # validation AUC of task0 at steps 4, 8, 12, 16, 20
BASE = (
    "data=synthetic",
    "data.num_train=3000",
    "data.num_val=300",
    "data.num_test=600",
    "data.num_tasks=2",
    "model=mmoe",
    "model.num_experts=2",
    "model.expert_hidden=[16]",
    "model.tower.hidden=[8]",
    "model.embedding_dim=8",
    "trainer.batch_size=64",
    "trainer.eval_every=4",
    "trainer.log_every=4",
    "trainer.progress=false",
    "trainer.early_stopping.metric=val/task0/auc",
    "logger=none",
    "trainer.lr=0.01",
)


class ScriptedTrainer(Trainer):
    """Validation returns the scripted AUC of task0 (by evaluation count); test is real."""

    def evaluate(self, split: Split) -> dict:
        metrics = super().evaluate(split)
        if split is self.dataset.val:
            step = self.state.step
            metrics["task0"]["auc"] = SCRIPT[step // 4 - 1] if step // 4 - 1 < len(SCRIPT) else 0.0
        return metrics


def _train(rank: int, world: int, run_dir: str, overrides: tuple[str, ...]) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        run = build_run_config(compose(config_name="config", overrides=[*BASE, *overrides]))
    info = DistInfo(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"), backend="gloo")
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    trainer = ScriptedTrainer(run, Path(run_dir), info=info)
    trainer.load()
    trainer.train()
    summary = trainer.finish()
    best = sorted(p.name for p in (Path(run_dir) / "checkpoints").glob("best_step_*"))
    # the best checkpoint's own test metrics, evaluated from scratch in this process
    fresh = Trainer(run, Path(run_dir), info=info)
    checkpoint.load_model(fresh.state, Path(run_dir) / "checkpoints" / best[-1])
    return {"summary": summary, "best": best, "best_test": fresh.evaluate(fresh.dataset.test)}


@pytest.mark.slow
def test_trainer_stops_early_and_reports_the_best_step(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (out,) = run_ranks(_train, 1, str(run_dir), ("trainer.steps=40", "trainer.early_stopping.patience=2"))
    s = out["summary"]
    # best at step 8 (0.70), then 0.65 and 0.64: two evaluations without a new best -> stop at 16
    assert s["stopped_early"] and s["steps"] == 16 and s["best_step"] == 8 and s["best_metric"] == 0.70
    assert out["best"] == ["best_step_00000008"]
    assert s["eval"] == {t: {k: m[k] for k in s["eval"][t]} for t, m in out["best_test"].items()}
    assert s["eval"] != s["eval_last"]  # the last step's model is a different one
    assert s["val"]["task0"]["auc"] == 0.70 and s["val_last"]["task0"]["auc"] == 0.64
    for m in s["eval"].values():
        assert m["num_rows"] == 600 and 0 < m["positive_rate"] < 1


@pytest.mark.slow
def test_resume_keeps_the_best_so_far(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    ckpt = ("trainer.checkpoint.every=4", "trainer.checkpoint.keep_last=5")
    (first,) = run_ranks(_train, 1, str(run_dir), ("trainer.steps=12", *ckpt))
    assert first["summary"]["best_step"] == 8
    # resumed from step 12: the evaluation at 16 (0.64) is no better than 8's 0.70; 20 (0.90) is
    (second,) = run_ranks(_train, 1, str(run_dir), ("trainer.steps=16", *ckpt))
    s = second["summary"]
    assert s["resumed_at_step"] == 12 and s["best_step"] == 8 and s["best_metric"] == 0.70
    assert second["best"] == ["best_step_00000008"]
    (third,) = run_ranks(_train, 1, str(run_dir), ("trainer.steps=20", *ckpt))
    assert third["summary"]["best_step"] == 20 and third["best"] == ["best_step_00000020"]
    assert third["summary"]["eval"] == third["summary"]["eval_last"]  # the last step is the best
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("val/task0/num_rows" in r for r in metrics)
