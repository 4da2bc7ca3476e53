"""The results index: naming and stamps hold for every kept result, superseded runs move to the archive, and a
default output never lands on a kept file."""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import common
import results_index


def _write(folder: Path, name: str, **body) -> Path:
    path = folder / name
    path.write_text(json.dumps({"code_version": "git:abc", "created_at": "2026-12-01T00:00:00Z", **body}))
    return path


def test_every_kept_result_is_named_and_stamped():
    assert results_index.main(["--check"]) == 0


def test_check_catches_a_result_without_created_at(tmp_path):
    _write(tmp_path, "parse-20261201T000000Z.json")
    bad = tmp_path / "index-20261202T000000Z.json"
    bad.write_text(json.dumps({"code_version": "git:abc"}))
    assert results_index.main(["--check", "--folder", str(tmp_path)]) == 1
    assert results_index.problems_of(bad) == [f"{bad.name}: no created_at"]


def test_check_catches_an_old_style_name(tmp_path):
    _write(tmp_path, "learning_v3_seed0.json")
    assert results_index.main(["--check", "--folder", str(tmp_path)]) == 1


def test_newest_of_a_group_is_current_and_the_rest_are_archived(tmp_path):
    old = _write(tmp_path, "learning-seed0-20261101T000000Z.json", miou={"trained": 0.1})
    old.with_suffix(".png").write_bytes(b"png")
    _write(tmp_path, "learning-seed0-20261201T000000Z.json", miou={"trained": 0.31}, fresh_eval={"miou": {"trained": 0.3}})
    _write(tmp_path, "learning-seed1-20261101T000000Z.json", miou={"trained": 0.2})
    assert results_index.main(["--folder", str(tmp_path)]) == 0
    assert sorted(p.name for p in (tmp_path / "archive").iterdir()) == [
        "learning-seed0-20261101T000000Z.json", "learning-seed0-20261101T000000Z.png"]
    page = (tmp_path / "README.md").read_text()
    assert "| learning-seed0 | [learning-seed0-20261201T000000Z.json]" in page
    assert "mIoU 0.31 (test), 0.3 (fresh render)" in page
    assert "| learning-seed1 | [learning-seed1-20261101T000000Z.json]" in page
    assert "mIoU 0.2 (test) |" in page


def test_default_output_never_names_an_existing_result(tmp_path):
    first = common.default_output("parse", tmp_path)
    first.write_text("{}")
    second = common.default_output("parse", tmp_path)
    assert second != first and second.name.startswith("parse-") and not second.exists()
    second.write_text("{}")
    (tmp_path / "archive").mkdir()
    second.rename(tmp_path / "archive" / second.name)
    third = common.default_output("parse", tmp_path)
    assert third.name not in (first.name, second.name)
