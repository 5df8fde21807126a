"""Smoke test of `python -m benchmarks.data_scale --quick`: real generation, loader bench,
2-rank torchrun training and evaluation at tiny sizes; JSON keys and sanity of the
figures (no timing assertions), then the data-set reuse rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import data_scale

LISTS = ("peak_rss_mb", "loader_rows_per_s", "trainer_samples_per_s", "loader_peak_rss_mb", "peak_rss_mb_wait4")
TARGETS = ("peak_rss_flat", "loader_5x_trainer", "eval_peak_per_rank", "eval_extra_per_rank")


@pytest.mark.slow
def test_quick_run_writes_the_figures_and_reuses_its_data(tmp_path: Path) -> None:
    out, root = tmp_path / "scale.json", tmp_path / "data"
    data_scale.main(["--quick", "--out", str(out), "--data-root", str(root)])
    res = json.loads(out.read_text())
    rows = res["rows"]
    assert rows == [20_000, 40_000]
    for key in LISTS:
        assert len(res[key]) == len(rows) and all(v > 0 for v in res[key]), key
    for peaks, wait4 in zip(res["peak_rss_mb_per_rank"], res["peak_rss_mb_wait4"], strict=True):
        assert len(peaks) == 2 and min(peaks) > 100  # a torch process; both ranks were found
        # the kernel's job-wide peak at exit bounds every polled one, up to the RSS counters
        # a thread caches before syncing them (64 pages each; seen: 0.25 MB under)
        assert wait4 >= 0.99 * max(peaks)
    for d in res["data"]:
        assert d["generated"] and d["train_files"] == 2 and d["row_groups"] == d["rows"] // 1000
    for key in ("eval_s", "eval_peak_rss_mb", "eval_extra_rss_mb"):
        assert set(res[key]) == {"exact", "distributed"} and all(v > 0 for v in res[key].values()), key
    assert res["eval"]["agree"] and res["eval_rows"] == 20_000
    assert set(res["targets"]) == set(TARGETS)
    assert all(isinstance(t["met"], bool) for t in res["targets"].values())
    flat = res["targets"]["peak_rss_flat"]
    assert flat["value"] == pytest.approx(res["peak_rss_mb"][-1] / res["peak_rss_mb"][0])
    per_rank_trainer = [t / 2 for t in res["trainer_samples_per_s"]]
    want = [lo / t for lo, t in zip(res["loader_rows_per_s"], per_rank_trainer, strict=True)]
    assert res["ratios"]["loader_over_trainer_per_rank"] == pytest.approx(want)
    # the same training config at every size: the commands differ in the data paths only
    a, b = (cmd.replace(f"rows_{n}", "rows_N") for cmd, n in zip(res["commands"]["train"], rows, strict=True))
    assert a.replace(res["config"]["run_root"], "") == b.replace(res["config"]["run_root"], "")
    assert "model=smes" in a and "trainer.batch_size=256" in a and "data=parquet_stream" in a

    args = data_scale.parse_args(["--quick", "--out", str(out), "--data-root", str(root)])
    assert not data_scale.ensure_dataset(args, 20_000)["generated"]  # reused, not written again
    args.split_rows = 3000
    with pytest.raises(ValueError, match="remove it or use another --data-root"):
        data_scale.ensure_dataset(args, 20_000)
