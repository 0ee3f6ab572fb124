"""Where musicgen writes by default, and the check that a folder can be written before work starts."""

import pytest

from musicgen_jax import paths
from musicgen_jax.errors import UserError


def test_home_follows_the_environment(tmp_path, monkeypatch):
  monkeypatch.setenv(paths.HOME_ENV, str(tmp_path))
  assert (paths.runs_dir(), paths.data_dir(), paths.outputs_dir()) == (
      tmp_path / "runs", tmp_path / "data", tmp_path / "generated")


def test_a_writable_folder_or_one_that_can_be_made_passes_and_nothing_is_left(tmp_path):
  (tmp_path / "run").mkdir()
  paths.check_writable(tmp_path / "run", "run folder")
  paths.check_writable(tmp_path / "new" / "deeper", "run folder")
  assert [p.name for p in tmp_path.iterdir()] == ["run"] and not list((tmp_path / "run").iterdir())


def test_a_folder_under_a_file_is_refused(tmp_path):
  (tmp_path / "file").write_text("")
  with pytest.raises(UserError, match="is a file, not a folder"):
    paths.check_writable(tmp_path / "file" / "out", "output folder")


def test_a_read_only_folder_is_refused_and_so_is_one_to_be_made_in_it(tmp_path, make_read_only):
  folder = make_read_only(tmp_path / "ro")
  for target in (folder, folder / "new"):
    with pytest.raises(UserError, match=f"cannot write in output folder {target} .*: make it writable"):
      paths.check_writable(target, "output folder")
