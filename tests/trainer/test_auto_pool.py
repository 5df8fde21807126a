"""`model.num_experts=auto`, the SMES default: the smallest power of two that holds every
expert one instance can run, a multiple of `parallel.ep`, resolved from the data
config's task count before any work and saved resolved in `RUN/config.yaml`."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from model.smes import auto_num_experts
from trainer.config import build_run_config, resolve_num_experts, saved_config_yaml

CONF = Path(__file__).resolve().parents[2] / "conf"


def composed(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_auto_pool_against_enumeration() -> None:
    """Against a brute-force reference: the first power of two at or above the instance's
    expert bound, then the first multiple of `multiple_of` at or above that."""
    for k_s, k_a, t, routing, m in itertools.product(
        range(4), range(4), range(1, 9), ("progressive", "independent", "all"), (1, 2, 3, 4, 8)
    ):
        bound = t * (k_s + k_a) if routing == "independent" else k_s + t * k_a
        power = next(p for p in (2**i for i in range(12)) if p >= bound)
        want = next(n for n in range(power, 10 * power) if n % m == 0)
        got = auto_num_experts(shared_top_k=k_s, adaptive_top_k=k_a, num_tasks=t, routing=routing, multiple_of=m)
        assert got == want, (k_s, k_a, t, routing, m)


@pytest.mark.parametrize(
    ("overrides", "world", "pool"),
    [
        (("model=smes",), 1, 4),  # census_income: 2 tasks, K_s + T K_a = 4
        (("model=smes", "data=capacity_logs"), 1, 8),  # 4 tasks: 6 -> 8
        (("model=smes", "data=kuairand_pure"), 1, 8),  # 6 tasks: 8
        (("model=smes", "data=kuairand"), 1, 4),  # tasks=null: the 2 of the defaults its log files have
        (("model=smes", "data=kuairand", "data.tasks=[is_click,long_view,is_like]"), 1, 8),
        (("model=smes", "model.routing=independent"), 1, 8),  # T (K_s + K_a) = 6 -> 8
        (("model=smes", "model.shared_top_k=1", "model.adaptive_top_k=3"), 1, 8),  # 7 -> 8
        (("model=smes", "parallel.ep=8"), 8, 8),  # 4, raised to a multiple of ep
        (("model=smes", "parallel.ep=3", "trainer.batch_size=1020"), 3, 6),
        (("model=smes", "model.num_experts=32"), 1, 32),  # a number is kept
        (("experiment=census_smes",), 1, 4),
        (("experiment=kuairand_smes",), 1, 64),
    ],
)
def test_resolved_from_the_config(overrides: tuple[str, ...], world: int, pool: int) -> None:
    cfg = composed(*overrides)
    assert build_run_config(cfg, world_size=world).model.core.num_experts == pool
    saved = OmegaConf.create(saved_config_yaml(cfg))
    assert saved.model.num_experts == pool  # what predict, export, warm start and the benchmarks read
    assert build_run_config(saved, world_size=world).model.core.num_experts == pool


def test_the_composed_config_is_not_changed() -> None:
    cfg = composed("model=smes")
    assert cfg.model.num_experts == "auto"
    assert resolve_num_experts(cfg).model.num_experts == 4 and cfg.model.num_experts == "auto"
    mmoe = composed("model=mmoe")
    assert resolve_num_experts(mmoe) is mmoe and mmoe.model.num_experts == 8


@pytest.mark.parametrize(
    ("override", "key"),
    [("model.num_experts=many", "model.num_experts"), ("model.shared_top_k=two", "model.shared_top_k")],
)
def test_a_bad_value_names_its_key(override: str, key: str) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build_run_config(composed("model=smes", override))
