"""MIDI to WAV with FluidSynth and a General MIDI soundfont (Debian packages `fluidsynth`, `fluid-soundfont-gm`).

Both are found on the machine, never installed: where one is missing, `unavailable()` says how to
install it, and `render_wav` raises that as a UserError.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Sequence

from musicgen_jax import atomic
from musicgen_jax.errors import UserError

INSTALL = "apt-get install fluidsynth fluid-soundfont-gm"
SOUNDFONT_ENV = "MUSICGEN_SOUNDFONT"
SOUNDFONTS = (Path("/usr/share/sounds/sf2/FluidR3_GM.sf2"), Path("/usr/share/sounds/sf2/default-GM.sf2"),
              Path("/usr/share/soundfonts/FluidR3_GM.sf2"), Path("/usr/share/soundfonts/default.sf2"))
SAMPLE_RATE = 44100


def find_soundfont() -> Path | None:
  """$MUSICGEN_SOUNDFONT if set, else the first General MIDI soundfont of the usual Linux places; None if absent."""
  override = os.environ.get(SOUNDFONT_ENV)
  candidates = (Path(override),) if override else SOUNDFONTS
  return next((path for path in candidates if path.is_file()), None)


def unavailable() -> str | None:
  """Why WAV files can't be rendered here, saying how to fix it; None when they can."""
  if shutil.which("fluidsynth") is None:
    return f"FluidSynth is not installed: {INSTALL}"
  if find_soundfont() is None:
    return f"no General MIDI soundfont found: {INSTALL} (or set ${SOUNDFONT_ENV} to a .sf2 file)"
  return None


def render_wav(midi_path: str | os.PathLike, wav_path: str | os.PathLike | None = None, *,
               sample_rate: int = SAMPLE_RATE) -> Path:
  """Renders a MIDI file to a 16-bit stereo WAV file (default: beside it, .wav) and returns its path.

  Written under a temporary name and renamed into place, so a failed render leaves no partial file.
  """
  problem = unavailable()
  if problem:
    raise UserError(problem)
  midi_path = Path(midi_path)
  if not midi_path.is_file() or midi_path.read_bytes()[:4] != b"MThd":
    raise UserError(f"{midi_path} is not a MIDI file")
  wav_path = midi_path.with_suffix(".wav") if wav_path is None else Path(wav_path)
  with atomic.replacing(wav_path) as tmp:
    command = ["fluidsynth", "-n", "-i", "-q", "-T", "wav", "-r", str(sample_rate), "-F", str(tmp),
               str(find_soundfont()), str(midi_path)]
    result = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if result.returncode or not tmp.is_file():
      reason = (result.stderr or result.stdout).strip().splitlines()
      detail = reason[-1] if reason else f"exit {result.returncode}"
      raise UserError(f"fluidsynth could not render {midi_path}: {detail}")
  return wav_path


def render_all(midi_paths: Sequence[Path]) -> list[Path]:
  """A WAV file beside each MIDI file; returns their paths."""
  return [render_wav(path) for path in midi_paths]
