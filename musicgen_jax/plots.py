"""Pictures: piano rolls of MIDI files or event streams, training curves of a run, and samples during training.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot: no screen and no global state), and
saved as PNG or returned as RGB arrays for TensorBoard.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from musicgen_jax import events, paths, rundir
from musicgen_jax.errors import UserError
from musicgen_jax.store import Events

if TYPE_CHECKING:
  import ml_collections
  from flax import nnx
  from matplotlib.figure import Figure

PIANO_RANGE = (21, 108)  # A0 to C8: the rolls show at least the keyboard.
NOTE_HEIGHT = 0.8  # Semitones a note's bar covers.
ROLL_SIZE = (12.0, 4.5)  # Inches at DPI: 1200 x 450 pixels.
PANEL_SIZE = (4.0, 2.8)
PANEL_COLUMNS = 3
DPI = 100
SKIPPED_METRICS = ("events",)  # Counts rather than metrics.
PHASES = ("train", "eval")


def new_figure(size: tuple[float, float]) -> Figure:
  """An empty figure on an Agg canvas."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  figure = Figure(figsize=size, dpi=DPI, layout="constrained")
  FigureCanvasAgg(figure)
  return figure


def pixels(figure: Figure) -> np.ndarray:
  """The rendered figure as an RGB uint8 array [height, width, 3]."""
  figure.canvas.draw()
  return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()


def save(figure: Figure, path: str | os.PathLike) -> Path:
  """Writes the figure as a PNG file and returns its path; a UserError if it can't be written."""
  try:
    figure.savefig(path, format="png")
  except OSError as error:
    raise UserError(f"could not write {path} ({error.strerror or error}): free space or make its folder "
                    "writable") from None
  return Path(path)


def read_events(source: Events | str | os.PathLike) -> Events:
  """`source` itself, or the events of a MIDI file (sustain applied); a UserError if it can't be read."""
  if isinstance(source, Events):
    return source
  try:
    return events.midi_to_events(source)
  except events.MidiReadError as error:
    raise UserError(f"cannot read {source}: {error}") from None


def piano_roll(source: Events | str | os.PathLike, title: str = "") -> Figure:
  """Pitch over time, one bar per note (sustain-extended as note-seq gives it), velocity as colour."""
  from matplotlib.collections import PolyCollection
  from matplotlib.colors import Normalize

  piece = events.note_arrays(read_events(source))
  low, high = piece.pitch - NOTE_HEIGHT / 2, piece.pitch + NOTE_HEIGHT / 2
  corners = np.stack([np.stack([piece.start, low], -1), np.stack([piece.end, low], -1),
                      np.stack([piece.end, high], -1), np.stack([piece.start, high], -1)], axis=1)
  figure = new_figure(ROLL_SIZE)
  axes = figure.add_subplot()
  bars = PolyCollection(corners, array=piece.velocity, cmap="viridis", norm=Normalize(0, 127), edgecolors="none")
  axes.add_collection(bars)
  axes.set_xlim(0.0, max(piece.end.max(initial=0.0), 1.0))
  octaves = np.arange(0, 128, 12)
  axes.set_yticks(octaves, [f"C{octave // 12 - 1}" for octave in octaves])
  axes.set_ylim(min(PIANO_RANGE[0], piece.pitch.min(initial=127)) - 1,
                max(PIANO_RANGE[1], piece.pitch.max(initial=0)) + 1)
  axes.grid(axis="y", alpha=0.3)
  axes.set_xlabel("time (s)")
  axes.set_ylabel("pitch")
  axes.set_title(title)
  figure.colorbar(bars, ax=axes, label="velocity")
  return figure


def write_piano_rolls(midi_paths: list[Path]) -> list[Path]:
  """A piano-roll PNG beside each MIDI file (same name, .png); returns their paths."""
  return [save(piano_roll(path, path.name), path.with_suffix(".png")) for path in midi_paths]


