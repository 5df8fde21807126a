"""The CUDA install path (`launch/check_cuda_stack.py`): the Dockerfile, `requirements/cuda.txt`
and the wheels they resolve to agree on CUDA.

Offline: the checks on the real Dockerfile and on recorded wheel metadata (a CUDA 12
base image under a CUDA 13 torch, a CPU torch, an fbgemm-gpu of another CUDA or torch
release are each reported). Online: the real resolution from PyPI for the Dockerfile's
Python on Linux x86_64 passes; it is skipped only when PyPI cannot be reached.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "launch"))
from check_cuda_stack import FbgemmBuild, checks, read_dockerfile, torch_cuda_major  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def torch_entry(version: str, requires: list[str]) -> dict:
    return {"metadata": {"name": "torch", "version": version, "requires_dist": requires}}


CU13 = torch_entry("2.13.0", ['cuda-toolkit[cublas,cudart]==13.0.3; platform_system == "Linux"'])
FBGEMM_13 = FbgemmBuild("1.8.0", 13, "fbgemm_gpu/x.so", {"1.8": "2.13", "1.7": "2.12"}, 0)


def test_the_dockerfile_targets_cuda_13_and_python_311() -> None:
    target = read_dockerfile((ROOT / "Dockerfile").read_text())
    assert target.cuda_major == 13 and target.python == "3.11" and target.indexes == []


def test_torch_cuda_major_from_its_metadata() -> None:
    assert torch_cuda_major(CU13) == 13
    assert (
        torch_cuda_major(torch_entry("2.13.0", ["nvidia-cuda-runtime-cu12==12.8.90; platform_system == 'Linux'"])) == 12
    )
    assert torch_cuda_major(torch_entry("2.13.0+cu128", [])) == 12
    assert torch_cuda_major(torch_entry("2.13.0+cpu", ["sympy"])) is None


def test_checks_report_every_disagreement() -> None:
    target = read_dockerfile((ROOT / "Dockerfile").read_text())
    assert checks(target, CU13, FBGEMM_13, {"metadata": {}}) == []
    old = read_dockerfile("FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04\nRUN apt-get install python3.11\n")
    assert any("CUDA 13" in f and "12.8.1" in f for f in checks(old, CU13, FBGEMM_13, {}))
    cpu = checks(target, torch_entry("2.13.0+cpu", []), FBGEMM_13, {})
    assert any("no CUDA build" in f for f in cpu)
    fb12 = FbgemmBuild("1.8.0", 12, "x.so", {"1.8": "2.13"}, 0)
    assert any("links CUDA 12" in f for f in checks(target, CU13, fb12, {}))
    fb17 = FbgemmBuild("1.7.0", 13, "x.so", {"1.8": "2.13", "1.7": "2.12"}, 0)
    assert any("made for torch 2.12" in f for f in checks(target, CU13, fb17, {}))
    assert any("torchrec" in f for f in checks(target, CU13, FBGEMM_13, None))


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=10).close()
        return True
    except OSError:
        return False


@pytest.mark.slow
def test_the_cuda_stack_resolves_and_agrees(tmp_path: Path) -> None:
    if not _pypi_reachable():
        pytest.skip("pypi.org cannot be reached from this machine")
    out = tmp_path / "stack.json"
    proc = subprocess.run(
        [sys.executable, "launch/check_cuda_stack.py", "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "OK" in proc.stdout and "CUDA 13" in proc.stdout
