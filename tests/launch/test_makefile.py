"""`make train` runs the census_mmoe recipe unless ARGS picks experiment=, model= or data=
(README quick start); checked on the command make would run (`make -n`)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def train_command(*make_args: str) -> str:
    out = subprocess.run(["make", "-n", "-s", "-C", str(ROOT), *make_args, "train"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    (line,) = [ln for ln in out.stdout.splitlines() if "launch/torchrun.sh" in ln]
    return line.split("launch/torchrun.sh", 1)[1].strip()


@pytest.mark.parametrize(
    ("make_args", "expected"),
    [
        ((), "experiment=census_mmoe"),
        (("ARGS=logger=none trainer.steps=10",), "experiment=census_mmoe logger=none trainer.steps=10"),
        (("ARGS=model.num_experts=16",), "experiment=census_mmoe model.num_experts=16"),
        (("ARGS=model=ple trainer.steps=10",), "model=ple trainer.steps=10"),
        (("ARGS=data=synthetic",), "data=synthetic"),
        (("ARGS=experiment=census_smes",), "experiment=census_smes"),
        (("EXPERIMENT=",), ""),
        (("EXPERIMENT=kuairand_smes",), "experiment=kuairand_smes"),
    ],
)
def test_default_recipe_unless_args_choose(make_args: tuple[str, ...], expected: str) -> None:
    assert train_command(*make_args) == expected


def test_the_default_recipe_exists() -> None:
    assert (ROOT / "conf" / "experiment" / "census_mmoe.yaml").is_file()