def read_metrics(run_dir: str | os.PathLike) -> dict[str, dict[int, float]]:
  """The train/* and eval/* series of RUN/metrics.jsonl: key -> {step: value}, a resumed run's later values winning."""
  path = rundir.metrics_file(run_dir)
  if not path.is_file():
    raise UserError(f"{path} does not exist: give a run folder that `musicgen train` has logged to")
  series: dict[str, dict[int, float]] = {}
  for line in path.read_text().splitlines():
    try:
      record = json.loads(line)
      step = int(record["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):  # A line cut short by a kill, or not a log line.
      continue
    for key, value in record.items():
      if key.split("/")[0] in PHASES and isinstance(value, (int, float)):
        series.setdefault(key, {})[step] = float(value)
  if not series:
    raise UserError(f"{path} holds no train/ or eval/ metrics yet: train the run for train.log_every steps")
  return series


def curves(series: Mapping[str, Mapping[int, float]], title: str = "") -> Figure:
  """One panel per metric name over step, the train and eval series of that name together."""
  names = sorted({key.split("/", 1)[1] for key in series} - set(SKIPPED_METRICS))
  rows = math.ceil(len(names) / PANEL_COLUMNS)
  figure = new_figure((PANEL_SIZE[0] * PANEL_COLUMNS, PANEL_SIZE[1] * rows))
  figure.suptitle(title)
  for index, name in enumerate(names):
    axes = figure.add_subplot(rows, PANEL_COLUMNS, index + 1)
    for colour, phase in enumerate(PHASES):
      points = series.get(f"{phase}/{name}")
      if points:
        steps = np.array(sorted(points))
        axes.plot(steps, [points[step] for step in steps], label=phase, color=f"C{colour}",
                  marker="." if len(steps) < 50 else None)
    axes.set_title(name, fontsize="medium")
    axes.set_xlabel("step")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
  return figure


def write_curves(run_dir: str | os.PathLike) -> Path:
  """RUN/curves.png: the training curves of RUN/metrics.jsonl; returns its path."""
  run_dir = Path(run_dir)
  if not run_dir.is_dir():
    raise UserError(f"run folder {run_dir} does not exist: give one that `musicgen train --workdir` wrote")
  return save(curves(read_metrics(run_dir), run_dir.name), rundir.curves_file(run_dir))


def plot(path: str | os.PathLike) -> Path:
  """RUN/curves.png for a run folder, or a piano roll beside a MIDI file; returns the PNG's path."""
  path = Path(path)
  if not path.exists():
    raise UserError(f"{path} does not exist: give a run folder (for its curves) or a MIDI file (for its piano roll)")
  paths.check_writable(path.parent if path.is_file() else path, "the folder")
  if path.is_file():
    return write_piano_rolls([path])[0]
  return write_curves(path)


def log_samples(run_dir: str | os.PathLike, graphdef: nnx.GraphDef, params: nnx.State,
                config: ml_collections.ConfigDict, step: int, writer: Any, *, num: int = 4,
                length: int = 512) -> list[Path]:
  """Samples `num` pieces of `length` events from the current parameters and shows them.

  Writes RUN/samples/step_<step>/sample_<i>.mid and logs each piano roll to `writer` (a tensorboardX
  SummaryWriter) as image `samples/<i>`. Every call draws the same random numbers (from
  `config.seed`), so the samples of successive steps differ only by what the model learned.
  """
  import jax

  from musicgen_jax import generate, sampling

  settings = sampling.make_settings(config)
  state, event = sampling.prime_compiled(graphdef, params, None)
  keys = sampling.sequence_keys(config.seed, 0, num)
  batch = jax.device_get(sampling.sample_compiled(graphdef, params, state, event, keys, settings, length,
                                                  controls=sampling.sequence_controls(config, config.seed, 0, num))[0])
  files = generate.output_paths(generate.make_out_dir(rundir.samples_dir(run_dir, step)), "sample", num)
  for row, path in enumerate(files):
    stream = sampling.to_events(batch, row)
    generate.write_midi(stream, path)
    image = pixels(piano_roll(stream, f"step {step}, sample {row}"))
    writer.add_image(f"samples/{row}", image, step, dataformats="HWC")
  return files
