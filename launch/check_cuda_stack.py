"""Does the CUDA install path resolve, and do its torch, fbgemm-gpu and base image agree?

    python launch/check_cuda_stack.py [--json FILE]

Without installing anything and without a GPU:

1. reads the Dockerfile: the base image's CUDA version (`FROM nvidia/cuda:<X.Y.Z>-...`),
   the Python it installs (`python3.N`) and the package indexes its pip uses;
2. resolves `requirements/cuda.txt` (with `requirements/constraints.txt`, as the
   Dockerfile installs it) for Linux x86_64 and that Python with pip's resolver
   (`pip install --dry-run --report`, binary wheels only, the Dockerfile's indexes), and
   `requirements/torchrec.txt` without dependencies, as the Dockerfile does;
3. reads the CUDA major of the resolved torch from its wheel's requirements
   (`cuda-toolkit==X...` or `nvidia-cuda-runtime-cuX`, or a `+cuXY` local version) and
   the CUDA major fbgemm-gpu was built against from the wheel itself: the
   `libcudart.so.X` its extension libraries link, read from one small library of the
   zip by HTTP range requests (a few hundred KB, not the 500 MB wheel), together with
   fbgemm's own torch-compatibility table (`fbgemm_gpu/__init__.py`);
4. checks: the three CUDA majors agree (torch, fbgemm-gpu, base image), fbgemm's
   table names the resolved torch's minor version, torchrec resolves.

Exit status 0 when every check passes, 1 otherwise (each failure on its own line).
Needs the package index (PyPI) and the wheel host; `tests/launch/test_cuda_stack.py`
runs it (and the checks on recorded inputs, offline).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# pip as a fresh Docker build runs it: PyPI and the Dockerfile's indexes only, no local
# configuration (a machine's find-links or local indexes would offer its own wheels)
_LOCAL = ("PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX", "PIP_CONSTRAINT")
PIP_ENV = {k: v for k, v in os.environ.items() if k not in _LOCAL} | {
    "PIP_CONFIG_FILE": os.devnull,
    "DS_BUILD_OPS": "0",
}
# Linux x86_64 wheels the base image's glibc (2.39 on Ubuntu 24.04) can load: pip takes
# the tags it is given literally, so every manylinux level is listed
PLATFORMS = [f"manylinux_2_{v}_x86_64" for v in range(17, 40)] + [
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64",
]  # fmt: skip


@dataclass
class DockerTarget:
    """What the Dockerfile builds on."""

    base_image: str
    cuda: str  # X.Y.Z of the base image
    python: str  # N.M
    indexes: list[str] = field(default_factory=list)  # --index-url / --extra-index-url values

    @property
    def cuda_major(self) -> int:
        return int(self.cuda.split(".")[0])


def read_dockerfile(text: str) -> DockerTarget:
    """The base image, its CUDA version, the Python and the pip indexes of a Dockerfile."""
    base = re.search(r"^FROM\s+(\S+)", text, re.MULTILINE)
    if base is None:
        raise ValueError("Dockerfile: no FROM line")
    cuda = re.search(r"nvidia/cuda:(\d+\.\d+(?:\.\d+)?)", base.group(1))
    if cuda is None:
        raise ValueError(f"Dockerfile: the base image {base.group(1)} is not an nvidia/cuda:<version>-... image")
    python = re.search(r"\bpython(3\.\d+)\b", text)
    if python is None:
        raise ValueError("Dockerfile: no python3.N is installed")
    indexes = re.findall(r"--(?:extra-)?index-url[ =](\S+)", text)
    return DockerTarget(base_image=base.group(1), cuda=cuda.group(1), python=python.group(1), indexes=indexes)


def _pip_report(args: list[str], target: DockerTarget, *, no_deps: bool) -> list[dict]:
    """`install` entries of `pip install --dry-run --report` for the target (Linux x86_64, its Python)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [
            sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
            "--disable-pip-version-check", "--target", str(Path(tmp) / "target"), "--report", str(report),
            "--python-version", target.python,
        ]  # fmt: skip
        for platform in PLATFORMS:
            cmd += ["--platform", platform]
        for url in target.indexes:
            cmd += ["--extra-index-url", url]
        # pip allows a foreign platform with sdists only without dependencies
        cmd += ["--no-deps"] if no_deps else ["--only-binary=:all:"]
        proc = subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=ROOT, env=PIP_ENV)
        if proc.returncode != 0:
            tail = "\n".join(line for line in proc.stderr.splitlines() if "is ignored" not in line)[-3000:]
            raise RuntimeError(f"pip could not resolve {args} for Python {target.python} on Linux x86_64:\n{tail}")
        return json.loads(report.read_text())["install"]


