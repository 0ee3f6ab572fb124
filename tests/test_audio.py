"""WAV rendering: FluidSynth where installed (else skipped with the reason), one helpful line where it isn't."""

import os
import shutil
import wave

import numpy as np
import pytest

from musicgen_jax import audio, cli, events, generate
from musicgen_jax.errors import UserError
from musicgen_jax.store import Events

SCALE = Events(np.repeat(np.arange(60, 68), 2).astype(np.uint8), np.tile([0.0, 0.25], 8).astype(np.float32),
               np.tile([90, 0], 8).astype(np.uint8))


@pytest.fixture
def scale_file(tmp_path):
  events.write_midi(SCALE, tmp_path / "scale.mid")
  return tmp_path / "scale.mid"


@pytest.fixture
def renderer():
  """Skips the test, with the reason, where FluidSynth or a soundfont is missing (nothing is installed)."""
  problem = audio.unavailable()
  if problem:
    pytest.skip(problem)


@pytest.fixture
def no_fluidsynth(monkeypatch):
  real_which = shutil.which
  monkeypatch.setattr(shutil, "which", lambda name, *args, **kwargs: None if name == "fluidsynth"
                      else real_which(name, *args, **kwargs))


def test_render_writes_a_stereo_wav_at_least_as_long_as_the_music(renderer, scale_file):
  path = audio.render_wav(scale_file)
  assert path == scale_file.with_suffix(".wav")
  with wave.open(str(path)) as wav:
    assert (wav.getnchannels(), wav.getframerate(), wav.getsampwidth()) == (2, audio.SAMPLE_RATE, 2)
    assert wav.getnframes() >= 2.0 * audio.SAMPLE_RATE  # 8 notes of 0.25 s
  assert sorted(p.name for p in scale_file.parent.iterdir()) == ["scale.mid", "scale.wav"]


def test_not_a_midi_file_is_a_user_error_and_leaves_nothing(renderer, tmp_path):
  (tmp_path / "noise.mid").write_bytes(b"not MIDI")
  with pytest.raises(UserError, match="not a MIDI file"):
    audio.render_wav(tmp_path / "noise.mid")
  assert [p.name for p in tmp_path.iterdir()] == ["noise.mid"]


def test_missing_fluidsynth_says_how_to_install_it(no_fluidsynth, scale_file):
  assert audio.unavailable() == f"FluidSynth is not installed: {audio.INSTALL}"
  with pytest.raises(UserError, match="apt-get install fluidsynth fluid-soundfont-gm"):
    audio.render_wav(scale_file)


def test_missing_soundfont_says_how_to_install_it(monkeypatch, tmp_path):
  monkeypatch.setattr(shutil, "which", lambda name, *args, **kwargs: f"/usr/bin/{name}")
  monkeypatch.setenv(audio.SOUNDFONT_ENV, str(tmp_path / "missing.sf2"))
  assert audio.find_soundfont() is None
  assert audio.INSTALL in audio.unavailable() and audio.SOUNDFONT_ENV in audio.unavailable()


def fake_generate(workdir, out_dir, **kwargs):
  """Writes the scale as every file instead of sampling a model."""
  paths = generate.output_paths(generate.make_out_dir(out_dir), kwargs["prefix"], kwargs["num"])
  for path in paths:
    events.write_midi(SCALE, path)
  return paths


def generate_wav(capsys, monkeypatch, tmp_path):
  monkeypatch.setattr(generate, "generate", fake_generate)
  code = cli.main(["generate", "--workdir", str(tmp_path), "--out", str(tmp_path / "out"), "--num", "2", "--wav"])
  out, err = capsys.readouterr()
  return code, out, err


def test_generate_wav_without_fluidsynth_warns_in_one_line(capsys, monkeypatch, tmp_path, no_fluidsynth):
  code, out, err = generate_wav(capsys, monkeypatch, tmp_path)
  assert code == 0 and "wrote 2 MIDI files" in out
  assert err == f"musicgen: warning: no WAV files written: FluidSynth is not installed: {audio.INSTALL}\n"
  assert not list((tmp_path / "out").glob("*.wav"))


def test_generate_wav_renders_each_file(renderer, capsys, monkeypatch, tmp_path):
  code, out, err = generate_wav(capsys, monkeypatch, tmp_path)
  assert code == 0, err
  assert "wrote 2 WAV files" in out
  assert sorted(p.name for p in (tmp_path / "out").glob("*.wav")) == ["sample_0.wav", "sample_1.wav"]


FAKE_FLUIDSYNTH = """#!/bin/sh
# Stands in for FluidSynth: writes the file after -F, or fails as it does on a bad soundfont.
[ -n "$FAIL" ] && { echo "fluidsynth: error: Failed to load SoundFont" >&2; exit 1; }
while [ "$1" != "-F" ]; do shift; done
printf 'RIFF fake wav' > "$2"
"""


@pytest.mark.parametrize("fail", [False, True])
def test_a_render_lands_whole_or_leaves_nothing(scale_file, tmp_path, monkeypatch, fail):
  """Through a stand-in FluidSynth: the WAV is renamed into place, or a failure leaves no file at all."""
  (tmp_path / "bin").mkdir()
  (tmp_path / "bin" / "fluidsynth").write_text(FAKE_FLUIDSYNTH)
  (tmp_path / "bin" / "fluidsynth").chmod(0o755)
  (tmp_path / "font.sf2").write_bytes(b"")
  monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
  monkeypatch.setenv(audio.SOUNDFONT_ENV, str(tmp_path / "font.sf2"))
  if fail:
    monkeypatch.setenv("FAIL", "1")
    with pytest.raises(UserError, match="fluidsynth could not render .*: fluidsynth: error: Failed to load"):
      audio.render_wav(scale_file)
  else:
    assert audio.render_wav(scale_file).read_bytes() == b"RIFF fake wav"
  expected = ["bin", "font.sf2", "scale.mid"] + ([] if fail else ["scale.wav"])
  assert sorted(p.name for p in tmp_path.iterdir()) == expected
