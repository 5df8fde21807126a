"""The Dockerfile cannot be built here (no Docker engine): lint it, and check that it
installs the same pins and runs the same launcher as the CPU path."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    proc = subprocess.run([hadolint, "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_uses_cuda_pins_and_launcher() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "requirements/cuda.txt" in text and "--no-deps -r requirements/torchrec.txt" in text
    assert "launch/torchrun.sh" in text
    cuda = (ROOT / "requirements" / "cuda.txt").read_text()
    cpu = (ROOT / "requirements" / "cpu.txt").read_text()
    assert "fbgemm-gpu==1.8.0" in cuda and "fbgemm-gpu-cpu" not in cuda
    torch_pin = next(line for line in cpu.splitlines() if line.startswith("torch=="))
    assert torch_pin in cuda.splitlines()
