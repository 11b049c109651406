"""All-or-nothing file replacement and content hashes shared by every layer."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from scratchpath.files import atomic_write, file_sha256


def test_atomic_write_replaces_the_target_and_leaves_no_temporary(tmp_path: Path):
    target = tmp_path / "run.json"
    target.write_text("old")
    with atomic_write(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_text("new")
        assert target.read_text() == "old"  # nothing visible before the block ends
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_atomic_write_failure_keeps_the_old_file_and_removes_the_temporary(tmp_path: Path):
    target = tmp_path / "metrics.json"
    target.write_text("complete")
    with pytest.raises(RuntimeError), atomic_write(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_file_sha256_matches_hashlib_on_a_real_slide(slides_dir: Path):
    path = slides_dir / "CMU-1-Small-Region.svs"
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
