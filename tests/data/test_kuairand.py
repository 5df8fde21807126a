"""KuaiRand source: the shipped 200-row sample, and synthetic files of the real schema.

The synthetic files follow KuaiRand-1K's layout (two logs, user_features, a basic video
table and a statistic table split into two parts) with values that are functions of
the ids, so the join can be checked row by row.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from data.build import build_dataset, task_names
from data.columns import Dataset, Split
from data.sources.kuairand import DEFAULT_TASKS, KuaiRandConfig, kuairand_tasks, load_kuairand, long_view

SAMPLE = Path(__file__).resolve().parents[1] / "fixtures" / "kuairand" / "kuairand1k_sample.csv"

LOG_COLUMNS = [
    "user_id", "video_id", "date", "hourmin", "time_ms", "is_click", "is_like", "is_follow", "is_comment",
    "is_forward", "is_hate", "long_view", "play_time_ms", "duration_ms", "profile_stay_time",
    "comment_stay_time", "is_profile_enter", "is_rand", "tab",
]  # fmt: skip
DATES = ["20220408", "20220409", "20220410", "20220411", "20220412"]
NUM_USERS, MISSING_USER = 20, 19  # user 19 is absent from user_features
MISSING_BASIC = 29  # absent from the basic video table
MISSING_STAT = (28, 29)  # absent from both statistic parts
LAST_DAY_VIDEO = 31  # in every table, but only logged on the last date (unseen in train)
FLAG_RATES = {
    "is_click": 0.4,
    "is_like": 0.1,
    "is_follow": 0.05,
    "is_comment": 0.05,
    "is_forward": 0.05,
    "is_profile_enter": 0.1,
}


def _write(path: Path, header: list[str], rows: list[list[object]]) -> str:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def _log_rows(dates: list[str], rng: np.random.Generator, with_long_view: bool) -> list[list[object]]:
    rows = []
    for date in dates:
        for _ in range(40):
            user = int(rng.integers(NUM_USERS))
            video = LAST_DAY_VIDEO if date == DATES[-1] and rng.random() < 0.2 else int(rng.integers(30))
            duration = int(rng.choice([0, 7_000, 15_000, 30_000, 60_000]))
            play = int(rng.integers(0, 40_000))
            lv = int(play >= min(duration, 18_000)) if duration > 0 else int(play >= 18_000)
            flags = {t: int(rng.random() < p) for t, p in FLAG_RATES.items()}
            row = {
                **dict.fromkeys(LOG_COLUMNS, 0),
                **flags,
                "user_id": user,
                "video_id": video,
                "date": date,
                "hourmin": int(rng.integers(0, 2400)),
                "long_view": lv,
                "play_time_ms": play,
                "duration_ms": duration,
                "tab": int(rng.integers(3)),
            }
            rows.append([row[c] for c in LOG_COLUMNS if with_long_view or c != "long_view"])
    return rows


def _tags(video: int) -> str:
    """`video % 3` comma-separated tag ids (an empty cell for 0)."""
    return ",".join(str(video % 4 + j) for j in range(video % 3))


def write_kuairand(root: Path, *, with_long_view: bool = False, seed: int = 0) -> dict[str, object]:
    """KuaiRand-1K-like files in `root`; returns config kwargs naming them."""
    rng = np.random.default_rng(seed)
    header = [c for c in LOG_COLUMNS if with_long_view or c != "long_view"]
    logs = [
        _write(root / "log_standard_4_08_to_4_10.csv", header, _log_rows(DATES[:3], rng, with_long_view)),
        _write(root / "log_standard_4_11_to_4_12.csv", header, _log_rows(DATES[3:], rng, with_long_view)),
    ]
    degrees = ["high_active", "full_active", "middle_active", "UNKNOWN"]
    users = [
        [u, degrees[u % 4], u % 2, u % 3, "(0,10]" if u % 2 else "0", u * 3, u * 10 + 5, "730+", u % 5]
        for u in range(NUM_USERS)
        if u != MISSING_USER
    ]
    user_header = [
        "user_id", "user_active_degree", "is_lowactive_period", "onehot_feat1", "follow_user_num_range",
        "follow_user_num", "register_days", "register_days_range", "onehot_feat0",
    ]  # fmt: skip
    basic_header = [
        "video_id",
        "author_id",
        "video_type",
        "upload_type",
        "visible_status",
        "server_width",
        "tag",
    ]
    basic = [
        [v, v // 3, "AD" if v % 10 == 0 else "NORMAL", "ShortImport", 1, 100 + 10 * v, _tags(v)]
        for v in range(32)
        if v != MISSING_BASIC
    ]
    stat_header = ["video_id", "counts", "show_cnt", "play_cnt", "follow_user_num", "like_cnt"]
    stats = [[v, 10, v * 2.5, v, 0.0, ""] for v in range(32) if v not in MISSING_STAT]  # like_cnt empty
    return {
        "log_files": logs,
        "user_features": _write(root / "user_features_1k.csv", user_header, users),
        "video_features": [
            _write(root / "video_features_basic_1k.csv", basic_header, basic),
            _write(root / "video_features_statistic_1k_part1.csv", stat_header, stats[:15]),
            _write(root / "video_features_statistic_1k_part2.csv", stat_header, stats[15:]),
        ],
    }


def _raw_logs(files: list[str]) -> dict[str, np.ndarray]:
    tables = [pacsv.read_csv(p) for p in files]
    return {c: np.concatenate([t.column(c).to_numpy() for t in tables]) for c in tables[0].column_names}


def _dense(d: Dataset, split: Split, name: str) -> np.ndarray:
    i = d.spec.dense_names.index(name)
    stats = d.info["dense_stats"]
    return split.dense[:, i] * stats["std"][i] + stats["mean"][i]  # type: ignore[index]


# ------------------------------------------------------------------------------ sample


def test_sample_in_file_order() -> None:
    """No carve-out: train holds all 200 sample rows in file order."""
    d = load_kuairand(KuaiRandConfig(log_files=[str(SAMPLE)], split="fraction", val_fraction=0.0, test_fraction=0.0))
    raw = _raw_logs([str(SAMPLE)])
    assert len(d.train) == 200 and len(d.val) == len(d.test) == 0
    assert d.spec.tasks == ("is_click", "long_view") and d.info["derived_tasks"] == ["long_view"]
    play, duration = raw["play_time_ms"], raw["duration_ms"]
    expected = np.where(duration > 0, play >= np.minimum(duration, 18_000), play >= 18_000)
    assert (duration == 0).sum() == 18  # the sample does have unknown durations
    assert np.array_equal(d.train.labels["long_view"], expected.astype(np.float32))
    assert np.array_equal(d.train.labels["is_click"], raw["is_click"].astype(np.float32))
    assert np.array_equal(d.train.user_id, raw["user_id"])  # type: ignore[arg-type]
    names = set(d.spec.sparse_names) | set(d.spec.dense_names)
    assert {"user_id", "video_id", "tab", "user_active_degree", "onehot_feat17", "video_type"} <= set(
        d.spec.sparse_names
    )
    assert {"duration_ms", "register_days", "server_width"} <= set(d.spec.dense_names)
    assert not names & {"play_time_ms", "profile_stay_time", "comment_stay_time", "is_click"}  # no leakage
    # one id per distinct raw value
    assert d.spec.feature("user_id").num_embeddings == len(np.unique(raw["user_id"])) + 1
    same_user = raw["user_id"] == raw["user_id"][0]
    assert len(np.unique(d.train.sparse["user_id"].values[same_user])) == 1


def test_sample_default_split_and_registry() -> None:
    node = OmegaConf.merge(OmegaConf.structured(KuaiRandConfig), {"log_files": [str(SAMPLE)], "split": "fraction"})
    d = build_dataset(OmegaConf.to_object(node))
    assert (len(d.train), len(d.val), len(d.test)) == (160, 20, 20)
    for split in (d.train, d.val, d.test):
        for f in d.spec.sparse:
            ids = split.sparse[f.name].values
            assert ids.min() >= 0 and ids.max() < f.num_embeddings
        assert np.isfinite(split.dense).all()
    with pytest.raises(ValueError, match="no `date` column; set data.split=fraction"):
        load_kuairand(KuaiRandConfig(log_files=[str(SAMPLE)]))


def test_sample_requested_task_missing() -> None:
    with pytest.raises(ValueError, match="task 'is_like' is not a column of every log file"):
        load_kuairand(KuaiRandConfig(log_files=[str(SAMPLE)], split="fraction", tasks=["is_click", "is_like"]))


# --------------------------------------------------------------------- synthetic files


@pytest.fixture
def files(tmp_path: Path) -> dict[str, object]:
    return write_kuairand(tmp_path)


def _load(files: dict[str, object], **kw) -> Dataset:
    return load_kuairand(KuaiRandConfig(**{**files, "log1p_dense": False, **kw}))  # type: ignore[arg-type]


def test_tasks_and_long_view_derivation(files: dict[str, object]) -> None:
    d = _load(files)
    assert d.spec.tasks == DEFAULT_TASKS and d.info["derived_tasks"] == ["long_view"]
    raw = _raw_logs(files["log_files"])  # type: ignore[arg-type]
    train = ~np.isin(raw["date"].astype(str), DATES[-2:])
    expected = long_view(raw["play_time_ms"][train].astype(float), raw["duration_ms"][train].astype(float))
    assert np.array_equal(d.train.labels["long_view"], expected)
    for task in ("is_click", "is_like", "is_profile_enter"):
        assert np.array_equal(d.train.labels[task], raw[task][train].astype(np.float32))
    picked = _load(files, tasks=["is_like", "long_view"])
    assert picked.spec.tasks == ("is_like", "long_view")


def test_task_names_from_the_headers_equal_the_loaded_tasks(files: dict[str, object]) -> None:
    """`task_names` (what model.num_experts=auto counts) reads only the log headers and
    gives the tasks loading gives: all defaults here, two in the sample (no like column)."""
    for cfg in (
        KuaiRandConfig(**files),  # type: ignore[arg-type]
        KuaiRandConfig(**{**files, "tasks": ["is_like", "long_view"]}),  # type: ignore[arg-type]
        KuaiRandConfig(log_files=[str(SAMPLE)], split="fraction"),
    ):
        assert task_names(cfg) == kuairand_tasks(cfg) == load_kuairand(cfg).spec.tasks
    assert task_names(KuaiRandConfig(log_files=[str(SAMPLE)])) == ("is_click", "long_view")


def test_long_view_column_is_used_when_present(tmp_path: Path) -> None:
    d = load_kuairand(KuaiRandConfig(**write_kuairand(tmp_path, with_long_view=True)))  # type: ignore[arg-type]
    assert d.info["derived_tasks"] == [] and "long_view" in d.spec.tasks


def test_long_view_definition() -> None:
    play = np.array([5_000, 6_999, 7_000, 17_999, 18_000, 18_000, 20_000, 17_000, np.nan])
    duration = np.array([7_000, 7_000, 7_000, 60_000, 60_000, 0, np.nan, 0, 7_000])
    assert long_view(play, duration).tolist() == [0, 0, 1, 0, 1, 1, 1, 0, 0]


def test_date_split(files: dict[str, object]) -> None:
    d = _load(files)
    assert d.info["test_dates"] == [DATES[-1]] and d.info["val_dates"] == [DATES[-2]]
    assert d.info["train_dates"] == DATES[:3]
    assert (len(d.train), len(d.val), len(d.test)) == (120, 40, 40)
    two = _load(files, test_days=2, val_days=0, val_fraction=0.25)
    assert (len(two.train), len(two.val), len(two.test)) == (90, 30, 80)
    with pytest.raises(ValueError, match="leave no train date"):
        _load(files, test_days=3, val_days=2)


def test_join_and_missing_ids(files: dict[str, object]) -> None:
    d = _load(files)
    raw = _raw_logs(files["log_files"])  # type: ignore[arg-type]
    assert d.info["feature_sources"]["register_days"] == "user"  # type: ignore[index]
    assert d.info["feature_sources"]["show_cnt"] == "video1"  # type: ignore[index]
    assert d.info["feature_sources"]["duration_ms"] == "log"  # type: ignore[index]
    assert "follow_user_num" in d.spec.dense_names  # from the user table, not the statistic one
    assert d.info["rows_without_user_features"] == int((raw["user_id"] == MISSING_USER).sum()) > 0
    missing_video = d.info["rows_without_video_features"]
    assert missing_video[files["video_features"][0]] == int((raw["video_id"] == MISSING_BASIC).sum())  # type: ignore[index]
    stat_key = ",".join(files["video_features"][1:])  # type: ignore[arg-type]
    assert missing_video[stat_key] == int(np.isin(raw["video_id"], MISSING_STAT).sum())  # type: ignore[index]
    assert d.info["imputed_dense"]["like_cnt"] == len(raw["user_id"])  # type: ignore[index]

    rows_seen = 0
    for split in (d.train, d.val, d.test):
        user = split.user_id
        assert user is not None
        has_user = user != MISSING_USER
        np.testing.assert_allclose(_dense(d, split, "register_days")[has_user], user[has_user] * 10 + 5, rtol=1e-5)
        col = d.spec.dense_names.index("register_days")
        np.testing.assert_allclose(split.dense[~has_user, col], 0.0, atol=1e-6)  # imputed: train mean
        assert (split.sparse["user_active_degree"].values[~has_user] == 0).all()
        assert (split.sparse["user_active_degree"].values[has_user] > 0).all()

        width = np.rint(_dense(d, split, "server_width")).astype(int)
        col = d.spec.dense_names.index("server_width")
        no_basic = np.abs(split.dense[:, col]) < 1e-6
        video = (width - 100) // 10  # decodes the video id from the basic table
        tags = np.diff(split.sparse["tag"].offsets)
        assert np.array_equal(tags[~no_basic], video[~no_basic] % 3)
        assert (tags[no_basic] == 0).all() and (split.sparse["author_id"].values[no_basic] == 0).all()
        np.testing.assert_allclose(
            _dense(d, split, "show_cnt")[~no_basic & ~np.isin(video, MISSING_STAT)],
            video[~no_basic & ~np.isin(video, MISSING_STAT)] * 2.5,
            rtol=1e-5,
            atol=1e-4,
        )
        rows_seen += int(no_basic.sum())
    assert rows_seen == int((raw["video_id"] == MISSING_BASIC).sum())
    # a video only logged on the test date: no video_id embedding, but its table features
    last = d.test
    width = np.rint(_dense(d, last, "server_width")).astype(int)
    only_test = width == 100 + 10 * LAST_DAY_VIDEO
    assert only_test.any() and (last.sparse["video_id"].values[only_test] == 0).all()
    tag = last.sparse["tag"]
    tag_ids = [tag.values[tag.offsets[r] : tag.offsets[r + 1]].tolist() for r in np.flatnonzero(only_test)]
    assert all(len(t) == 1 and t[0] > 0 for t in tag_ids)  # its tag "3" is known from train


def test_log1p_dense(files: dict[str, object]) -> None:
    d = load_kuairand(KuaiRandConfig(**files))  # type: ignore[arg-type]
    user = d.train.user_id
    assert user is not None
    has_user = user != MISSING_USER
    np.testing.assert_allclose(
        _dense(d, d.train, "register_days")[has_user], np.log1p(user[has_user] * 10 + 5), rtol=1e-5
    )


def test_explicit_feature_lists(files: dict[str, object]) -> None:
    d = _load(
        files,
        log_categorical=["user_id", "video_id"],
        log_dense=[],
        user_categorical=["user_active_degree"],
        user_dense=[],
        video_categorical=["author_id"],
        video_multi_hot={"tag": ","},
        video_dense=["play_cnt"],
    )
    assert d.spec.sparse_names == ("user_id", "video_id", "user_active_degree", "author_id", "tag")
    assert d.spec.dense_names == ("play_cnt",)


def test_limit_rows(files: dict[str, object]) -> None:
    d = _load(files, limit_rows=50, split="fraction")
    assert len(d.train) + len(d.val) + len(d.test) == 100


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        ({"log_files": []}, ValueError, "data.log_files names no file"),
        ({"log_files": ["/nowhere/log.csv"]}, FileNotFoundError, "/nowhere/log.csv"),
        ({"user_features": "/nowhere/users.csv"}, FileNotFoundError, "/nowhere/users.csv"),
        ({"tasks": ["is_click", "watch_ratio"]}, ValueError, "task 'watch_ratio' is not a column"),
        (
            {"user_dense": ["age"]},
            ValueError,
            "data.user_dense: column 'age' is in none of .*user_features_1k.csv",
        ),
        ({"video_categorical": ["music_id"]}, ValueError, "column 'music_id' is in none of"),
        ({"video_dense": ["follow_user_num"]}, ValueError, r"\['follow_user_num'\] are selected twice"),
        ({"split": "random"}, ValueError, "data.split='random'"),
    ],
)
def test_config_errors(files: dict[str, object], kw: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        _load(files, **kw)


def test_long_view_not_derivable(tmp_path: Path) -> None:
    raw = _raw_logs([str(SAMPLE)])
    keep = ["user_id", "video_id", "is_click"]
    path = _write(tmp_path / "log.csv", keep, [list(r) for r in zip(*(raw[c] for c in keep), strict=True)])
    with pytest.raises(ValueError, match="long_view needs play_time_ms and duration_ms"):
        load_kuairand(KuaiRandConfig(log_files=[path], split="fraction", tasks=["long_view"]))
    d = load_kuairand(KuaiRandConfig(log_files=[path], split="fraction"))  # default tasks: filtered
    assert d.spec.tasks == ("is_click",)


def test_bad_label_names_file_row_column(files: dict[str, object]) -> None:
    second = Path(files["log_files"][1])  # type: ignore[index]
    lines = second.read_text().splitlines()
    cells = lines[3].split(",")
    cells[LOG_COLUMNS.index("is_like")] = "2"
    lines[3] = ",".join(cells)
    second.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"log_standard_4_11_to_4_12.csv: row 3, column 'is_like': label 2.0"):
        _load(files)


def test_duplicate_id_in_table(files: dict[str, object]) -> None:
    users = Path(files["user_features"])  # type: ignore[arg-type]
    lines = users.read_text().splitlines()
    users.write_text("\n".join([*lines, lines[2]]) + "\n")
    with pytest.raises(ValueError, match="user_id '1' appears twice"):
        _load(files)


# ----------------------------------------- file formats, delimiters, names, messages


def _sample_copies(root: Path) -> dict[str, str]:
    """The sample as tab-separated and Parquet files (the CSV has no quoted cells)."""
    tsv = root / "sample.tsv"
    tsv.write_text(SAMPLE.read_text().replace(",", "\t"))
    parquet = root / "sample.parquet"
    pq.write_table(pacsv.read_csv(SAMPLE), parquet)
    return {"tsv": str(tsv), "parquet": str(parquet)}


def _same(a: Dataset, b: Dataset) -> None:
    assert a.spec == b.spec
    for name in ("train", "val", "test"):
        x, y = a.split(name), b.split(name)
        np.testing.assert_allclose(x.dense, y.dense, rtol=1e-6)
        assert np.array_equal(x.user_id, y.user_id)  # type: ignore[arg-type]
        for k in x.sparse:
            assert np.array_equal(x.sparse[k].values, y.sparse[k].values), k
        for t in x.labels:
            assert np.array_equal(x.labels[t], y.labels[t]), t


@pytest.mark.parametrize("delimiter", ["\t", "\\t", "tab"])
def test_tab_separated_and_parquet_sample_match_csv(tmp_path: Path, delimiter: str) -> None:
    copies = _sample_copies(tmp_path)
    from_csv = load_kuairand(KuaiRandConfig(log_files=[str(SAMPLE)], split="fraction"))
    _same(from_csv, load_kuairand(KuaiRandConfig(log_files=[copies["tsv"]], split="fraction", delimiter=delimiter)))
    _same(from_csv, load_kuairand(KuaiRandConfig(log_files=[copies["parquet"]], split="fraction")))
    forced = load_kuairand(KuaiRandConfig(log_files=[copies["tsv"]], split="fraction", format="csv", delimiter="tab"))
    _same(from_csv, forced)


def test_parquet_logs_and_tables(files: dict[str, object], tmp_path: Path) -> None:
    """Every file of the synthetic KuaiRand-1K layout as Parquet: the same data set."""

    def to_parquet(path: str) -> str:
        out = tmp_path / (Path(path).stem + ".parquet")
        pq.write_table(pacsv.read_csv(path), out)
        return str(out)

    as_parquet = {
        "log_files": [to_parquet(p) for p in files["log_files"]],  # type: ignore[attr-defined]
        "user_features": to_parquet(files["user_features"]),  # type: ignore[arg-type]
        "video_features": [to_parquet(p) for p in files["video_features"]],  # type: ignore[attr-defined]
    }
    a, b = _load(files), _load(as_parquet)
    _same(a, b)
    assert b.info["train_dates"] == DATES[:3]  # int dates in Parquet read as yyyymmdd strings
    assert b.info["rows_without_user_features"] == a.info["rows_without_user_features"] > 0


def test_tab_separated_read_with_comma_names_columns_and_delimiter(tmp_path: Path) -> None:
    tsv = _sample_copies(tmp_path)["tsv"]
    hint = r"the columns they all have are \['user_id\\tvideo_id\\tis_click\\t.*set data.delimiter='\\t'"
    with pytest.raises(ValueError, match=r"none of the tasks \[.*\] is in the log files .*; " + hint):
        load_kuairand(KuaiRandConfig(log_files=[tsv], split="fraction"))
    with pytest.raises(ValueError, match=r"task 'is_click' is not a column of every log file .*; " + hint):
        load_kuairand(KuaiRandConfig(log_files=[tsv], split="fraction", tasks=["is_click"]))
    with pytest.raises(ValueError, match=r"no 'user_id' column to join .*; the log files have .*data.delimiter='\\t'"):
        load_kuairand(KuaiRandConfig(log_files=[tsv], user_features=str(SAMPLE), split="fraction"))


@pytest.mark.parametrize("delimiter", ["ab", "", "\\n", "\n", "tabs"])
def test_invalid_delimiter_names_the_key(delimiter: str) -> None:
    with pytest.raises(ValueError, match=r"data.delimiter=.* is not a field separator"):
        load_kuairand(KuaiRandConfig(log_files=[str(SAMPLE)], split="fraction", delimiter=delimiter))


def test_dataset_name_and_label_sources(files: dict[str, object]) -> None:
    d = build_dataset(KuaiRandConfig(**files))  # type: ignore[arg-type]
    assert d.spec.name == "kuairand"
    assert d.info["label_sources"]["is_click"] == "column 'is_click' (0 / 1)"  # type: ignore[index]
    assert d.info["label_sources"]["long_view"].startswith("play_time_ms >= min(duration_ms, 18000 ms)")  # type: ignore[index]
    assert set(d.info["label_stats"]["val"]) == set(DEFAULT_TASKS)  # type: ignore[arg-type]
    assert _load(files, dataset_name="kuairand_1k").spec.name == "kuairand_1k"


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"log_dense": ["play_time_ms"]}, "data.log_dense: column 'play_time_ms' is an outcome of the impression"),
        ({"log_categorical": ["user_id", "is_hate"]}, "data.log_categorical: column 'is_hate' is an interaction label"),
        ({"tasks": ["is_click"], "log_dense": ["is_click"]}, "column 'is_click' is a task label"),
    ],
)
def test_outcome_columns_are_never_features(files: dict[str, object], kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _load(files, **kw)


def test_format_option_overrides_the_extension(tmp_path: Path) -> None:
    odd = tmp_path / "sample.dat"
    odd.write_bytes(Path(_sample_copies(tmp_path)["parquet"]).read_bytes())
    from_csv = load_kuairand(KuaiRandConfig(log_files=[str(SAMPLE)], split="fraction"))
    _same(from_csv, load_kuairand(KuaiRandConfig(log_files=[str(odd)], split="fraction", format="parquet")))


def test_dates_order_as_integers(tmp_path: Path) -> None:
    """Unpadded day numbers (8, 9, 10, 11) sort as numbers: the test date is 11, not 9."""
    rows = [[u, u % 3, day, u % 2] for day in (10, 8, 11, 9) for u in range(10)]
    log = _write(tmp_path / "log.csv", ["user_id", "video_id", "date", "is_click"], rows)
    d = load_kuairand(KuaiRandConfig(log_files=[log]))
    assert (d.info["train_dates"], d.info["val_dates"], d.info["test_dates"]) == (["8", "9"], ["10"], ["11"])
    assert (len(d.train), len(d.val), len(d.test)) == (20, 10, 10)