def requirement_lines(path: Path) -> list[str]:
    """The requirement specifiers of a requirements file, `-r` includes expanded."""
    out = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.startswith("-r"):
            out += requirement_lines(path.parent / line[2:].strip())
        elif line:
            out.append(line)
    return out


def resolve(requirements: Path, constraints: Path, target: DockerTarget) -> tuple[list[dict], list[str]]:
    """The whole install of `requirements` with `constraints` for the target, as the
    Dockerfile runs it (binary wheels for the target's platform and Python).

    Pure-Python packages published as source only (DeepSpeed, antlr4 under Hydra) have
    no wheel to select for a foreign platform, so they are first built into wheels here
    (pure Python: `py3-none-any`, the same on any platform) and offered to the resolver
    beside the index. Returns the resolved entries and the source-only packages.
    """
    pins = requirement_lines(requirements) + requirement_lines(constraints)
    direct = _pip_report(pins, target, no_deps=True)
    source_only = [e for e in direct if not e["download_info"]["url"].endswith(".whl")]
    names = sorted(e["metadata"]["name"] for e in source_only)
    with tempfile.TemporaryDirectory() as wheels:
        if source_only:
            specs = [f"{e['metadata']['name']}=={e['metadata']['version']}" for e in source_only]
            cmd = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--disable-pip-version-check",
                   "-w", wheels, *specs]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, env=PIP_ENV)
            if proc.returncode != 0:
                raise RuntimeError(f"could not build the source-only packages {specs}:\n{proc.stderr[-3000:]}")
        args = [*requirement_lines(requirements), "-c", str(constraints), "--find-links", wheels]
        closure = _pip_report(args, target, no_deps=False)
    return closure, names


def torch_cuda_major(entry: dict) -> int | None:
    """The CUDA major a resolved torch wheel was built for, from its requirements or version."""
    meta = entry["metadata"]
    local = re.search(r"\+cu(\d+?)(\d)$", meta["version"])
    if local:
        return int(local.group(1))
    for req in meta.get("requires_dist") or []:
        m = re.match(r"cuda-toolkit\b.*?==\s*(\d+)\.", req) or re.match(r"nvidia-cuda-runtime-cu(\d+)\b", req)
        if m:
            return int(m.group(1))
    return None


class _HttpRange(io.RawIOBase):
    """A read-only, seekable file over HTTP range requests (for zipfile)."""

    def __init__(self, url: str) -> None:
        self.url, self.pos = url, 0
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=60) as resp:
            self.size = int(resp.headers["Content-Length"])
        self.fetched = 0

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: offset, 1: self.pos + offset, 2: self.size + offset}[whence]
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buf: Any) -> int:
        if self.pos >= self.size:
            return 0
        end = min(self.size, self.pos + len(buf)) - 1
        request = urllib.request.Request(self.url, headers={"Range": f"bytes={self.pos}-{end}"})
        with urllib.request.urlopen(request, timeout=120) as resp:
            data = resp.read()
        buf[: len(data)] = data
        self.pos += len(data)
        self.fetched += len(data)
        return len(data)


@dataclass
class FbgemmBuild:
    version: str
    cuda_major: int | None
    library: str  # the extension library read
    torch_compat: dict[str, str]  # fbgemm minor -> torch minor, fbgemm's own table
    bytes_fetched: int


def inspect_fbgemm(url: str) -> FbgemmBuild:
    """fbgemm-gpu's CUDA major (the libcudart it links) and torch table, from the wheel."""
    raw = _HttpRange(url)
    wheel = zipfile.ZipFile(io.BufferedReader(raw, buffer_size=1 << 16))
    version = re.search(r"fbgemm_gpu-([^-/]+)\.dist-info/", " ".join(wheel.namelist()))
    init = wheel.read("fbgemm_gpu/__init__.py").decode()
    table = dict(re.findall(r'"(\d+\.\d+)":\s*"(\d+\.\d+)"', init.split("_fbgemm_torch_compat_table", 1)[-1][:2000]))
    libraries = sorted((i for i in wheel.infolist() if i.filename.endswith(".so")), key=lambda i: i.compress_size)
    for info in libraries[:6]:  # the smallest libraries first; the config one links no CUDA runtime
        found = re.findall(rb"libcudart\.so\.(\d+)", wheel.read(info.filename))
        if found:
            return FbgemmBuild(version.group(1) if version else "?", int(found[0]), info.filename, table, raw.fetched)
    return FbgemmBuild(version.group(1) if version else "?", None, "", table, raw.fetched)


