"""Atomic writes: the new version appears whole or not at all, and a failed write leaves the old one and no
temporary files."""

import pytest

from musicgen_jax import atomic


def test_write_text_creates_and_replaces_and_leaves_no_temporary_file(tmp_path):
  path = tmp_path / "config.json"
  assert atomic.write_text(path, "one") == path and path.read_text() == "one"
  atomic.write_text(path, "two")
  assert path.read_text() == "two" and [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_a_failed_write_leaves_the_old_file_and_removes_the_temporary_one(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text("old")
  with pytest.raises(RuntimeError):
    with atomic.replacing(path) as tmp:
      tmp.write_text("half")
      raise RuntimeError("killed")
  assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_a_folder_is_replaced_whole(tmp_path):
  final = tmp_path / "train"
  final.mkdir()
  (final / "old.npy").write_text("old")
  with atomic.replacing(final) as tmp:
    tmp.mkdir()
    (tmp / "new.npy").write_text("new")
  assert [p.name for p in final.iterdir()] == ["new.npy"] and [p.name for p in tmp_path.iterdir()] == ["train"]
  with pytest.raises(RuntimeError):
    with atomic.replacing(final) as tmp:
      tmp.mkdir()
      raise RuntimeError("killed")
  assert [p.name for p in final.iterdir()] == ["new.npy"] and [p.name for p in tmp_path.iterdir()] == ["train"]


def test_temporary_names_are_those_prepare_clears_away(tmp_path):
  from musicgen_jax import prepare

  for kind in ("tmp", "old"):
    assert prepare.LEFTOVER.fullmatch(atomic.temporary_path(tmp_path / "manifest.json", kind).name)
