"""`python -m trainer.predict` through its launcher, on tiny runs trained by the real CLI."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.trainer.test_launch import launch

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "tests/fixtures/kuairand/kuairand1k_sample.csv"
CENSUS_TEST = ROOT / "data/files/census-income/census-income.test.gz"
TRAIN = ("logger=none", "trainer.progress=false", "trainer.eval_every=3", "trainer.steps=6")


def predict(*overrides: str, nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "NPROC": str(nproc), "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", "launch/predict.sh", "progress=false", *overrides],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.fixture(scope="module")
def census_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SMES on 2000 Census-Income rows, trained on 2 ranks; validation every 3 of 6 steps."""
    run_dir = tmp_path_factory.mktemp("census") / "run"
    ok(launch(run_dir, *TRAIN, "data.limit_rows=2000", "trainer.batch_size=128", "trainer.eval_batch_size=256",
              "model=smes", "model.num_experts=4", "model.expert_hidden=[16]", "model.tower.hidden=[8]"))  # fmt: skip
    return run_dir


@pytest.fixture(scope="module")
def tabular_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MMoE on the 200-row KuaiRand sample read as a table (`conf/data/tabular.yaml`)."""
    run_dir = tmp_path_factory.mktemp("tabular") / "run"
    ok(launch(run_dir, *TRAIN, "data=tabular", "trainer.batch_size=32", "model.num_experts=2", nproc=1))
    return run_dir


def assert_metrics_close(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for task, m in want.items():
        for key, value in m.items():
            if value is None:
                assert got[task][key] is None, (task, key)
            else:
                assert got[task][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (task, key)


@pytest.mark.slow
def test_test_split_at_one_and_two_ranks_matches_the_run(census_run: Path, tmp_path: Path) -> None:
    summary = json.loads((census_run / "summary.json").read_text())
    assert summary["best_step"] == 3 != summary["steps"]  # so best and last checkpoints differ
    tables = {}
    for nproc in (1, 2):
        out = tmp_path / f"w{nproc}.parquet"
        ok(predict(f"run_dir={census_run}", f"out={out}", nproc=nproc))
        table = pq.read_table(out)
        tables[nproc] = table
        assert table.num_rows == summary["eval"]["income"]["num_rows"] == 2000
        assert table.column_names == ["file", "row", "income", "never_married", "label_income",
                                      "label_never_married"]  # fmt: skip
        assert table["row"].to_pylist() == list(range(1, 2001))  # the test file's rows, in order
        for task in ("income", "never_married"):
            p = table[task].to_numpy()
            assert ((p > 0) & (p < 1)).all()
        record = json.loads(out.with_suffix(".metrics.json").read_text())
        assert record["step"] == summary["best_step"] and record["world_size"] == nproc
        assert_metrics_close(record["metrics"], summary["eval"])
    for name in tables[1].column_names:
        a, b = tables[1][name].to_numpy(), tables[2][name].to_numpy()
        if a.dtype.kind == "f":
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        else:
            assert (a == b).all(), name


@pytest.mark.slow
def test_last_checkpoint_gives_the_last_steps_metrics(census_run: Path) -> None:
    summary = json.loads((census_run / "summary.json").read_text())
    ok(predict(f"run_dir={census_run}", "checkpoint=last"))
    record = json.loads((census_run / "predictions/test.metrics.json").read_text())
    assert record["step"] == summary["steps"] and record["checkpoint"].endswith("step_00000006")
    assert_metrics_close(record["metrics"], summary["eval_last"])


@pytest.mark.slow
def test_files_are_encoded_like_the_training_data(census_run: Path, tmp_path: Path) -> None:
    """The test file's first 2000 rows as a file of their own score as the test split did."""
    with gzip.open(CENSUS_TEST, "rt") as f:
        rows = [next(f) for _ in range(2000)]
    new = tmp_path / "new.data"
    new.write_text("".join(rows))
    ok(predict(f"run_dir={census_run}", f"files=[{new}]", f"out={tmp_path / 'new.parquet'}", nproc=2))
    ok(predict(f"run_dir={census_run}", f"out={tmp_path / 'test.parquet'}"))
    scored, test = pq.read_table(tmp_path / "new.parquet"), pq.read_table(tmp_path / "test.parquet")
    assert scored["file"].to_pylist() == [str(new)] * 2000 and scored["row"].to_pylist() == list(range(1, 2001))
    for task in ("income", "never_married"):
        np.testing.assert_allclose(scored[task].to_numpy(), test[task].to_numpy(), rtol=1e-6, atol=1e-7)
        assert scored[f"label_{task}"].to_pylist() == test[f"label_{task}"].to_pylist()


@pytest.mark.slow
def test_tabular_files_broken_row_unlabelled_and_skip(tabular_run: Path, tmp_path: Path) -> None:
    lines = SAMPLE.read_text().splitlines()
    header = lines[0].split(",")
    cells = lines[7].split(",")
    cells[header.index("duration_ms")] = "abc"
    broken = tmp_path / "broken.csv"
    broken.write_text("\n".join([*lines[:7], ",".join(cells), *lines[8:60]]) + "\n")
    proc = predict(f"run_dir={tabular_run}", f"files=[{broken}]")
    assert proc.returncode != 0
    assert f"error: {broken}: row 7, column 'duration_ms': non-numeric value 'abc'" in proc.stderr

    ok(predict(f"run_dir={tabular_run}", f"files=[{broken}]", "data.on_bad_row=skip", nproc=2))
    table = pq.read_table(tabular_run / "predictions/broken.parquet")
    assert table.num_rows == 58 and 7 not in table["row"].to_pylist()
    assert json.loads((tabular_run / "predictions/broken.metrics.json").read_text())["skipped_rows"] == 1

    keep = [i for i, c in enumerate(header) if c not in ("is_click", "play_time_ms")]  # no label columns
    unlabelled = tmp_path / "unlabelled.csv"
    unlabelled.write_text("\n".join(",".join(ln.split(",")[i] for i in keep) for ln in lines[:31]) + "\n")
    ok(predict(f"run_dir={tabular_run}", f"files=[{unlabelled}]"))
    table = pq.read_table(tabular_run / "predictions/unlabelled.parquet")
    assert table.column_names == ["file", "row", "user_id", "click", "long_play"] and table.num_rows == 30
    assert not (tabular_run / "predictions/unlabelled.metrics.json").exists()