def checks(target: DockerTarget, torch_entry: dict, fbgemm: FbgemmBuild, torchrec: dict | None) -> list[str]:
    """The failures (empty: the stack agrees)."""
    failures = []
    torch_version = torch_entry["metadata"]["version"]
    torch_cuda = torch_cuda_major(torch_entry)
    if torch_cuda is None:
        failures.append(f"torch {torch_version}: no CUDA build was resolved (a CPU wheel?)")
    elif torch_cuda != target.cuda_major:
        failures.append(
            f"torch {torch_version} is built for CUDA {torch_cuda}, the Dockerfile's base image "
            f"{target.base_image} has CUDA {target.cuda}"
        )
    if fbgemm.cuda_major is None:
        failures.append(f"fbgemm-gpu {fbgemm.version}: no libcudart found (a CPU build?)")
    elif torch_cuda is not None and fbgemm.cuda_major != torch_cuda:
        failures.append(
            f"fbgemm-gpu {fbgemm.version} links CUDA {fbgemm.cuda_major}, torch {torch_version} CUDA {torch_cuda}"
        )
    minor = ".".join(fbgemm.version.split(".")[:2])
    want = fbgemm.torch_compat.get(minor)
    if want is None or not torch_version.startswith(want + "."):
        failures.append(f"fbgemm-gpu {fbgemm.version} is made for torch {want}, torch {torch_version} was resolved")
    if torchrec is None:
        failures.append("torchrec did not resolve")
    return failures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None, help="write the findings here")
    args = p.parse_args(argv)
    target = read_dockerfile((ROOT / "Dockerfile").read_text())
    resolved, source_only = resolve(ROOT / "requirements/cuda.txt", ROOT / "requirements/constraints.txt", target)
    by_name = {e["metadata"]["name"].lower().replace("_", "-"): e for e in resolved}
    torchrec = _pip_report(requirement_lines(ROOT / "requirements/torchrec.txt"), target, no_deps=True)
    fbgemm_entry = by_name.get("fbgemm-gpu")
    if "torch" not in by_name or fbgemm_entry is None:
        print(f"FAIL: requirements/cuda.txt resolved without torch or fbgemm-gpu: {sorted(by_name)}")
        return 1
    fbgemm = inspect_fbgemm(fbgemm_entry["download_info"]["url"])
    failures = checks(target, by_name["torch"], fbgemm, torchrec[0] if torchrec else None)
    findings = {
        "dockerfile": asdict(target),
        "torch": {"version": by_name["torch"]["metadata"]["version"], "cuda_major": torch_cuda_major(by_name["torch"])},
        "fbgemm_gpu": asdict(fbgemm),
        "torchrec": torchrec[0]["metadata"]["version"] if torchrec else None,
        "resolved": sorted(f"{e['metadata']['name']}=={e['metadata']['version']}" for e in resolved),
        "source_only": source_only,
        "failures": failures,
    }
    print(
        f"Dockerfile: {target.base_image} (CUDA {target.cuda}), Python {target.python}\n"
        f"torch {findings['torch']['version']} (CUDA {findings['torch']['cuda_major']}), fbgemm-gpu {fbgemm.version} "
        f"(links libcudart.so.{fbgemm.cuda_major}, read {fbgemm.library}, {fbgemm.bytes_fetched // 1024} KiB fetched; "
        f"made for torch {fbgemm.torch_compat.get('.'.join(fbgemm.version.split('.')[:2]))}), "
        f"torchrec {findings['torchrec']}; {len(resolved)} packages resolved"
    )
    for f in failures:
        print(f"FAIL: {f}")
    if args.json:
        Path(args.json).write_text(json.dumps(findings, indent=2))
    print("OK" if not failures else f"{len(failures)} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
