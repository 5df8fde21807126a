"""The same config and seed train the same model on 1 process and on 2 (torchrun).

Through the real entry points: `python -m trainer.train` without torchrun (a world of
one) against `launch/torchrun.sh` with 2 gloo ranks. The per-step losses
(`metrics.jsonl`, logged every step) and the test metrics (`summary.json`) must agree
to float tolerance: the initial weights (tables, network layers, experts under any `ep`)
depend on the seed and the config only, the global batches are the same, and every
cross-rank statistic is global (balance counts, HoME's batch norm). What differs is
the order of floating-point reductions (DDP's gradient all-reduce, the loss mean),
which adaptive optimisers can amplify where a gradient is pure rounding noise (HoME,
see `MODELS`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.trainer.test_launch import ROOT, launch

COMMON = (
    "data.limit_rows=3000",
    "trainer.steps=20",
    "trainer.batch_size=64",
    "trainer.log_every=1",
    "logger=none",
    "trainer.progress=false",
    "trainer.checkpoint.at_end=false",
    "model.embedding_dim=4",
    "model.expert_hidden=[16]",
)
MODELS = {
    "mmoe": ("model=mmoe", "model.num_experts=2"),
    "smes": ("model=smes", "model.num_experts=4", "model.shared_top_k=1", "model.adaptive_top_k=1"),
    # SGD for HoME: its batch norms cancel any shift common to the batch, so the weights
    # reading an input column that is constant in a batch (a categorical value every row
    # shares, common in Census) get a near-zero gradient made of rounding noise; Adam and
    # Adagrad scale that noise up to full steps, and different reduction orders (1 vs 2
    # ranks) then move those weights apart by ~lr until a later batch varies in that
    # column (measured: losses equal to 2e-7 up to step 13, then drifting to 5e-5 by
    # step 20; with SGD every weight agrees to 2e-7 after 20 steps).
    "home": (
        "model=home",
        "model.feature_gate_rank=2",
        "trainer.optimizer=sgd",
        "trainer.lr=0.05",
        "parallel.sparse_optimizer.name=sgd",
    ),
}


def single_process(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(WANDB_MODE="offline", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "trainer.train", *overrides, f"hydra.run.dir={run_dir}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def result(proc: subprocess.CompletedProcess, run_dir: Path) -> tuple[list[float], dict]:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss/total"] for r in records if "loss/total" in r]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(losses) == 20 and summary["steps"] == 20
    return losses, summary


def assert_same_run(got: tuple[list[float], dict], want: tuple[list[float], dict]) -> None:
    (got_losses, got_summary), (want_losses, want_summary) = got, want
    assert got_losses == pytest.approx(want_losses, rel=1e-5, abs=1e-6)
    assert got_losses[-1] < got_losses[0]  # it trained (a constant loss would also "agree")
    assert got_summary["eval"].keys() == want_summary["eval"].keys()
    for task, m in want_summary["eval"].items():
        assert got_summary["eval"][task]["auc"] == pytest.approx(m["auc"], abs=2e-5), task
        assert got_summary["eval"][task]["ne"] == pytest.approx(m["ne"], rel=1e-5), task


@pytest.mark.slow
@pytest.mark.parametrize("model", list(MODELS))
def test_one_and_two_processes_train_the_same_model(tmp_path: Path, model: str) -> None:
    overrides = (*COMMON, *MODELS[model])
    one = result(single_process(tmp_path / "w1", *overrides), tmp_path / "w1")
    assert one[1]["world_size"] == 1
    eps = (1, 2) if model == "smes" else (1,)
    for ep in eps:
        run_dir = tmp_path / f"w2ep{ep}"
        two = result(launch(run_dir, *overrides, f"parallel.ep={ep}", nproc=2), run_dir)
        assert two[1]["world_size"] == 2 and two[1]["ep_size"] == ep
        assert_same_run(two, one)
