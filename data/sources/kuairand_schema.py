"""KuaiRand column names: the default tasks and features, the columns that may never be
features, and the dataset's `long_view` definition (used by `data/sources/kuairand.py`).

Outcome columns are recorded after the video was shown (play time, stay times, the
interaction flags), so a model that reads them at training time sees its labels. The
KuaiRand-Pure Parquet files shipped in `data/files/kuairand-pure/` add a few more
columns derived from them (`watch_ratio`, `finish`, `like`, `long_watch`,
`is_positive`) and a bookkeeping one (`source_file`); none of these may be a feature.
"""

from __future__ import annotations

import numpy as np

DEFAULT_TASKS = (
    "is_click",
    "long_view",
    "is_like",
    "is_follow",
    "is_comment",
    "is_forward",
    "is_profile_enter",
)
LONG_VIEW_INPUTS = ("play_time_ms", "duration_ms")
DEFAULT_LOG_CATEGORICAL = ("user_id", "video_id", "tab")
DEFAULT_LOG_DENSE = ("duration_ms",)
DEFAULT_USER_CATEGORICAL = (
    "user_active_degree",
    "is_lowactive_period",
    "is_live_streamer",
    "is_video_author",
    "follow_user_num_range",
    "fans_user_num_range",
    "friend_user_num_range",
    "register_days_range",
    *(f"onehot_feat{i}" for i in range(18)),
)
DEFAULT_USER_DENSE = ("follow_user_num", "fans_user_num", "friend_user_num", "register_days")
DEFAULT_VIDEO_CATEGORICAL = ("author_id", "video_type", "upload_type", "visible_status", "music_type")
DEFAULT_VIDEO_MULTI_HOT = {"tag": ","}
DEFAULT_VIDEO_DENSE = (
    "server_width",
    "server_height",
    "show_cnt",
    "play_cnt",
    "play_duration",
    "complete_play_cnt",
    "valid_play_cnt",
    "long_time_play_cnt",
    "short_time_play_cnt",
    "play_progress",
    "like_cnt",
    "comment_cnt",
    "follow_cnt",
    "share_cnt",
    "collect_cnt",
)

LABEL_COLUMNS = (*DEFAULT_TASKS, "is_hate")
# column -> why it is not a feature
NOT_FEATURES = {
    **dict.fromkeys(LABEL_COLUMNS, "an interaction label"),
    **dict.fromkeys(("play_time_ms", "profile_stay_time", "comment_stay_time"), "an outcome of the impression"),
    **dict.fromkeys(
        ("watch_ratio", "finish", "like", "long_watch", "is_positive"),
        "an outcome of the impression (derived from the labels / play time)",
    ),
    "source_file": "bookkeeping of the file the row came from",
}


def long_view(play_time_ms: np.ndarray, duration_ms: np.ndarray, *, threshold_ms: float = 18_000) -> np.ndarray:
    """KuaiRand's long_view: played >= min(duration, 18 s); unknown duration -> 18 s."""
    known = np.isfinite(duration_ms) & (duration_ms > 0)
    need = np.where(known, np.minimum(np.where(known, duration_ms, 0.0), threshold_ms), threshold_ms)
    return (np.nan_to_num(play_time_ms, nan=-1.0) >= need).astype(np.float32)
