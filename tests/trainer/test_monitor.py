"""Monitoring: expert-load heatmap / histogram from metrics.jsonl, the step-time split,
W&B vectors as histograms, and a real run whose offline W&B history holds the keys."""

from __future__ import annotations

import glob
import json
import logging
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from tests.trainer.test_launch import launch
from trainer.reporting import monitor
from trainer.reporting.logger import MAX_HISTOGRAM_BINS, _for_wandb
from trainer.timer import StepTimer

TASKS = ("ctr", "like")


def write_metrics(run_dir: Path, *, num_experts: int, num_windows: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    lines = []
    for w in range(num_windows):
        counts = rng.integers(0, 50, size=(len(TASKS), num_experts)).astype(float)
        counts[:, 0] = 0  # a dead expert
        per_task = {t: (c / c.sum()).tolist() for t, c in zip(TASKS, counts, strict=True)}
        pooled = (counts.sum(0) / counts.sum()).tolist()
        lines.append(
            {
                "step": 10 * (w + 1),
                "loss/total": 1.0,
                "experts/selection_fraction": pooled,
                "experts/selection_fraction_per_task": per_task,
            }
        )
    lines.append({"step": 10 * num_windows, "val/ctr/auc": 0.7})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 99, "tor')


def test_heatmap_and_histogram_from_synthetic_metrics(tmp_path: Path) -> None:
    write_metrics(tmp_path, num_experts=6, num_windows=5)
    steps_S, pooled_SE, per_task = monitor.expert_history(monitor.read_records(tmp_path / "metrics.jsonl"))
    assert steps_S.tolist() == [10, 20, 30, 40, 50] and pooled_SE.shape == (5, 6) and set(per_task) == set(TASKS)

    paths = monitor.write_plots(tmp_path)
    assert paths == [tmp_path / monitor.HEATMAP, tmp_path / monitor.HISTOGRAM]
    heatmap, hist = imread(paths[0]), imread(paths[1])
    assert heatmap.shape[0] > 400 and heatmap.shape[1] > 800  # three panels: pooled + 2 tasks
    assert hist.shape[1] > 800 and hist.std() > 0.05  # not a blank image


def test_many_experts_and_windows(tmp_path: Path) -> None:
    write_metrics(tmp_path, num_experts=128, num_windows=monitor.MAX_COLUMNS + 150)
    assert len(monitor.write_plots(tmp_path)) == 2


def test_dense_runs_and_plot_failures_only_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss/total": 0.5}) + "\n")
    assert monitor.write_plots(tmp_path) == []  # MMoE & co: no expert records, no plot
    assert not (tmp_path / monitor.HEATMAP).exists()
    with caplog.at_level(logging.WARNING, logger="trainer"):
        assert monitor.write_plots(tmp_path / "missing") == []
    assert "expert-load plots not written" in caplog.text


def test_step_time_window_split() -> None:
    timer = StepTimer(torch.device("cpu"))
    for _ in range(4):
        timer.start()
        timer.lap("data")
        with timer.part("comm"):
            pass
        timer.lap("forward")
    timer.resolve()  # fold the measured laps in, then replace them by known totals
    timer.totals.update(data=0.4, forward=0.8)  # 100 ms and 200 ms per step
    first = timer.window_ms()
    assert first["data"] == pytest.approx(100.0) and first["forward"] == pytest.approx(200.0)
    assert set(first) == {"data", "forward", "backward", "optimizer", "comm"} and first["backward"] == 0.0
    timer.start()
    timer.totals["data"] += 0.05
    assert timer.window_ms()["data"] == pytest.approx(50.0)  # only the new window


def test_vectors_become_wandb_histograms() -> None:
    import wandb

    frac = [0.5, 0.25, 0.25, 0.0]
    metrics = {"loss/total": 1.0, "flag": True, "experts/selection_fraction": frac}
    metrics |= {"experts/selection_fraction_per_task": {"ctr": frac}, "big": [1.0] * (MAX_HISTOGRAM_BINS + 1)}
    out = _for_wandb(metrics)
    assert out["loss/total"] == 1.0 and "flag" not in out
    hist = out["experts/selection_fraction"]
    assert isinstance(hist, wandb.Histogram) and hist.histogram == frac and hist.bins == [0, 1, 2, 3, 4]
    assert isinstance(out["experts/selection_fraction_per_task/ctr"], wandb.Histogram)
    assert len(out["big"].histogram) == 64


def wandb_history_keys(run_dir: Path) -> set[str]:
    """Keys of the history records in the offline run's `.wandb` file (LevelDB-log framing:
    a 7-byte file header, then 32 KiB blocks of chunks `crc32 | length u16 | type u8`)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "*.wandb"))
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"

    def records() -> Iterator[bytes]:
        pos, block, chunks = 7, 32768, b""
        while pos + 7 <= len(data):
            if block - pos % block < 7:  # block trailer too short for a header: padding
                pos += block - pos % block
                continue
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            if length == 0 and kind == 0:
                break
            chunks += data[pos + 7 : pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # FULL or LAST
                yield chunks
                chunks = b""

    keys = set()
    for raw in records():
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            keys.update(item.key or "/".join(item.nested_key) for item in record.history.item)
    return keys


@pytest.mark.slow
def test_real_run_monitoring_to_files_and_wandb_offline(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = launch(run_dir, "model=smes", "model.num_experts=4", "data.limit_rows=3000", "trainer.steps=6",
                  "trainer.batch_size=64", "trainer.log_every=2", "logger=wandb", "logger.mode=offline")  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert imread(run_dir / monitor.HEATMAP).shape[0] > 300 and (run_dir / monitor.HISTOGRAM).exists()

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss/total" in r]
    assert [r["step"] for r in train] == [2, 4, 6]
    for key in ("time/data_ms", "time/forward_ms", "time/backward_ms", "time/optimizer_ms", "time/comm_ms"):
        assert all(r[key] >= 0 for r in train), key
    assert len(train[-1]["experts/selection_fraction"]) == 4

    expected = {
        "loss/income", "loss/never_married", "loss/aux", "loss/total", "lr", "train/samples_per_s",
        "time/data_ms", "time/forward_ms", "time/backward_ms", "time/optimizer_ms", "time/comm_ms",
        "experts/load_cv", "experts/max_over_mean_load", "experts/dead_experts",
        "experts/mean_active_per_instance", "experts/max_active_per_instance", "experts/fraction/e003",
        "experts/selection_fraction/values", "experts/selection_fraction_per_task/income/values",
        "val/income/auc", "val/never_married/ne", "test/income/auc", "test/never_married/ne",
        "plots/expert_load_heatmap/path", "plots/expert_load_hist/path",
    }  # fmt: skip
    keys = wandb_history_keys(run_dir)
    assert expected <= keys, sorted(expected - keys)
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    assert len(list((offline / "files" / "media" / "images").rglob("*.png"))) == 2
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["wandb_dir"] == str(offline)
