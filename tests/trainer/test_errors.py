"""A start-up error reaches the user once, as the last line, not once per rank inside
torchrun's report; the traceback goes to train.log."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.trainer.test_launch import launch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("trainer.optimizer=lamb", "trainer.optimizer='lamb'; choose one of"),  # our config check
        ("trainer.fo0=1", "Could not override 'trainer.fo0'"),  # Hydra's composition error
    ],
)
def test_startup_error_is_printed_once_and_last(tmp_path: Path, override: str, needle: str) -> None:
    proc = launch(tmp_path / "run", override, "logger=none")
    assert proc.returncode != 0
    err = proc.stderr
    assert err.count(needle) == 1, err[-4000:]
    tail = err.strip().splitlines()
    first = next(i for i, line in enumerate(tail) if line.startswith("error: "))
    assert needle in "\n".join(tail[first:]) and "torch.distributed" not in "\n".join(tail[first:])
    assert "ValueError" not in err and "Error executing job" not in err


@pytest.mark.slow
def test_user_error_without_a_launcher(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "TRAINER_ERROR"))}
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.train", "trainer.optimizer=lamb", "logger=none", f"hydra.run.dir={run_dir}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: trainer.optimizer='lamb'")
    assert "Traceback" not in proc.stderr
    assert "ValueError" in (run_dir / "train.log").read_text()  # the traceback, for the record


@pytest.mark.slow
def test_renamed_key_names_the_new_one_before_any_work(tmp_path: Path) -> None:
    """`model.num_shared` (renamed in issue 22): the CLI ends with the error naming the new
    key, before any process group or data work (no config.yaml in the run directory)."""
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "TRAINER_ERROR"))}
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.train", "model=smes", "model.num_shared=2", "logger=none",
         f"hydra.run.dir={run_dir}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: model.num_shared was renamed model.shared_top_k (issue 22); use model.shared_top_k=2"
    )
    assert not (run_dir / "config.yaml").exists()
