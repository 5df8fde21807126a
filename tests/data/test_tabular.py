"""Generic tabular source: CSV and Parquet, rule labels, multi-hot, carve-out, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from data.build import build_dataset
from data.columns import Split
from data.sources.tabular import Rule, TabularConfig, apply_rule, load_tabular, parse_rule, tabular_names

HEADER = ["row", "user", "item.id", "tags", "price", "rating", "clicked", "action"]
ACTIONS = ["view", "buy", "cart", "view", "share"]


def _rows(start: int, num: int, *, item_offset: int = 0) -> list[list[str]]:
    """Rows whose cells are functions of the row number (so results can be checked)."""
    out = []
    for r in range(start, start + num):
        tags = "|".join(f"t{(r + j) % 7}" for j in range(r % 4))  # 0..3 tags, empty cell for 0
        out.append(
            [
                str(r),
                f"u{r % 5}",
                f"i{(r % 9) + item_offset}",
                tags,
                f"{r * 1.5:.2f}",
                str(1 + r % 5),
                str(r % 2),
                ACTIONS[r % 5],
            ]
        )
    return out


def _csv(path: Path, rows: list[list[str]], header: list[str] = HEADER, sep: str = ",") -> str:
    lines = [sep.join(header)] + [sep.join(f'"{c}"' if sep in c else c for c in r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _parquet(path: Path, rows: list[list[str]], *, list_tags: bool = False) -> str:
    cols = list(zip(*rows, strict=True))
    data = {
        "row": pa.array([int(v) for v in cols[0]]),
        "user": pa.array(cols[1]),
        "item.id": pa.array(cols[2]),
        "tags": pa.array([v.split("|") if v else [] for v in cols[3]]) if list_tags else pa.array(cols[3]),
        "price": pa.array([float(v) for v in cols[4]]),
        "rating": pa.array([int(v) for v in cols[5]], pa.int32()),
        "clicked": pa.array([int(v) for v in cols[6]]),
        "action": pa.array(cols[7]),
    }
    pq.write_table(pa.table(data), path)
    return str(path)


TASKS = [
    {"name": "click", "column": "clicked"},
    {"name": "like", "column": "rating", "rule": ">= 4"},
    {"name": "convert", "column": "action", "rule": "in [buy, 'cart']"},
]


def _cfg(**kw) -> TabularConfig:
    base = dict(
        categorical=["user", "item.id"],
        multi_hot={"tags": "|"},
        dense=["row", "price"],
        user_id="user",
        tasks=TASKS,
    )
    return TabularConfig(**{**base, **kw})


def _raw_rows(split: Split, stats: dict) -> np.ndarray:
    """The `row` dense column, un-standardised."""
    return np.rint(split.dense[:, 0] * stats["std"][0] + stats["mean"][0]).astype(int)


def _check_rows(split: Split, rows: np.ndarray) -> None:
    """Labels and sparse columns agree with the generating formulas."""
    assert split.labels["click"].tolist() == (rows % 2).tolist()
    assert split.labels["like"].tolist() == ((1 + rows % 5) >= 4).tolist()
    assert split.labels["convert"].tolist() == [ACTIONS[r % 5] in ("buy", "cart") for r in rows]
    assert np.diff(split.sparse["tags"].offsets).tolist() == (rows % 4).tolist()
    assert split.user_id is not None


def test_csv_with_val_and_test_files(tmp_path: Path) -> None:
    train = _csv(tmp_path / "train.csv", _rows(0, 60))
    val = _csv(tmp_path / "val.csv", _rows(60, 20))
    test = _csv(tmp_path / "test.csv", _rows(80, 20, item_offset=100))  # items unseen in train
    d = load_tabular(_cfg(train=[train], val=[val], test=[test]))
    assert (len(d.train), len(d.val), len(d.test)) == (60, 20, 20)
    assert d.spec.sparse_names == ("user", "item_id", "tags")  # `.` is not allowed in a table name
    assert [f.multi_hot for f in d.spec.sparse] == [False, False, True]
    assert d.spec.feature("user").num_embeddings == 6 and d.spec.feature("item_id").num_embeddings == 10
    assert d.spec.feature("tags").num_embeddings == 8
    assert d.spec.tasks == ("click", "like", "convert") and d.spec.has_user_id
    stats = d.info["dense_stats"]
    for split, start in ((d.train, 0), (d.val, 60), (d.test, 80)):
        rows = _raw_rows(split, stats)  # type: ignore[arg-type]
        assert rows.tolist() == list(range(start, start + len(split)))
        _check_rows(split, rows)
    assert (d.test.sparse["item_id"].values == 0).all()  # vocabulary from train only
    assert (d.train.sparse["item_id"].values > 0).all()
    # same value -> same id, across splits
    user_ids = {}
    for split in (d.train, d.val, d.test):
        for uid, sid in zip(split.user_id, split.sparse["user"].values, strict=True):  # type: ignore[arg-type]
            assert user_ids.setdefault(sid, uid) == uid
    # a tag id is stable across rows: rows 3 (t3 t4 t5) and 10 (t3 t4) share t3
    tags = d.train.sparse["tags"]
    ids_of_row = {r: tags.values[tags.offsets[r] : tags.offsets[r + 1]].tolist() for r in range(60)}
    assert ids_of_row[3][0] == ids_of_row[10][0]  # both start with t3
    assert ids_of_row[0] == [] and len(ids_of_row[3]) == 3 and 0 not in ids_of_row[3]


def test_parquet_matches_csv(tmp_path: Path) -> None:
    rows = _rows(0, 80)
    from_csv = load_tabular(_cfg(train=[_csv(tmp_path / "a.csv", rows)], seed=3))
    from_pq = load_tabular(_cfg(train=[_parquet(tmp_path / "a.parquet", rows)], seed=3))
    (tmp_path / "lists").mkdir()
    from_list = load_tabular(_cfg(train=[_parquet(tmp_path / "lists" / "a.parquet", rows, list_tags=True)], seed=3))
    for other in (from_pq, from_list):  # the same data set name too: "a", from the file name
        assert other.spec == from_csv.spec
        for name in ("train", "val", "test"):
            x, y = from_csv.split(name), other.split(name)
            np.testing.assert_allclose(x.dense, y.dense, rtol=1e-6)
            for k in x.sparse:
                assert np.array_equal(x.sparse[k].values, y.sparse[k].values), k
                assert np.array_equal(x.sparse[k].offsets, y.sparse[k].offsets), k
            for t in x.labels:
                assert np.array_equal(x.labels[t], y.labels[t])


def test_carve_out_is_seeded_and_disjoint(tmp_path: Path) -> None:
    train = [_csv(tmp_path / "a.csv", _rows(0, 70)), _csv(tmp_path / "b.csv", _rows(70, 30))]
    d = load_tabular(_cfg(train=train, val_fraction=0.2, test_fraction=0.1, seed=1))
    assert (len(d.train), len(d.val), len(d.test)) == (70, 20, 10)
    parts = [_raw_rows(s, d.info["dense_stats"]) for s in (d.train, d.val, d.test)]  # type: ignore[arg-type]
    assert sorted(np.concatenate(parts).tolist()) == list(range(100))
    for split, rows in zip((d.train, d.val, d.test), parts, strict=True):
        _check_rows(split, rows)
    again = load_tabular(_cfg(train=train, val_fraction=0.2, test_fraction=0.1, seed=1))
    assert np.array_equal(again.val.dense, d.val.dense)
    other = load_tabular(_cfg(train=train, val_fraction=0.2, test_fraction=0.1, seed=2))
    assert not np.array_equal(other.val.dense, d.val.dense)
    # only the missing split is carved
    only_val = load_tabular(_cfg(train=train[:1], test=train[1:], val_fraction=0.1))
    assert (len(only_val.train), len(only_val.val), len(only_val.test)) == (63, 7, 30)


def test_log1p_limit_rows_delimiter_headerless(tmp_path: Path) -> None:
    path = _csv(tmp_path / "a.tsv", _rows(0, 50), header=HEADER, sep="\t")
    d = load_tabular(
        _cfg(train=[path], delimiter="\t", log1p=["price"], limit_rows=40, val_fraction=0.25, test_fraction=0.0)
    )
    assert len(d.train) + len(d.val) == 40 and len(d.test) == 0
    stats = d.info["dense_stats"]
    price = d.train.dense[:, 1] * stats["std"][1] + stats["mean"][1]  # type: ignore[index]
    rows = _raw_rows(d.train, stats)  # type: ignore[arg-type]
    np.testing.assert_allclose(price, np.log1p(rows * 1.5), rtol=1e-4, atol=1e-4)
    lines = (tmp_path / "a.tsv").read_text().splitlines()[1:]
    (tmp_path / "nohead.tsv").write_text("\n".join(lines) + "\n")
    headless = load_tabular(_cfg(train=[str(tmp_path / "nohead.tsv")], delimiter="\t", column_names=HEADER))
    assert len(headless.train) + len(headless.val) + len(headless.test) == 50


def test_structured_config_and_registry(tmp_path: Path) -> None:
    path = _csv(tmp_path / "a.csv", _rows(0, 30))
    node = OmegaConf.merge(
        OmegaConf.structured(TabularConfig),
        {
            "train": [path],
            "categorical": ["user"],
            "dense": ["price"],
            "tasks": [{"column": "clicked", "rule": None}],
        },
    )
    cfg = OmegaConf.to_object(node)
    d = build_dataset(cfg)
    assert d.spec.tasks == ("clicked",) and not d.spec.has_user_id


@pytest.mark.parametrize(
    ("rule", "values", "expected"),
    [
        (">= 4", ["3", "4", "5.5"], [0, 1, 1]),
        ("> 4", ["3", "4", "5.5"], [0, 0, 1]),
        ("<= 1", ["0", "1", "2"], [1, 1, 0]),
        ("< 1", ["0", "1", "-2"], [1, 0, 1]),
        ("== 1", ["1", "1.0", "2"], [1, 1, 0]),
        ("!= 0", ["0", "3", "-1"], [0, 1, 1]),
        ("in [1, 3]", ["1", "2", "3"], [1, 0, 1]),
        ("not in [1, 3]", ["1", "2", "3"], [0, 1, 0]),
        ("== buy", ["buy", " buy ", "view"], [1, 1, 0]),
        ("!= 'a b'", ["a b", "ab", "c"], [0, 1, 1]),
        ('in ["x", y]', ["x", "y", "z"], [1, 1, 0]),
    ],
)
def test_rules(rule: str, values: list[str], expected: list[int]) -> None:
    out = apply_rule(parse_rule(rule), pa.chunked_array([pa.array(values)]), path="f.csv", column="c")
    assert out.tolist() == expected and out.dtype == np.float32


def test_rule_parsing() -> None:
    assert parse_rule(" >=4 ") == Rule(op=">=", values=(4.0,))
    assert parse_rule("not  in [1, 'b']") == Rule(op="not in", values=(1.0, "b"))
    for bad in ("=> 4", "4", "in []", "> abc", "__import__('os').system('x')", "== "):
        with pytest.raises(ValueError, match="label rule"):
            parse_rule(bad)


def _write_bad(tmp_path: Path, column: str, row: int, value: str) -> str:
    rows = _rows(0, 10)
    rows[row][HEADER.index(column)] = value
    return _csv(tmp_path / "bad.csv", rows)


@pytest.mark.parametrize(
    ("column", "value", "match"),
    [
        ("price", "12,5", r"bad.csv: row 4, column 'price': non-numeric value '12,5' \(data.on_bad_row=skip drops"),
        ("price", "", r"bad.csv: row 4, column 'price': empty or NaN dense value"),
        ("price", "nan", r"bad.csv: row 4, column 'price': empty or NaN dense value"),
        ("price", "inf", r"bad.csv: row 4, column 'price': non-finite dense value"),
        ("clicked", "2", r"bad.csv: row 4, column 'clicked': label 2.0 is not 0 or 1"),
        ("clicked", "", r"bad.csv: row 4, column 'clicked': empty label value"),
        ("rating", "x", r"bad.csv: row 4, column 'rating': non-numeric value 'x' \(data.on_bad_row=skip drops"),
        ("action", "", r"bad.csv: row 4, column 'action': empty label value"),
    ],
)
def test_errors_name_file_row_column(tmp_path: Path, column: str, value: str, match: str) -> None:
    path = _write_bad(tmp_path, column, 3, value)
    with pytest.raises(ValueError, match=match):
        load_tabular(_cfg(train=[path]))


def test_missing_file_and_column(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        load_tabular(_cfg(train=[str(tmp_path / "nope.csv")]))
    path = _csv(tmp_path / "a.csv", _rows(0, 10))
    with pytest.raises(ValueError, match=r"a.csv: no column\(s\) \['age'\]"):
        load_tabular(_cfg(train=[path], dense=["age"]))
    pq_path = _parquet(tmp_path / "a.parquet", _rows(0, 10))
    with pytest.raises(ValueError, match=r"a.parquet: no column\(s\) \['age'\]"):
        load_tabular(_cfg(train=[pq_path], dense=["price", "age"]))
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match="junk.parquet: cannot be read as parquet"):
        load_tabular(_cfg(train=[str(tmp_path / "junk.parquet")]))


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"train": []}, "data.train"),
        ({"tasks": []}, "data.tasks"),
        ({"tasks": [{"name": "a"}]}, "needs `column`"),
        ({"tasks": [{"column": "clicked", "name": "a.b"}]}, "letters, digits"),
        ({"tasks": [{"column": "clicked"}, {"column": "clicked"}]}, "duplicate task"),
        ({"log1p": ["user"]}, "data.log1p"),
        ({"format": "json"}, "data.format"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, "val_fraction"),
    ],
)
def test_config_errors(tmp_path: Path, kw: dict, match: str) -> None:
    path = _csv(tmp_path / "a.csv", _rows(0, 20))
    with pytest.raises(ValueError, match=match):
        load_tabular(_cfg(**{"train": [path], **kw}))


def test_ragged_csv_row(tmp_path: Path) -> None:
    path = tmp_path / "ragged.csv"
    path.write_text(",".join(HEADER) + "\n" + ",".join(_rows(0, 1)[0]) + "\n1,u1,i1\n")
    with pytest.raises(ValueError, match=r"ragged.csv: row 2: 3 fields, expected 8: '1,u1,i1'"):
        load_tabular(_cfg(train=[str(path)]))


def _with_bad_rows(tmp_path: Path) -> tuple[str, list[int]]:
    """20 good rows with 6 bad ones spliced in (one of each kind); returns the file and
    the `row` values of the good rows, in order."""
    rows = _rows(0, 20)
    bad = {
        3: ("price", "12,5"),  # non-numeric dense
        5: ("price", "inf"),  # non-finite dense
        7: ("price", ""),  # empty dense
        9: ("clicked", "2"),  # label outside {0, 1}
        11: ("rating", "x"),  # non-numeric rule input
        13: ("action", ""),  # empty rule input
    }
    for r, (column, value) in bad.items():
        rows[r][HEADER.index(column)] = value
    lines = [",".join(HEADER)] + [",".join(f'"{c}"' if "," in c else c for c in r) for r in rows]
    lines.insert(4, "99,u1,i1")  # a ragged line (3 fields) at data row 4, before most bad rows
    (tmp_path / "dirty.csv").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "dirty.csv"), [r for r in range(20) if r not in bad]


def test_on_bad_row_skip_drops_and_counts_each_kind(tmp_path: Path) -> None:
    path, good = _with_bad_rows(tmp_path)
    with pytest.raises(ValueError, match=r"dirty.csv: row 4: 3 fields, expected 8: '99,u1,i1'"):
        load_tabular(_cfg(train=[path], val_fraction=0.0, test_fraction=0.0))  # default policy: error
    ds = build_dataset(_cfg(train=[path], val_fraction=0.0, test_fraction=0.0, on_bad_row="skip"))
    assert ds.skipped_rows == 7
    assert ds.info["skipped"]["by_reason"] == {
        "wrong number of fields": 1,
        "non-numeric value": 2,
        "non-finite dense value": 2,
        "label not 0 or 1": 2,
    }
    rows = _raw_rows(ds.train, ds.info["dense_stats"])
    assert rows.tolist() == good  # exactly the good rows, in file order, nothing else touched
    # warnings name file rows, also after the ragged line (data row 4) the reader dropped
    assert any("dirty.csv: row 4: 3 fields" in e for e in ds.info["skipped"]["examples"])
    assert any(
        "dirty.csv: row 5, column 'price': non-numeric value '12,5'" in e for e in ds.info["skipped"]["examples"]
    )
    assert any("dirty.csv: row 15, column 'action': empty label value" in e for e in ds.info["skipped"]["examples"])
    _check_rows(ds.train, rows)


def test_on_bad_row_skip_equals_clean_file(tmp_path: Path) -> None:
    path, good = _with_bad_rows(tmp_path)
    clean = _csv(tmp_path / "clean.csv", [r for r in _rows(0, 20) if int(r[0]) in good])
    a = build_dataset(_cfg(train=[path], on_bad_row="skip"))
    b = build_dataset(_cfg(train=[clean]))
    assert b.skipped_rows == 0
    for name in ("train", "val", "test"):
        sa, sb = a.split(name), b.split(name)
        np.testing.assert_array_equal(sa.dense, sb.dense)
        assert {k: v.tolist() for k, v in sa.labels.items()} == {k: v.tolist() for k, v in sb.labels.items()}
        for f in sa.sparse:
            np.testing.assert_array_equal(sa.sparse[f].values, sb.sparse[f].values)


def test_on_bad_row_policy_is_validated(tmp_path: Path) -> None:
    path = _csv(tmp_path / "a.csv", _rows(0, 20))
    with pytest.raises(ValueError, match="data.on_bad_row='drop'"):
        build_dataset(_cfg(train=[path], on_bad_row="drop"))


# ------------------------------------------------------ delimiter, data set name, labels


@pytest.mark.parametrize("delimiter", ["\t", "\\t", "tab", "TAB"])
def test_tab_delimiter_spellings(tmp_path: Path, delimiter: str) -> None:
    """A real tab, the two characters backslash-t (what `data.delimiter='\\t'` passes) and `tab`."""
    path = _csv(tmp_path / "a.tsv", _rows(0, 30), sep="\t")
    d = load_tabular(_cfg(train=[path], delimiter=delimiter))
    assert len(d.train) + len(d.val) + len(d.test) == 30
    _check_rows(d.train, _raw_rows(d.train, d.info["dense_stats"]))  # type: ignore[arg-type]


@pytest.mark.parametrize("delimiter", ["ab", "", "\\n", "\n", '"', "tabs"])
def test_invalid_delimiter_names_the_key(tmp_path: Path, delimiter: str) -> None:
    path = _csv(tmp_path / "a.csv", _rows(0, 10))
    with pytest.raises(ValueError, match=r"data.delimiter=.* is not a field separator"):
        load_tabular(_cfg(train=[path], delimiter=delimiter))
    with pytest.raises(ValueError, match=r"data.delimiter="):  # config-only checks too
        tabular_names(_cfg(train=[path], delimiter=delimiter))


def test_wrong_delimiter_hint(tmp_path: Path) -> None:
    """A tab-separated file read with ',' has one column named 'row\\tuser\\t...'."""
    path = _csv(tmp_path / "a.tsv", _rows(0, 10), sep="\t")
    with pytest.raises(ValueError, match=r"the file has \['row\\tuser.*set data.delimiter='\\t'"):
        load_tabular(_cfg(train=[path]))
    semi = _csv(tmp_path / "b.csv", _rows(0, 10), sep=";")
    with pytest.raises(ValueError, match=r"separated by ';'\? set data.delimiter=';'"):
        load_tabular(_cfg(train=[semi]))
    with pytest.raises(ValueError, match=r"no column\(s\) \['age'\]; the file has \['row', 'user'") as e:
        load_tabular(_cfg(train=[_csv(tmp_path / "c.csv", _rows(0, 10))], dense=["age"]))
    assert "data.delimiter" not in str(e.value)  # several columns: no hint


def test_dataset_name(tmp_path: Path) -> None:
    path = _csv(tmp_path / "clicks.2024.csv", _rows(0, 20))
    assert load_tabular(_cfg(train=[path])).spec.name == "clicks"
    assert load_tabular(_cfg(train=[path], dataset_name="my_set")).spec.name == "my_set"


def test_label_sources_and_single_class_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A rule that never matches (here a trailing '.') gives a single-class task: warned
    at load time naming the task, the split and the rule, and recorded in label_stats."""
    path = _csv(tmp_path / "a.csv", _rows(0, 50))
    tasks = [*TASKS, {"name": "bought", "column": "action", "rule": "== buy."}]
    with caplog.at_level("WARNING", logger="data"):
        d = build_dataset(_cfg(train=[path], tasks=tasks, val_fraction=0.2, test_fraction=0.2))
    assert d.info["label_sources"] == {
        "click": "column 'clicked' (0 / 1)",
        "like": "column 'rating' rule '>= 4'",
        "convert": "column 'action' rule \"in [buy, 'cart']\"",
        "bought": "column 'action' rule '== buy.'",
    }
    warned = [r.getMessage() for r in caplog.records if "single class" in r.getMessage()]
    assert len(warned) == 3 and all("'bought'" in m and "rule '== buy.'" in m for m in warned)
    assert {m.split(" split")[0].split()[-1] for m in warned} == {"train", "val", "test"}
    stats = d.info["label_stats"]
    assert stats["test"]["bought"] == {"rows": 10, "positive_rate": 0.0}  # type: ignore[index]
    assert stats["train"]["click"]["rows"] == 30  # type: ignore[index]
    assert stats["train"]["click"]["positive_rate"] == pytest.approx(float(d.train.labels["click"].mean()))  # type: ignore[index]


def test_command_line_tab_reaches_the_reader(tmp_path: Path) -> None:
    """`data.delimiter='\\t'` from a shell reaches the config as backslash + t."""
    path = _csv(tmp_path / "a.tsv", _rows(0, 30), sep="\t")
    conf = Path(__file__).resolve().parents[2] / "conf" / "data"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        node = compose(config_name="tabular", overrides=[r"delimiter=\t", f"train=[{path}]"])
    assert node.delimiter == "\\t"
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TabularConfig), node))
    cfg = _cfg(**{k: getattr(cfg, k) for k in ("train", "delimiter")})
    assert len(load_tabular(cfg).train) == 24
