"""Smoke test of `python -m benchmarks.inference --quick`: JSON keys and sane values
(no timing assertions)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import inference


def test_quick_run_writes_rows_ratios_and_table(tmp_path: Path) -> None:
    out = tmp_path / "inference.json"
    inference.main(["--quick", "--out", str(out)])
    res = json.loads(out.read_text())
    for key in ("rows", "ratios", "mean_active", "table", "config", "environment"):
        assert key in res, key
    cfg = res["config"]
    rows = res["rows"]
    assert {(r["model"], r["batch"]) for r in rows} == {(m, b) for m in inference.MODELS for b in cfg["batches"]}
    for r in rows:
        assert r["E"] == 16 and r["iters"] >= cfg["min_iters"], r
        assert 0 < r["p50_ms"] <= r["p99_ms"] and r["samples_per_s"] > 0 and r["gflop"] > 0, r
    # mean |U| of progressive routing lies within its bounds K_s + K_a .. K_s + T*K_a
    mean_u = res["mean_active"]["16"]
    Ks, Ka = cfg["shared_top_k"], cfg["adaptive_top_k"]
    assert Ks + Ka <= mean_u <= Ks + cfg["tasks"] * Ka
    mmoe = [r for r in rows if r["model"] == "mmoe_equal_active"]
    assert all(r["mmoe_experts"] == round(mean_u) for r in mmoe)
    assert len(res["ratios"]) == len(cfg["batches"])
    for r in res["ratios"]:
        assert r["progressive_over_all_p50"] > 0 and r["progressive_over_mmoe_p99"] > 0
    assert res["table"].count("\n") == 1 + len(cfg["batches"])


def test_configurations_over_the_flop_budget_are_skipped(tmp_path: Path) -> None:
    res = inference.main(["--quick", "--max-gflop", "0.0001", "--batches", "1", "64"])
    skipped = {(r["model"], r["batch"]) for r in res["rows"] if "skipped" in r}
    assert ("smes_all", 64) in skipped and ("smes_progressive", 1) not in skipped
    assert all("p50_ms" not in r for r in res["rows"] if "skipped" in r)
