"""Atomic writes: a failure mid-write leaves the previous file whole and no temporary file behind."""

from __future__ import annotations

import json

import pytest

from privdiff.files import atomic_path, write_json_atomic


def test_a_write_that_fails_midway_leaves_the_previous_file_and_no_temporary(tmp_path) -> None:
    target = tmp_path / "runs" / "audit.json"
    write_json_atomic(target, {"step": 1})
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_path(target) as tmp:
            tmp.write_text('{"step": 2, "half')
            raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"step": 1}
    assert [p.name for p in target.parent.iterdir()] == ["audit.json"]
    write_json_atomic(target, {"step": 2})
    assert json.loads(target.read_text()) == {"step": 2}
