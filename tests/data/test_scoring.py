"""Scoring other files (`score_files`): rows encoded exactly as the run's own data."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from data.build import build_dataset
from data.columns import Split
from data.sources.census import DEFAULT_DIR, CensusIncomeConfig
from data.sources.kuairand import KuaiRandConfig
from data.sources.synthetic import SyntheticConfig
from data.sources.tabular import TabularConfig

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "tests/fixtures/kuairand/kuairand1k_sample.csv"


def assert_rows_equal(scored: Split, rows_N: np.ndarray, split: Split, tasks: tuple[str, ...]) -> None:
    """`scored` rows `rows_N` hold exactly `split`'s encoded features and labels."""
    np.testing.assert_array_equal(scored.dense[rows_N], split.dense)
    for name, col in split.sparse.items():
        got = scored.sparse[name].take(rows_N)
        np.testing.assert_array_equal(got.values, col.values, err_msg=name)
        np.testing.assert_array_equal(got.offsets, col.offsets, err_msg=name)
    for t in tasks:
        np.testing.assert_array_equal(scored.labels[t][rows_N], split.labels[t])
    if split.user_id is not None:
        np.testing.assert_array_equal(scored.user_id[rows_N], split.user_id)


def test_census_scored_file_is_encoded_like_the_test_split(tmp_path: Path) -> None:
    with gzip.open(DEFAULT_DIR / "census-income.test.gz", "rt") as f:
        lines = [next(f) for _ in range(500)]
    new = tmp_path / "new.data"
    new.write_text("".join(lines))
    plain = build_dataset(CensusIncomeConfig(limit_rows=300))
    d = build_dataset(CensusIncomeConfig(limit_rows=300), score_files=[str(new)], keep_keys=True)
    assert d.scored is not None and len(d.scored) == 500 and d.scored_labels == ("income", "never_married")
    assert_rows_equal(d.scored, np.arange(300), d.test, d.spec.tasks)
    assert_rows_equal(d.scored, np.arange(300), plain.test, d.spec.tasks)  # training's own encoding
    assert d.scored.keys is not None and list(d.scored.keys["row"][:3]) == [1, 2, 3]
    assert d.test.keys is not None and plain.test.keys is None  # keys only when asked for
    vocab = d.info["vocab"]["education"]  # type: ignore[index]
    assert len(vocab) + 1 == d.spec.feature("education").num_embeddings


def _tabular(**kw: object) -> TabularConfig:
    base: dict = {
        "train": [str(SAMPLE)],
        "categorical": ["user_id", "video_id", "tab"],
        "dense": ["duration_ms"],
        "log1p": ["duration_ms"],
        "user_id": "user_id",
        "tasks": [
            {"name": "click", "column": "is_click"},
            {"name": "long_play", "column": "play_time_ms", "rule": ">= 18000"},
        ],
    }
    return TabularConfig(**{**base, **kw})


def test_tabular_scored_file_keeps_the_training_splits_and_vocabularies(tmp_path: Path) -> None:
    plain = build_dataset(_tabular())
    d = build_dataset(_tabular(), score_files=[str(SAMPLE)], keep_keys=True)
    assert d.scored is not None and len(d.scored) == 200 and d.scored_labels == ("click", "long_play")
    assert len(d.train) == len(plain.train) and d.spec == plain.spec
    assert d.test.keys is not None
    rows = d.test.keys["row"] - 1  # the test rows' positions in the file
    assert_rows_equal(d.scored, rows, plain.test, d.spec.tasks)
    raw = [ln.split(",")[0] for ln in SAMPLE.read_text().splitlines()[1:]]
    assert d.scored.keys is not None and d.scored.keys["user_id"].tolist() == [int(u) for u in raw]


def test_tabular_scored_file_without_label_or_user_columns(tmp_path: Path) -> None:
    lines = SAMPLE.read_text().splitlines()
    header = lines[0].split(",")
    keep = [i for i, c in enumerate(header) if c not in ("is_click", "user_id")]
    new = tmp_path / "new.csv"
    new.write_text("\n".join(",".join(ln.split(",")[i] for i in keep) for ln in lines[:21]) + "\n")
    with pytest.raises(ValueError, match=r"new.csv: no column\(s\) \['user_id'\]"):
        build_dataset(_tabular(), score_files=[str(new)])  # a feature column is needed
    d = build_dataset(_tabular(categorical=["video_id", "tab"]), score_files=[str(new)])
    assert d.scored is not None and d.scored_labels == ("long_play",) and d.scored.user_id is None
    assert d.scored.keys is not None and set(d.scored.keys) == {"file", "row"}


def test_tabular_scored_bad_row_errors_or_is_skipped(tmp_path: Path) -> None:
    lines = SAMPLE.read_text().splitlines()
    cells = lines[4].split(",")
    cells[lines[0].split(",").index("duration_ms")] = "x1"
    new = tmp_path / "bad.csv"
    new.write_text("\n".join([*lines[:4], ",".join(cells), *lines[5:40]]) + "\n")
    with pytest.raises(ValueError, match=r"bad.csv: row 4, column 'duration_ms': non-numeric value 'x1'"):
        build_dataset(_tabular(), score_files=[str(new)])
    d = build_dataset(_tabular(on_bad_row="skip"), score_files=[str(new)])
    assert d.scored is not None and d.scored.keys is not None
    assert len(d.scored) == 38 and 4 not in d.scored.keys["row"] and d.skipped_rows == 1


def test_kuairand_scored_logs_are_joined_and_encoded_like_training(tmp_path: Path) -> None:
    cfg = KuaiRandConfig(log_files=[str(SAMPLE)], split="fraction")
    plain = build_dataset(cfg)
    d = build_dataset(cfg, score_files=[str(SAMPLE)], keep_keys=True)
    assert d.scored is not None and d.scored_labels == plain.spec.tasks
    assert d.test.keys is not None and {"user_id", "video_id"} <= set(d.test.keys)
    assert_rows_equal(d.scored, d.test.keys["row"] - 1, plain.test, d.spec.tasks)
    full = build_dataset(cfg, score_files=[str(SAMPLE)]).scored
    assert full is not None
    lines = SAMPLE.read_text().splitlines()
    header = lines[0].split(",")
    for dropped, labelled in (({"is_click"}, ("long_view",)), ({"is_click", "play_time_ms"}, ())):
        keep = [i for i, c in enumerate(header) if c not in dropped]
        new = tmp_path / "log.csv"
        new.write_text("\n".join(",".join(ln.split(",")[i] for i in keep) for ln in lines[:11]) + "\n")
        d = build_dataset(cfg, score_files=[str(new)])
        assert d.scored is not None and len(d.scored) == 10 and d.scored_labels == labelled
        assert_rows_equal(d.scored, np.arange(10), full.take(np.arange(10)), labelled)


def test_synthetic_refuses_files() -> None:
    with pytest.raises(ValueError, match="cannot score other files"):
        build_dataset(SyntheticConfig(num_train=100, num_val=10, num_test=10), score_files=["x.csv"])
