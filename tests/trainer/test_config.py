"""Every config group composes and validates; bad configs fail naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from trainer.config import RunConfig, build_run_config, validate_against_data

CONF = Path(__file__).resolve().parents[2] / "conf"


def compose_run(*overrides: str) -> RunConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    return build_run_config(cfg)


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_default_is_mmoe_on_census() -> None:
    run = compose_run()
    assert run.model.name == "mmoe" and run.data.name == "census_income"
    assert run.logger.name == "wandb" and run.logger.mode == "offline"


@pytest.mark.parametrize("model", group_options("model"))
def test_every_model_composes(model: str) -> None:
    assert compose_run(f"model={model}").model.name == model


@pytest.mark.parametrize("data", group_options("data"))
def test_every_data_source_composes(data: str) -> None:
    """A preset is its source's name, or names its source (kuairand_pure -> kuairand)."""
    assert compose_run(f"data={data}").data.name == OmegaConf.load(CONF / "data" / f"{data}.yaml").name


@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_every_experiment_composes(experiment: str) -> None:
    compose_run(f"experiment={experiment}")


def test_overrides_reach_typed_config() -> None:
    run = compose_run("model.num_experts=3", "trainer.steps=7", "parallel.embedding.sharding_type=row_wise")
    assert run.model.core.num_experts == 3 and run.trainer.steps == 7
    assert run.parallel.embedding.sharding_type == "row_wise"


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("+model.num_expertz=3", "num_expertz"),
        ("model.num_experts=abc", "num_experts"),
        ("trainer.optimizer=lamb", "trainer.optimizer"),
        ("trainer.steps=0", "trainer.steps"),
        ("parallel.embedding.sharding_type=diagonal", "parallel.embedding.sharding_type"),
        ("parallel.sparse_optimizer.name=lion", "parallel.sparse_optimizer.name"),
        ("model.name=transformer", "model.name"),
        ("logger.mode=sometimes", "logger.mode"),
    ],
)
def test_bad_config_names_the_key(override: str, key: str) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        compose_run(override)


def test_checks_against_data() -> None:
    run = compose_run("trainer.batch_size=1000")
    with pytest.raises(ValueError, match="trainer.batch_size"):
        validate_against_data(run, tasks=("income",), features=("sex",), world=3)
    run = compose_run()
    with pytest.raises(ValueError, match="income"):  # loaded data lacks a task the config uses
        run.trainer.task_weights = {"income": 2.0}
        validate_against_data(run, tasks=("never_married",), features=("sex",), world=1)
    run = compose_run("+parallel.embedding.tables.sex=row_wise")
    with pytest.raises(ValueError, match="sex"):
        validate_against_data(run, tasks=("income",), features=("age",), world=1)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (("+trainer.task_weights.incme=2.0",), "incme"),
        (("+parallel.embedding.tables.sexx=row_wise",), "sexx"),
        (("data=synthetic", "+trainer.task_weights.task9=1.0"), "task9"),
        (("data=synthetic", "data.num_sparse=2", "+parallel.embedding.tables.cat_2=row_wise"), "cat_2"),
        (("data=tabular", "+trainer.task_weights.click2=1.0"), "click2"),
        (("data=kuairand", "+trainer.task_weights.is_clik=1.0"), "is_clik"),
        (("model=smes", "model.task_weights=[1.0,1.0,1.0]"), "model.task_weights"),
        (("trainer.batch_size=1001",), "trainer.batch_size"),
        (("data.on_bad_row=drop",), "data.on_bad_row"),
    ],
)
def test_names_and_sizes_checked_before_any_data_work(overrides: tuple[str, ...], key: str, monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    # data files that do not exist: the error must come from the config, not from reading
    root = ("data.root=/nonexistent",) if not any(o.startswith("data=") for o in overrides) else ()
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        compose_run(*root, *overrides)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (("model=smes", "model.num_shared=10", "model.num_experts=8"), "model.num_shared"),
        (("model=smes", "model.routing=random"), "model.routing"),
        (("model=mmoe", "parallel.ep=2"), "parallel.ep"),
        (("model=smes", "model.num_experts=6", "parallel.ep=4"), "parallel.ep"),
    ],
)
def test_moe_config_errors_before_any_work(overrides: tuple[str, ...], key: str, monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        compose_run(*overrides)
