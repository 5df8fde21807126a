"""Smoke test of `python -m benchmarks.expert_parallel`: tiny sizes, every mode, JSON keys
and the all-to-all byte accounting (deterministic; no timing assertions)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import expert_parallel

KEYS = (
    "ep1_samples_per_s",
    "ep2_samples_per_s",
    "deepspeed_moe_samples_per_s",
    "a2a_bytes_per_step",
    "a2a_min_bytes_per_step",
    "dispatch_combine_share",
)


@pytest.mark.slow
def test_benchmark_entry_point_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "ep.json"
    argv = ["--out", str(out), "--experts", "4", "--in-dim", "16", "--hidden", "16", "--batch", "64"]
    expert_parallel.main([*argv, "--steps", "2", "--warmup", "1", "--timeout", "600"])
    res = json.loads(out.read_text())
    for key in KEYS:
        assert res[key] is not None and res[key] > 0, key
    for key in ("config", "environment", "ep1", "ep2", "deepspeed"):
        assert key in res
    assert len(res["ep2"]["step_ms_per_step"]) == 2
    # every remote pair crosses the wire 4 times (D out, H back, H grad out, D grad back)
    assert res["ep2"]["remote_pairs_per_step"] > 0
    assert res["a2a_bytes_per_step"] >= res["a2a_min_bytes_per_step"] > 0
    assert res["ep2"]["a2a_payload_equals_min_every_step"]
    assert res["a2a_bytes_over_min"] <= 1.1
    assert 0 < res["dispatch_combine_share"] < 1
