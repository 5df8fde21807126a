"""`benchmarks/capacity.py`: train sizes, the compared pairs, the MMoE expert count at
equal activated compute, the plot, and a `--quick` run end to end (real training and
scoring subprocesses; structure only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import capacity


def test_round_half_up() -> None:
    assert [capacity.round_half_up(x) for x in (3.49, 3.5, 5.96, 1.0)] == [3, 4, 6, 1]


def test_parse_size() -> None:
    assert capacity.parse_size("8000000") == (8_000_000, [])
    assert capacity.parse_size("1e6:data.train=[a.parquet] x=1") == (1_000_000, ["data.train=[a.parquet]", "x=1"])
    with pytest.raises(ValueError, match="ROWS"):
        capacity.parse_size("many:x=1")


def test_comparison_pairs() -> None:
    labels = ["progressive E=8", "progressive E=32", "progressive E=16", "mmoe n=6", "independent E=16",
              "independent E=64", "shared_bottom hidden=64,32", "shared_bottom hidden=256,128"]  # fmt: skip
    pairs = capacity.comparison_pairs(labels)
    assert pairs == [
        ("progressive E=16", "progressive E=8"), ("progressive E=32", "progressive E=16"),  # each doubling
        ("progressive E=8", "mmoe n=6"), ("progressive E=16", "mmoe n=6"), ("progressive E=32", "mmoe n=6"),
        ("independent E=16", "progressive E=16"),  # independent E=64 has no progressive partner
        ("shared_bottom hidden=256,128", "shared_bottom hidden=64,32"),
    ]  # fmt: skip


def _row(model: str, e: int | None, n: int, auc: float) -> dict:
    stat = {"mean": auc, "ci95": [auc - 0.01, auc + 0.01]}
    return {"label": f"{model} E={e}", "model": model, "E": e, "train_rows": n, "mean_auc": stat, "mean_gauc": None}


def test_plot_writes_png(tmp_path: Path) -> None:
    rows = [_row("progressive", 8, 1000, 0.9), _row("progressive", 16, 1000, 0.91), _row("mmoe", 6, 1000, 0.9),
            _row("independent", 16, 1000, 0.905), _row("progressive", 8, 8000, 0.92),
            _row("progressive", 16, 8000, 0.93)]  # fmt: skip
    capacity.plot(rows, tmp_path / "c.png", title="t")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_quick_run(tmp_path: Path) -> None:
    out, runs = tmp_path / "cap", tmp_path / "runs"
    argv = ["--data", "synthetic_clusters", "--recipe", "model=smes model.expert_hidden=[16,8]", "--experts", "4", "8",
            "--independent", "4", "--quick", "--out", str(out), "--runs", str(runs), "--bootstrap", "20",
            "--cluster-columns"]  # fmt: skip
    res = capacity.main(argv)
    labels = [r["label"] for r in res["runs"]]
    mmoe = next(r for r in res["rows"] if r["model"] == "mmoe")
    n = mmoe["E"]
    assert labels == ["progressive E=4", "progressive E=8", f"mmoe n={n}", "independent E=4"]
    assert all(r["ok"] and r["predictions"] for r in res["runs"])
    prog = [r for r in res["runs"] if r["label"].startswith("progressive")]
    assert n == capacity.round_half_up(sum(r["mean_active"] for r in prog) / len(prog))
    mmoe_cfg = (Path(res["runs"][2]["run_dir"]) / "config.yaml").read_text()
    assert f"num_experts: {n}" in mmoe_cfg and "- 16\n  - 8" in mmoe_cfg  # the SMES expert width
    data = json.loads((out / "scaling.json").read_text())
    row = data["rows"][0]
    assert {"model", "E", "train_rows", "seeds", "mean_auc", "mean_gauc", "activated_mflops"} <= set(row)
    assert row["model"] == "progressive" and row["E"] == 4 and row["seeds"] == [1]
    lo, hi = row["mean_auc"]["ci95"]
    assert lo <= row["mean_auc"]["mean"] <= hi
    assert row["rows_per_expert"] == pytest.approx(row["rows_seen"] * row["mean_active"] / 4)
    assert row["task_expert_nmi"] is not None
    pairs = {(c["a"], c["b"], c["metric"]) for c in data["comparisons"]}
    assert ("progressive E=8", "progressive E=4", "mean_auc") in pairs
    assert ("progressive E=4", f"mmoe n={n}", "mean_auc") in pairs
    assert ("independent E=4", "progressive E=4", "mean_auc") in pairs
    c = data["comparisons"][0]
    assert {"a", "b", "train_rows", "metric", "diff", "ci95", "significant"} <= set(c)
    assert "a - b [95% CI]" in (out / "scaling.md").read_text()
    assert (out / "scaling.png").exists()
    # aggregation alone reuses the runs
    again = capacity.main([*argv, "--no-train"])
    assert [r["label"] for r in again["rows"]] == [r["label"] for r in data["rows"]]
