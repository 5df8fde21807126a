"""Which checkpoint `checkpoint=best|last|DIR` means (trainer.checkpoint.resolve_checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.checkpoint import MARKER, resolve_checkpoint


def _ckpt(root: Path, name: str, *, complete: bool = True) -> Path:
    path = root / "checkpoints" / name
    path.mkdir(parents=True)
    if complete:
        (path / MARKER).write_text("done\n")
    return path


def test_best_is_the_reported_step_and_last_the_newest_periodic(tmp_path: Path) -> None:
    best = _ckpt(tmp_path, "best_step_00000003")
    _ckpt(tmp_path, "step_00000004")
    last = _ckpt(tmp_path, "step_00000006")
    _ckpt(tmp_path, "step_00000008", complete=False)  # a crash mid-write is never chosen
    (tmp_path / "summary.json").write_text(json.dumps({"best_step": 3}))
    assert resolve_checkpoint("best", tmp_path) == best
    assert resolve_checkpoint("last", tmp_path) == last
    assert resolve_checkpoint(str(last), tmp_path) == last
    # selection off: best_step is the last step, whose periodic checkpoint is the model
    (tmp_path / "summary.json").write_text(json.dumps({"best_step": 6}))
    assert resolve_checkpoint("best", tmp_path) == last


def test_missing_checkpoints_name_the_key(tmp_path: Path) -> None:
    (tmp_path / "summary.json").write_text(json.dumps({"best_step": 5}))
    with pytest.raises(ValueError, match="checkpoint=best: the reported step 5"):
        resolve_checkpoint("best", tmp_path)
    with pytest.raises(ValueError, match="checkpoint=last: no complete checkpoint"):
        resolve_checkpoint("last", tmp_path)
    partial = _ckpt(tmp_path, "step_00000002", complete=False)
    with pytest.raises(ValueError, match="is not a complete checkpoint folder"):
        resolve_checkpoint(str(partial), tmp_path)


def test_without_summary_best_is_the_best_so_far(tmp_path: Path) -> None:
    _ckpt(tmp_path, "best_step_00000002")
    newest = _ckpt(tmp_path, "best_step_00000005")
    assert resolve_checkpoint("best", tmp_path) == newest
