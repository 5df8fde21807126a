"""Synthetic impression logs as Parquet, for the streaming source at scale.

    python -m data.generate --rows 2000000 --out outputs/data/kuairand_synth \
        [--files 8] [--row-group-size 65536] [--val-rows 100000] [--test-rows 100000] \
        [--seed 0] [--users 100000] [--videos 50000]
    python -m data.generate --kind clusters --rows 8000000 --out outputs/data/capacity_logs \
        --val-rows 500000 --test-rows 500000 [--user-clusters 32 --item-clusters 32 ...]

`--kind kuairand` (default, this module's doc below) writes KuaiRand-shaped logs;
`--kind clusters` the logs of `data/generators/clusters.py`, where expert capacity binds (read
by `conf/data/capacity_logs.yaml`). Both share the layout below.

writes (the layout `conf/data/parquet_stream.yaml` reads):

    OUT/train/part-00000.parquet ...  --rows rows over --files files, row groups of
                                      --row-group-size rows (the last of a file may be smaller)
    OUT/val/part-00000.parquet        --val-rows rows, the day after train
    OUT/test/part-00000.parquet       --test-rows rows, the day after val
    OUT/vocab.parquet                 train vocabularies of the categorical / tag columns
    OUT/stats.json                    train moments of the dense columns (data/parsing/prepare.py)
    OUT/meta.json                     arguments, row counts, positive rates, rows/s, peak RSS

Columns (KuaiRand log + user / video feature names): user_id, video_id, author_id,
music_id (int64), date (YYYYMMDD), hourmin (HH00), tab (0..14); user attributes
user_active_degree (string), is_video_author, onehot_feat0, onehot_feat1 (int),
follow_user_num, fans_user_num, friend_user_num, register_days (counts); video
attributes video_type, upload_type (string), duration_ms, tag (list<int32>, 1-4 tags);
outcomes play_time_ms (not a feature) and the six tasks is_click, long_view, is_like,
is_follow, is_comment, is_forward (positive rates about 40%, 25%, 1.5%, 0.4%, 0.3%, 0.2%).
`long_view == (play_time_ms >= min(duration_ms, 18000))`, as in KuaiRand.

Model: user and video ids are drawn from truncated power laws (exponents 0.8 and 1.0, ranks
mapped to ids by a seeded permutation), authors and music per video likewise. Each task t
has logit `a_t + sum_k c_tk u_k v_k + (feature effects: tab, activity degree, video
quality, duration, per-user propensities) + 2 * is_click` (the last for the interaction
tasks), labels are Bernoulli(sigmoid(logit)), and the intercepts a_t are solved by
bisection on a 200k-row calibration sample to hit the target rates. So a model that
learns user / video embeddings and the features beats the base rate clearly.

Everything is vectorised numpy, generated and written one chunk (whole row groups) at a
time: memory is O(users + videos + chunk), not O(rows).

Legend: N rows of a chunk, K latent factors.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data.generators import clusters
from data.generators.draws import power_law
from data.parsing.prepare import DenseMoments, ValueCounts, write_stats, write_vocab

K = 8
TASKS = ("is_click", "long_view", "is_like", "is_follow", "is_comment", "is_forward")
RATES = (0.40, 0.25, 0.015, 0.004, 0.003, 0.002)
DEGREES = ("full_active", "high_active", "middle_active", "low_active")
UPLOAD_TYPES = ("ShortImport", "LongImport", "Web", "Kmovie", "PictureSet", "ShortCamera")
NUM_TABS, NUM_TAGS = 15, 60
DENSE = ("duration_ms", "follow_user_num", "fans_user_num", "friend_user_num", "register_days")
CATEGORICAL = (
    "user_id", "video_id", "author_id", "music_id", "tab", "hourmin", "user_active_degree",
    "is_video_author", "onehot_feat0", "onehot_feat1", "video_type", "upload_type",
)  # fmt: skip
START_DATE = np.datetime64("2022-04-08")
LONG_VIEW_MS = 18_000
USER_ALPHA, VIDEO_ALPHA = 0.8, 1.0  # popularity exponents: P(rank k) ~ (k + 1) ** -alpha


@dataclass
class World:
    """Per-user and per-video tables (O(users + videos)), fixed by the seed."""

    user_perm: np.ndarray  # popularity rank -> user id
    video_perm: np.ndarray
    u_UK: np.ndarray
    v_VK: np.ndarray
    c_TK: np.ndarray
    quality_V: np.ndarray
    propensity_UT: np.ndarray
    degree_U: np.ndarray
    author_flag_U: np.ndarray
    feat0_U: np.ndarray
    feat1_U: np.ndarray
    follow_U: np.ndarray
    fans_U: np.ndarray
    friend_U: np.ndarray
    register_U: np.ndarray
    author_V: np.ndarray
    music_V: np.ndarray
    vtype_V: np.ndarray
    upload_V: np.ndarray
    duration_V: np.ndarray
    tags_V4: np.ndarray  # up to 4 tags per video, -1 = none
    tab_p: np.ndarray
    tab_effect: np.ndarray
    degree_effect: np.ndarray
    intercepts: np.ndarray


def build_world(users: int, videos: int, seed: int) -> World:
    rng = np.random.default_rng([seed, 0])
    num_authors, num_music = max(1, videos // 8), max(1, videos // 4)
    num_tags = np.minimum(1 + power_law(rng, 4, 1.5, videos), 4)
    tags = power_law(rng, NUM_TAGS, 1.0, 4 * videos).reshape(videos, 4).astype(np.int32)
    tags[np.arange(4)[None, :] >= num_tags[:, None]] = -1
    tab_p = 1.0 / np.arange(1, NUM_TABS + 1) ** 1.5
    w = World(
        user_perm=rng.permutation(users),
        video_perm=rng.permutation(videos),
        u_UK=rng.normal(0, 1, (users, K)).astype(np.float32),
        v_VK=rng.normal(0, 1, (videos, K)).astype(np.float32),
        c_TK=np.abs(rng.normal(0.35, 0.15, (len(TASKS), K))).astype(np.float32),
        quality_V=rng.normal(0, 0.6, videos).astype(np.float32),
        propensity_UT=rng.normal(0, 0.6, (users, len(TASKS))).astype(np.float32),
        degree_U=rng.choice(len(DEGREES), users, p=[0.45, 0.3, 0.15, 0.1]).astype(np.int8),
        author_flag_U=(rng.random(users) < 0.1).astype(np.int8),
        feat0_U=rng.integers(0, 8, users).astype(np.int16),
        feat1_U=power_law(rng, 50, 1.2, users).astype(np.int16),
        follow_U=np.floor(rng.lognormal(4.0, 1.2, users)).astype(np.int64),
        fans_U=np.floor(rng.lognormal(2.5, 2.0, users)).astype(np.int64),
        friend_U=np.floor(rng.lognormal(1.5, 1.3, users)).astype(np.int64),
        register_U=rng.integers(10, 2500, users),
        author_V=power_law(rng, num_authors, 1.1, videos),
        music_V=power_law(rng, num_music, 1.1, videos),
        vtype_V=(rng.random(videos) < 0.05).astype(np.int8),
        upload_V=power_law(rng, len(UPLOAD_TYPES), 1.5, videos).astype(np.int8),
        duration_V=np.clip(rng.lognormal(np.log(25_000), 0.8, videos), 2_000, 600_000).astype(np.int64),
        tags_V4=tags,
        tab_p=tab_p / tab_p.sum(),
        tab_effect=rng.normal(0, 0.4, NUM_TABS).astype(np.float32),
        degree_effect=np.array([0.4, 0.2, -0.1, -0.5], dtype=np.float32),
        intercepts=np.zeros(len(TASKS)),
    )
    w.intercepts = _calibrate(w, seed)
    return w


def _scores(w: World, users: np.ndarray, videos: np.ndarray, tab: np.ndarray) -> np.ndarray:
    """`[N, T]` task logits without intercepts and without the click term."""
    inter_NK = w.u_UK[users] * w.v_VK[videos] / np.sqrt(K, dtype=np.float32)
    s_NT = 2.0 * inter_NK @ w.c_TK.T
    log_dur = (np.log(w.duration_V[videos]) - np.log(25_000)).astype(np.float32)
    s_NT += w.quality_V[videos][:, None] * np.array([0.8, 0.6, 1.0, 0.5, 0.7, 0.9], dtype=np.float32)
    s_NT += w.propensity_UT[users]
    s_NT[:, 0] += w.tab_effect[tab] + w.degree_effect[w.degree_U[users]]
    s_NT[:, 1] += -0.8 * log_dur + 0.5 * w.degree_effect[w.degree_U[users]]
    return s_NT


def _calibrate(w: World, seed: int) -> np.ndarray:
    """Intercepts hitting RATES on a calibration sample (bisection; click first, the
    interaction tasks then see the sampled clicks)."""
    rng = np.random.default_rng([seed, 1])
    n = 200_000
    users = power_law(rng, len(w.user_perm), USER_ALPHA, n)
    videos = power_law(rng, len(w.video_perm), VIDEO_ALPHA, n)
    tab = rng.choice(NUM_TABS, n, p=w.tab_p)
    s_NT = _scores(w, users, videos, tab).astype(np.float64)
    out = np.zeros(len(TASKS))
    click = None
    for t, rate in enumerate(RATES):
        s = s_NT[:, t] + (2.0 * click if t >= 2 and click is not None else 0.0)
        lo, hi = -30.0, 30.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if (1 / (1 + np.exp(-(s + mid)))).mean() < rate else (lo, mid)
        out[t] = (lo + hi) / 2
        if t == 0:
            click = (rng.random(n) < 1 / (1 + np.exp(-(s + out[t])))).astype(np.float64)
    return out


def chunk_table(w: World, rng: np.random.Generator, n: int, date: np.ndarray) -> pa.Table:
    """`n` impressions as a table (see the module docstring for the columns)."""
    ranks_u = power_law(rng, len(w.user_perm), USER_ALPHA, n)
    ranks_v = power_law(rng, len(w.video_perm), VIDEO_ALPHA, n)
    users, videos = w.user_perm[ranks_u], w.video_perm[ranks_v]
    tab = rng.choice(NUM_TABS, n, p=w.tab_p)
    s_NT = _scores(w, ranks_u, ranks_v, tab) + w.intercepts.astype(np.float32)
    labels = np.zeros((n, len(TASKS)), dtype=np.int8)
    labels[:, 0] = rng.random(n) < 1 / (1 + np.exp(-s_NT[:, 0]))
    labels[:, 1] = rng.random(n) < 1 / (1 + np.exp(-s_NT[:, 1]))
    extra = 2.0 * labels[:, 0]
    for t in range(2, len(TASKS)):
        labels[:, t] = rng.random(n) < 1 / (1 + np.exp(-(s_NT[:, t] + extra)))
    duration = w.duration_V[ranks_v]
    threshold = np.minimum(duration, LONG_VIEW_MS)
    frac = rng.random(n)
    long_view = labels[:, 1].astype(bool)
    play = np.where(long_view, threshold + frac * (duration - threshold), frac * (threshold - 1)).astype(np.int64)
    tags = w.tags_V4[ranks_v]
    tag_len = (tags >= 0).sum(axis=1)
    tag_values = tags[tags >= 0]  # row-major: each row's tags in order
    tag_offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(tag_len, out=tag_offsets[1:])
    cols: dict[str, pa.Array] = {
        "user_id": pa.array(users.astype(np.int64)),
        "video_id": pa.array(videos.astype(np.int64)),
        "author_id": pa.array(w.author_V[ranks_v]),
        "music_id": pa.array(w.music_V[ranks_v]),
        "date": pa.array(date.astype(np.int32)),
        "hourmin": pa.array((rng.integers(0, 24, n) * 100).astype(np.int32)),
        "tab": pa.array(tab.astype(np.int32)),
        "user_active_degree": pa.DictionaryArray.from_arrays(
            pa.array(w.degree_U[ranks_u].astype(np.int32)), pa.array(DEGREES)
        ).cast(pa.string()),
        "is_video_author": pa.array(w.author_flag_U[ranks_u].astype(np.int32)),
        "onehot_feat0": pa.array(w.feat0_U[ranks_u].astype(np.int32)),
        "onehot_feat1": pa.array(w.feat1_U[ranks_u].astype(np.int32)),
        "follow_user_num": pa.array(w.follow_U[ranks_u]),
        "fans_user_num": pa.array(w.fans_U[ranks_u]),
        "friend_user_num": pa.array(w.friend_U[ranks_u]),
        "register_days": pa.array(w.register_U[ranks_u]),
        "video_type": pa.DictionaryArray.from_arrays(
            pa.array(w.vtype_V[ranks_v].astype(np.int32)), pa.array(["NORMAL", "AD"])
        ).cast(pa.string()),
        "upload_type": pa.DictionaryArray.from_arrays(
            pa.array(w.upload_V[ranks_v].astype(np.int32)), pa.array(UPLOAD_TYPES)
        ).cast(pa.string()),
        "duration_ms": pa.array(duration),
        "tag": pa.ListArray.from_arrays(pa.array(tag_offsets), pa.array(tag_values, pa.int32())),
        "play_time_ms": pa.array(play),
    }
    cols.update({t: pa.array(labels[:, i]) for i, t in enumerate(TASKS)})
    return pa.table(cols)


class Accumulator:
    """Train vocab counts and dense moments, from the chunks as they are written."""

    def __init__(self, categorical: tuple[str, ...], multi_hot: tuple[str, ...], dense: tuple[str, ...]) -> None:
        self.multi_hot = multi_hot
        self.counts: dict[str, ValueCounts] = {c: ValueCounts() for c in (*categorical, *multi_hot)}
        self.dense = dense
        self.moments = DenseMoments(list(dense))

    def add(self, table: pa.Table) -> None:
        for c, counts in self.counts.items():
            col = table.column(c).combine_chunks()
            if c in self.multi_hot:
                col = col.flatten()
            counts.add(col)
        self.moments.add(np.stack([table.column(c).to_numpy().astype(np.float64) for c in self.dense], axis=1))


class Generator(Protocol):
    """What `write_split` needs of a world: its columns and a chunk of rows."""

    tasks: tuple[str, ...]
    categorical: tuple[str, ...]
    multi_hot: tuple[str, ...]
    dense: tuple[str, ...]

    def chunk(self, rng: np.random.Generator, n: int, date: np.ndarray) -> pa.Table: ...


@dataclass
class KuaiRandLogs:
    """The KuaiRand-shaped world (this module's doc) as a `Generator`."""

    world: World
    tasks: tuple[str, ...] = TASKS
    categorical: tuple[str, ...] = CATEGORICAL
    multi_hot: tuple[str, ...] = ("tag",)
    dense: tuple[str, ...] = DENSE

    def chunk(self, rng: np.random.Generator, n: int, date: np.ndarray) -> pa.Table:
        return chunk_table(self.world, rng, n, date)


@dataclass
class ClusterLogs:
    """The capacity-binding world of `data/generators/clusters.py` as a `Generator`."""

    world: clusters.ClusterWorld
    tasks: tuple[str, ...] = clusters.TASKS
    categorical: tuple[str, ...] = clusters.CATEGORICAL
    multi_hot: tuple[str, ...] = ()
    dense: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.dense = self.world.dense

    def chunk(self, rng: np.random.Generator, n: int, date: np.ndarray) -> pa.Table:
        return clusters.chunk_table(self.world, rng, n, date)


def write_split(
    out: Path, gen: Generator, *, seed: int, code: int, rows: int, files: int, rg: int, day0: int, days: int,
    acc: Accumulator | None,
) -> dict[str, float]:  # fmt: skip
    """Write `rows` rows of one split over `files` files; returns its positive rates."""
    out.mkdir(parents=True, exist_ok=True)
    chunk = rg * max(1, 262_144 // rg)  # whole row groups per chunk
    bounds = np.linspace(0, rows, files + 1).astype(np.int64)
    positives = np.zeros(len(gen.tasks))
    for f in range(files):
        path = out / f"part-{f:05d}.parquet"
        writer = None
        for c, start in enumerate(range(int(bounds[f]), int(bounds[f + 1]), chunk)):
            n = min(chunk, int(bounds[f + 1]) - start)
            rng = np.random.default_rng([seed, code, f, c])
            day = day0 + (start + np.arange(n)) * days // max(1, rows)
            date = np.array([int(str(START_DATE + int(d)).replace("-", "")) for d in np.unique(day)])
            table = gen.chunk(rng, n, date[np.searchsorted(np.unique(day), day)])
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema)
            writer.write_table(table, row_group_size=rg)
            positives += [pc.sum(table.column(t)).as_py() for t in gen.tasks]
            if acc is not None:
                acc.add(table)
        if writer is not None:
            writer.close()
    return {t: float(p / max(1, rows)) for t, p in zip(gen.tasks, positives, strict=True)}


def generate(args: argparse.Namespace) -> dict[str, object]:
    t0 = time.perf_counter()
    out = Path(args.out)
    gen: Generator
    if args.kind == "clusters":
        cfg = clusters.ClusterLogsConfig(
            users=args.users, items=args.videos, user_clusters=args.user_clusters, item_clusters=args.item_clusters,
            dense=args.dense, hidden=args.hidden, cluster_weight=args.cluster_weight, seed=args.seed,
            feature_noise=args.feature_noise,
        )  # fmt: skip
        gen = ClusterLogs(clusters.build_cluster_world(cfg))
    else:
        gen = KuaiRandLogs(build_world(args.users, args.videos, args.seed))
    acc = Accumulator(gen.categorical, gen.multi_hot, gen.dense)
    days = 28  # train dates; val and test are the two days after
    common = {"seed": args.seed, "rg": args.row_group_size}
    train = write_split(
        out / "train", gen, code=0, rows=args.rows, files=args.files, day0=0, days=days, acc=acc, **common
    )
    val = write_split(out / "val", gen, code=1, rows=args.val_rows, files=1, day0=days, days=1, acc=None, **common)
    test = write_split(
        out / "test", gen, code=2, rows=args.test_rows, files=1, day0=days + 1, days=1, acc=None, **common
    )
    write_vocab(out / "vocab.parquet", acc.counts)
    write_stats(out / "stats.json", acc.moments)
    seconds = time.perf_counter() - t0
    rows = args.rows + args.val_rows + args.test_rows
    meta: dict[str, object] = {
        "args": vars(args),
        "rows": {"train": args.rows, "val": args.val_rows, "test": args.test_rows},
        "positive_rates": {"train": train, "val": val, "test": test},
        "seconds": seconds,
        "rows_per_s": rows / max(1e-9, seconds),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m data.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, required=True, help="train rows")
    p.add_argument("--out", required=True)
    p.add_argument("--files", type=int, default=8, help="train files")
    p.add_argument("--row-group-size", type=int, default=65_536)
    p.add_argument("--val-rows", type=int, default=100_000)
    p.add_argument("--test-rows", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kind", choices=("kuairand", "clusters"), default="kuairand",
                   help="kuairand: KuaiRand-shaped logs (this module); clusters: generators/clusters.py")  # fmt: skip
    p.add_argument("--users", type=int, default=None, help="default 100000 (kuairand), 10000 (clusters)")
    p.add_argument("--videos", "--items", type=int, default=None, help="default 50000 (kuairand), 2000 (clusters)")
    g = p.add_argument_group("--kind clusters (data/generators/clusters.py)")
    defaults = clusters.ClusterLogsConfig()
    g.add_argument("--user-clusters", type=int, default=defaults.user_clusters)
    g.add_argument("--item-clusters", type=int, default=defaults.item_clusters)
    g.add_argument("--dense", type=int, default=defaults.dense, help="context columns")
    g.add_argument("--hidden", type=int, default=defaults.hidden, help="tanh units of each pair's label function")
    g.add_argument("--cluster-weight", type=float, default=defaults.cluster_weight)
    g.add_argument("--feature-noise", type=float, default=defaults.feature_noise,
                   help="share of users / items whose segment / category is not their cluster")  # fmt: skip
    args = p.parse_args(argv)
    is_clusters = args.kind == "clusters"
    if args.users is None:
        args.users = defaults.users if is_clusters else 100_000
    if args.videos is None:
        args.videos = defaults.items if is_clusters else 50_000
    for key in ("rows", "files", "row_group_size", "val_rows", "test_rows", "users", "videos", "user_clusters",
                "item_clusters", "dense", "hidden"):  # fmt: skip
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.files > args.rows:
        p.error("--files must be <= --rows")
    for key in ("cluster_weight", "feature_noise"):
        if not 0.0 <= getattr(args, key) <= 1.0:
            p.error(f"--{key.replace('_', '-')} must be in [0, 1]")
    return args


def main(argv: list[str] | None = None) -> None:
    print(json.dumps(generate(parse_args(argv)), indent=1))


if __name__ == "__main__":
    main()
