"""Pictures: piano rolls and training curves are valid PNGs of sensible size; samples during training;
`musicgen plot`."""

import json

import numpy as np
import pytest
from matplotlib import image

from musicgen_jax import cli, events, generate, plots
from musicgen_jax.store import Events

SCALE = Events(np.repeat(np.arange(60, 68), 2).astype(np.uint8), np.tile([0.0, 0.25], 8).astype(np.float32),
               np.tile([90, 0], 8).astype(np.uint8))
EMPTY = Events(np.zeros(0, np.uint8), np.zeros(0, np.float32), np.zeros(0, np.uint8))
ROLL_PIXELS = (450, 1200)


def png_shape(path):
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  return image.imread(path).shape


def run_cli(capsys, *argv):
  code = cli.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return code, out, err


@pytest.mark.parametrize("stream", [SCALE, EMPTY], ids=["scale", "empty"])
def test_piano_roll_of_events_is_a_png_of_the_roll_size(tmp_path, stream):
  path = plots.save(plots.piano_roll(stream, "title"), tmp_path / "roll.png")
  assert png_shape(path)[:2] == ROLL_PIXELS


def test_piano_roll_pixels_show_the_notes():
  blank, roll = plots.pixels(plots.piano_roll(EMPTY)), plots.pixels(plots.piano_roll(SCALE))
  assert roll.shape == (*ROLL_PIXELS, 3) and roll.dtype == np.uint8
  assert np.sum(np.any(roll != blank, axis=-1)) > 1000


def write_metrics(run, lines):
  run.mkdir(parents=True, exist_ok=True)
  (run / "metrics.jsonl").write_text("".join(f"{line}\n" for line in lines))


def training_log():
  """Two logged steps of train metrics, one eval, a resumed step 20 and a line cut short by a kill."""
  train = lambda step, loss: json.dumps({"step": step, "train/loss_pitch": loss, "train/pitch_accuracy": 0.1,
                                         "train/learning_rate_pitch": 1e-3})
  evaluation = json.dumps({"step": 20, "eval/pitch_nll": 4.0, "eval/pitch_accuracy": 0.2, "eval/events": 512})
  return [train(10, 5.0), train(20, 4.5), evaluation, train(20, 4.4), '{"step": 30, "train/lo']


def test_metrics_keep_the_last_value_of_a_step_and_skip_a_torn_line(tmp_path):
  write_metrics(tmp_path, training_log())
  series = plots.read_metrics(tmp_path)
  assert series["train/loss_pitch"] == {10: 5.0, 20: 4.4}
  assert series["eval/pitch_nll"] == {20: 4.0}


def test_plot_run_writes_curves_and_prints_the_path(capsys, tmp_path):
  run = tmp_path / "run"
  write_metrics(run, training_log())
  code, out, err = run_cli(capsys, "plot", run)
  assert code == 0, err
  assert out.strip() == str(run / "curves.png")
  height, width, _ = png_shape(run / "curves.png")
  # Panels: learning_rate_pitch, loss_pitch, pitch_accuracy, pitch_nll (eval/events is a count): 2 rows of 3.
  assert (height, width) == (2 * 280, 1200)


def test_plot_midi_file_writes_its_piano_roll_beside_it(capsys, tmp_path):
  events.write_midi(SCALE, tmp_path / "scale.mid")
  code, out, err = run_cli(capsys, "plot", tmp_path / "scale.mid")
  assert code == 0, err
  assert out.strip() == str(tmp_path / "scale.png") and png_shape(tmp_path / "scale.png")[:2] == ROLL_PIXELS


@pytest.mark.parametrize("target, lines, message", [
    ("missing", None, "does not exist"),
    ("run", None, "metrics.jsonl does not exist"),
    ("run", ['{"step": 1, "other": 2}'], "no train/ or eval/ metrics"),
    ("noise.mid", None, "cannot read"),
])
def test_plot_mistakes_are_one_line_and_exit_2(capsys, tmp_path, target, lines, message):
  (tmp_path / "run").mkdir()
  (tmp_path / "noise.mid").write_bytes(b"not MIDI")
  if lines:
    write_metrics(tmp_path / "run", lines)
  code, _, err = run_cli(capsys, "plot", tmp_path / target)
  assert code == 2
  assert err.count("\n") == 1 and err.startswith("musicgen: error: ") and message in err


def test_generate_plot_writes_a_piano_roll_beside_each_file(capsys, tmp_path, monkeypatch):
  def fake_generate(workdir, out_dir, **kwargs):
    paths = generate.output_paths(generate.make_out_dir(out_dir), kwargs["prefix"], kwargs["num"])
    for path in paths:
      events.write_midi(SCALE, path)
    return paths

  monkeypatch.setattr(generate, "generate", fake_generate)
  code, out, err = run_cli(capsys, "generate", "--workdir", tmp_path, "--out", tmp_path / "out", "--num", 2, "--plot")
  assert code == 0, err
  assert "2 piano rolls" in out
  assert [png_shape(tmp_path / "out" / f"sample_{i}.png")[:2] for i in range(2)] == [ROLL_PIXELS] * 2


class RecordingWriter:
  """Stands in for a tensorboardX SummaryWriter: records the images logged."""

  def __init__(self):
    self.images = []

  def add_image(self, tag, image_array, step, dataformats):
    self.images.append((tag, image_array, step, dataformats))


def test_log_samples_writes_midi_and_logs_piano_rolls(tmp_path):
  from musicgen_jax import steps
  from musicgen_jax.config import apply_overrides, load_config

  config = apply_overrides(load_config("tiny"), ["model.hidden=32", "model.embed=8", "sample.release_threshold=32.0"])
  graphdef, state = steps.create_train_state(config)
  writer = RecordingWriter()
  paths = plots.log_samples(tmp_path, graphdef, state.params, config, 7, writer, num=2, length=40)
  assert paths == [tmp_path / "samples" / "step_7" / f"sample_{i}.mid" for i in range(2)]
  assert all(len(events.midi_to_events(path)) > 0 for path in paths)
  assert [(tag, step, dataformats) for tag, _, step, dataformats in writer.images] == [
      ("samples/0", 7, "HWC"), ("samples/1", 7, "HWC")]
  assert all(array.shape == (*ROLL_PIXELS, 3) and array.dtype == np.uint8 for _, array, _, _ in writer.images)
  again = plots.log_samples(tmp_path, graphdef, state.params, config, 8, RecordingWriter(), num=2, length=40)
  assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths]


def test_plot_beside_a_midi_file_in_a_read_only_folder_is_one_line(capsys, tmp_path, make_read_only):
  (tmp_path / "midi").mkdir()
  events.write_midi(SCALE, tmp_path / "midi" / "scale.mid")
  folder = make_read_only(tmp_path / "midi")
  code, _, err = run_cli(capsys, "plot", folder / "scale.mid")
  assert code == 2 and err.count("\n") == 1 and f"cannot write in the folder {folder}" in err, err
  assert not (folder / "scale.png").exists()
