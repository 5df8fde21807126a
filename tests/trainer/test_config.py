"""Every config group composes and validates; bad configs fail naming the key."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from trainer.config import (
    RENAMED_KEYS,
    RunConfig,
    build_run_config,
    load_saved_config,
    migrate_saved_config,
    validate_against_data,
)

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
        (("model=smes", "model.selection_weights=[1.0,1.0,1.0]"), "model.selection_weights"),
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
        (("model=smes", "model.shared_top_k=10", "model.num_experts=8"), "model.shared_top_k"),
        (("model=smes", "model.routing=random"), "model.routing"),
        (("model=mmoe", "parallel.ep=2"), "parallel.ep"),
        (("model=smes", "model.num_experts=6", "parallel.ep=4"), "parallel.ep"),
    ],
)
def test_moe_config_errors_before_any_work(overrides: tuple[str, ...], key: str, monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        compose_run(*overrides)


# -- keys renamed in issue 22 ------------------------------------------------------

RENAMED = [
    ("model.num_shared=2", "model.num_shared was renamed model.shared_top_k (issue 22); use model.shared_top_k=2"),
    ("model.num_adaptive=3",
     "model.num_adaptive was renamed model.adaptive_top_k (issue 22); use model.adaptive_top_k=3"),
    ("model.task_weights=[0.5,0.5]",
     "model.task_weights was renamed model.selection_weights (issue 22); use model.selection_weights=[0.5,0.5]"),
    ("parallel.capacity_factor=1.25",
     "parallel.capacity_factor was renamed model.capacity_factor (issue 22); use model.capacity_factor=1.25"),
    ("model.routing=dense", "model.routing=dense was renamed model.routing=all (issue 22); use model.routing=all"),
]  # fmt: skip


@pytest.mark.parametrize(("override", "message"), RENAMED)
def test_renamed_key_fails_naming_the_new_key(override: str, message: str, monkeypatch) -> None:
    """The old key is a null placeholder in conf/ (Hydra accepts the override); setting it
    fails before any data work (the data root does not exist) with the new key's name."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError) as err:
        compose_run("model=smes", "data.root=/nonexistent", override)
    assert str(err.value) == message


def test_renamed_keys_have_null_placeholders_and_the_new_keys_work() -> None:
    run = compose_run(
        "model=smes", "model.shared_top_k=1", "model.adaptive_top_k=2", "model.selection_weights=[0.25,0.75]",
        "model.capacity_factor=1.25",
    )  # fmt: skip
    core = run.model.core
    assert (core.shared_top_k, core.adaptive_top_k, core.selection_weights) == (1, 2, [0.25, 0.75])
    assert core.capacity_factor == 1.25 and compose_run("model=smes", "model.routing=all").model.core.routing == "all"
    assert not hasattr(run.parallel, "capacity_factor")
    assert not {"num_shared", "num_adaptive", "task_weights"} & {f.name for f in fields(core)}


def saved_config(run_dir: Path, *, old: bool, routing: str = "progressive") -> Path:
    """`run_dir/config.yaml` as training writes it (the resolved composed config): with
    `old`, as a run before issue 22 wrote it (the old keys and values, no new keys)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model=smes", "model.num_experts=8"])
    node = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(node, dict)
    if old:
        model = node["model"]
        for key in ("shared_top_k", "adaptive_top_k", "selection_weights", "capacity_factor"):
            del model[key]
        model.update(num_shared=1, num_adaptive=2, task_weights=[0.25, 0.75], routing=routing)
        node["parallel"]["capacity_factor"] = 1.25 if routing != "dense" else None
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(node))
    return run_dir / "config.yaml"


def test_old_saved_config_loads_with_its_keys_migrated(tmp_path: Path) -> None:
    """What `trainer.predict` / `trainer.export` read from an older run (restore.run_node,
    through `load_saved_config`), valid with the old values under the new keys."""
    from trainer.serving.restore import run_config, run_node

    path = saved_config(tmp_path / "old", old=True)
    with pytest.raises(ValueError, match=r"model\.num_shared was renamed"):  # as it is: refused
        build_run_config(OmegaConf.load(path))
    node = run_node(tmp_path / "old")
    assert "num_shared" not in node.model and "capacity_factor" not in node.parallel
    core = run_config(node, world_size=1).model.core
    assert (core.shared_top_k, core.adaptive_top_k, core.selection_weights) == (1, 2, [0.25, 0.75])
    assert core.capacity_factor == 1.25 and core.routing == "progressive"
    saved_config(tmp_path / "dense", old=True, routing="dense")
    core = run_config(run_node(tmp_path / "dense"), world_size=1).model.core
    assert core.routing == "all" and core.capacity_factor is None


def test_new_saved_config_passes_unchanged(tmp_path: Path) -> None:
    """A config written after the rename holds the null placeholders: they are dropped,
    nothing else changes."""
    path = saved_config(tmp_path, old=False)
    raw = OmegaConf.load(path)
    assert raw.model.num_shared is None and raw.parallel.capacity_factor is None
    migrated = load_saved_config(path)
    assert migrated is not raw and raw.model.num_shared is None  # a copy
    for section, key in (k.split(".") for k in RENAMED_KEYS):
        assert key not in migrated[section]
        del raw[section][key]
    assert OmegaConf.to_container(migrated) == OmegaConf.to_container(raw)
    assert migrate_saved_config(migrated) == migrated
