"""`benchmarks/capacity.py`: the MMoE expert count at equal activated compute, the plot,
and a `--quick` run end to end (real training subprocesses; structure only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import capacity


def test_round_half_up() -> None:
    assert [capacity.round_half_up(x) for x in (3.49, 3.5, 5.96, 1.0)] == [3, 4, 6, 1]


def _row(label: str, auc: float, flops: float) -> dict:
    stat = lambda v: {"mean": v, "std": 0.001, "n": 3}  # noqa: E731
    return {"label": label, "mean_auc": stat(auc), "mean_gauc": {"mean": None, "std": None, "n": 0},
            "expert_flops": stat(flops)}  # fmt: skip


def test_plot_writes_png(tmp_path: Path) -> None:
    rows = [_row("progressive E=8", 0.9, 1e6), _row("progressive E=16", 0.91, 1.1e6), _row("mmoe n=4", 0.9, 1e6),
            _row("independent E=16", 0.905, 2e6)]  # fmt: skip
    experts = {"progressive E=8": 8, "progressive E=16": 16, "mmoe n=4": 0, "independent E=16": 16}
    capacity.plot(rows, experts, tmp_path / "c.png", title="t")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_quick_run(tmp_path: Path) -> None:
    out = tmp_path / "cap"
    res = capacity.main(["--data", "synthetic", "--recipe", "model=smes model.expert_hidden=[16,8]", "--experts",
                         "4", "--independent", "4", "--quick", "--out", str(out)])  # fmt: skip
    labels = [r["label"] for r in res["runs"]]
    n = res["mmoe_experts"]
    assert labels == ["progressive E=4", f"mmoe n={n}", "independent E=4"] and all(r["ok"] for r in res["runs"])
    assert n == capacity.round_half_up(res["runs"][0]["mean_active"])
    mmoe_cfg = (Path(res["runs"][1]["run_dir"]) / "config.yaml").read_text()
    assert f"num_experts: {n}" in mmoe_cfg and "- 16\n  - 8" in mmoe_cfg  # the SMES expert width
    assert json.loads((out / "capacity.json").read_text())["mmoe_experts"] == n
    assert "MMoE experts: n = round-half-up" in (out / "capacity.md").read_text()
    assert (out / "capacity.png").exists()
