"""Smoke test of `python -m benchmarks.gpu --device cpu --quick`: it runs with torchrec,
fbgemm, hydra, omegaconf, wandb, numpy, pyarrow and the project's data / trainer /
parallel packages made unimportable (the GPU machine has only torch), imports nothing
beyond torch, its own dependencies, the standard library and the torch-only model
modules, and writes the documented JSON keys with sane values (no timing assertions).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BLOCKED = ("torchrec", "fbgemm_gpu", "hydra", "omegaconf", "wandb", "numpy", "deepspeed", "pyarrow", "pandas",
           "data", "trainer", "parallel")  # fmt: skip
MODEL_MODULES = {"model", "model.core", "model.smes", "model.moe", "model.moe.dispatch", "model.moe.experts",
                 "model.moe.grouped", "model.moe.host", "model.moe.losses", "model.moe.pairs", "model.moe.router",
                 "model.mlp"}  # fmt: skip
TRAINER_MODULES = {"trainer", "trainer.loss", "trainer.ema"}  # torch-only: the whole-step section uses them

RUNNER = """
import json, runpy, sys
BLOCKED = set(sys.argv[1].split(","))

ALLOWED = {"trainer", "trainer.loss", "trainer.ema"}

class Block:
    def find_spec(self, name, path=None, target=None):
        if name in ALLOWED:
            return None
        if name.split(".")[0] in BLOCKED or name == "model.build":
            raise ModuleNotFoundError(f"blocked for this test: {name}", name=name)
        return None

sys.meta_path.insert(0, Block())
import importlib.util
_find_spec = importlib.util.find_spec

def find_spec(name, package=None):  # probes (torch._dynamo's for numpy) see a blocked package as absent
    if name.split(".")[0] in BLOCKED and name not in ALLOWED:
        return None
    return _find_spec(name, package)

importlib.util.find_spec = find_spec
import torch
baseline = {m.split(".")[0] for m in sys.modules}
out, report = sys.argv[2], sys.argv[3]
sys.argv = ["benchmarks.gpu", "--device", "cpu", "--quick", "--out", out]
runpy.run_module("benchmarks.gpu", run_name="__main__")
new = sorted({m.split(".")[0] for m in sys.modules} - baseline - set(sys.stdlib_module_names))
model = sorted(m for m in sys.modules if m == "model" or m.startswith("model."))
trainer = sorted(m for m in sys.modules if m == "trainer" or m.startswith("trainer."))
json.dump({"new_top_level": new, "model_modules": model, "trainer_modules": trainer}, open(report, "w"))
"""


def torch_requirements() -> set[str]:
    """torch's requirements and theirs (what any torch install brings), as import names."""
    names: set[str] = set()
    todo = ["torch"]
    while todo:
        try:
            reqs = metadata.requires(todo.pop()) or []
        except metadata.PackageNotFoundError:
            continue
        for req in reqs:
            if "extra ==" in req:
                continue
            name = req.split(";")[0].split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip().lower()
            name = name.replace("-", "_")
            if name and name not in names:
                names.add(name)
                todo.append(name)
    return names


@pytest.mark.slow
def test_quick_cpu_run_with_only_torch(tmp_path: Path) -> None:
    out, report = tmp_path / "gpu.json", tmp_path / "imports.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", RUNNER, ",".join(BLOCKED), str(out), str(report)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    imports = json.loads(report.read_text())
    assert set(imports["model_modules"]) <= MODEL_MODULES, imports["model_modules"]
    assert set(imports["trainer_modules"]) <= TRAINER_MODULES, imports["trainer_modules"]
    allowed = {"model", "trainer", "benchmarks", "__mp_main__", *torch_requirements()}
    new = {m for m in imports["new_top_level"] if not m.startswith("_")}  # private modules torch generates
    assert new <= allowed, imports["new_top_level"]

    res = json.loads(out.read_text())
    for key in ("config", "environment", "peak_tflops_spec", "matmul", "rows", "summary", "notes", "elapsed_s"):
        assert key in res, key
    assert res["notes"] == []  # nothing skipped or failed
    assert res["matmul"]["ms"] > 0 and res["matmul"]["tflops"] > 0
    cfg = res["config"]
    modes = {(r["E"], r["mode"]) for r in res["rows"]}
    assert modes == {(e, m) for e in (4, 8) for m in ("progressive", "independent", "all")}
    for row in res["rows"]:
        assert row["step_ms"] > 0 and row["step_ms_min"] > 0 and row["iters"] >= 3
        assert 1 <= row["mean_U"] <= row["max_U"] <= row["U_bound"] <= row["E"]
        assert row["num_pairs"] == pytest.approx(row["mean_U"] * cfg["batch"])
        assert row["expert_tflops"] > 0 and 0 < row["mfu_vs_spec"] < 1 and row["mfu_vs_matmul"] > 0
        assert row["syncs_per_step"] is None and row["peak_mem_gb"] is None  # CUDA-only figures
        assert row["python_sync_points_per_step"] == (0 if row["mode"] == "all" else 1)
        if row["mode"] == "all":
            assert row["mean_U"] == row["E"]
        # the whole network step: slower than the core alone; bf16 kernel on fp32 weights casts them
        assert row["full_step_ms"] > 0 and row["full_step_over_core_step"] > 0
        if row["mode"] == "all":  # every expert on every row: no gather
            assert row["dispatch_row_bytes"] is None
        else:  # quick D = 37 -> bf16 rows padded to 40 (after the timed steps trained the router)
            assert row["dispatch_row_bytes"] > 0 and row["dispatch_row_bytes"] % (40 * 2) == 0
            # fp32 weights, bf16 kernel: the cast forward (2 bytes per value) and the gradient cast back (4)
            assert row["weight_cast_bytes"] == row["E"] * (37 * 32 + 32 * 16) * (2 + 4)
        if row["mode"] == "progressive":
            assert row["U_bound"] == min(row["E"], cfg["shared_top_k"] + cfg["tasks"] * cfg["adaptive_top_k"])
            for key in ("grouped_ms", "plain_matmul_ms", "loop_ms", "aligned_ms"):
                assert row[key] > 0, key  # quick D = 37 is unaligned: the padding cost is measured
            assert row["kernel_dtype"] == "bfloat16" and row["padding_cost"] > 0
            assert row["grouped_fraction_of_plain"] > 0 and row["grouped_speedup_over_loop"] > 0
    summary = res["summary"]
    assert summary["progressive_step_Emax_over_Emin"] > 0 and summary["max_python_sync_points_per_step"] == 1
    assert set(summary["all_over_progressive_step"]) == {"4", "8"}
