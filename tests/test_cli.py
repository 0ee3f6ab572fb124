"""The command line: every user mistake is one line and exit 2; the menu works through a pipe."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mido
import numpy as np
import pytest

from musicgen_jax import cli, cudnn_lstm


def write_melody(path: Path, notes: int, seed: int) -> None:
  """A one-track MIDI file of `notes` short notes, enough for tiny training windows."""
  track = mido.MidiTrack()
  for i in range(notes):
    pitch = 48 + (i * 7 + seed) % 36
    track.append(mido.Message("note_on", note=pitch, velocity=40 + (i * 13) % 80, time=0 if i == 0 else 60))
    track.append(mido.Message("note_off", note=pitch, velocity=0, time=120))
  midi = mido.MidiFile(ticks_per_beat=480)
  midi.tracks.append(track)
  path.parent.mkdir(parents=True, exist_ok=True)
  midi.save(path)


@pytest.fixture(scope="module")
def midi_folder(tmp_path_factory) -> Path:
  folder = tmp_path_factory.mktemp("midi")
  for i in range(12):
    write_melody(folder / f"piece_{i}.mid", 120, i)
  return folder


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
  code = cli.main(list(argv))
  out, err = capsys.readouterr()
  return code, out, err


def test_version_and_help(capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["--version"])
  assert exit_info.value.code == 0
  assert "musicgen-jax" in capsys.readouterr().out
  for command in ("prepare", "train", "generate", "evaluate", "config", "demo", "menu"):
    with pytest.raises(SystemExit):
      cli.main([command, "--help"])
    assert "usage: musicgen " + command in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["generate", "--workdir", "{tmp}/no-run", "--out", "{tmp}/out"], "does not exist"),
    (["generate", "--workdir", "{tmp}/empty-run", "--out", "{tmp}/out"], "no checkpoint"),
    (["evaluate", "--workdir", "{tmp}/no-run", "--data", "{tmp}"], "no run"),
    (["train", "--workdir", "{tmp}/run", "--config", "tiny", "train.steps=lots"], "bad value"),
    (["train", "--workdir", "{tmp}/run", "--config", "tiny", "modle.hidden=3"], "unknown config key"),
    (["train", "--workdir", "{tmp}/run", "--config", "tiny", "--data", "{tmp}/nothing"], "musicgen prepare"),
    (["prepare", "{tmp}/missing", "--out", "{tmp}/data"], "{tmp}/missing"),
])
def test_user_mistakes_are_one_line_and_exit_2(capsys, tmp_path, argv, message):
  (tmp_path / "empty-run").mkdir()
  from musicgen_jax.config import load_config, save_config

  save_config(load_config("tiny"), tmp_path / "empty-run")
  code, _, err = run_cli(capsys, *(a.format(tmp=tmp_path) for a in argv))
  assert code == 2
  assert err.count("\n") == 1 and err.startswith("musicgen: error: ")
  assert message.format(tmp=tmp_path) in err


@pytest.mark.parametrize("flag", [["--num", "0"], ["--length", "-3"], ["--batch-size", "x"]])
def test_bad_numbers_are_rejected_by_the_parser(capsys, tmp_path, flag):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["generate", "--workdir", str(tmp_path), *flag])
  assert exit_info.value.code == 2
  assert "Traceback" not in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained_run(midi_folder, tmp_path_factory) -> Path:
  """A tiny run trained for a few steps through the CLI, shared by the tests that need a checkpoint."""
  root = tmp_path_factory.mktemp("run")
  assert cli.main(["prepare", str(midi_folder), "--out", str(root / "data"), "--workers", "1"]) == 0
  assert cli.main(["train", "--workdir", str(root / "run"), "--config", "tiny", "--data", str(root / "data"),
                   "--quiet", "train.steps=4", "train.log_every=2"]) == 0
  return root / "run"


@pytest.mark.parametrize("argv, message", [
    (["--temperature", "0"], "temperature"),
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "1.5"], "top"),
    (["--primer", "{tmp}/missing.mid"], "missing.mid"),
    (["--primer", "{tmp}/garbage.mid"], "garbage.mid"),
    (["--checkpoint", "999"], "999"),
    (["--notes-per-second", "4"], "model.condition=none"),
    (["--polyphony", "4"], "does not read the polyphony control"),
])
def test_generation_mistakes_are_one_line_and_exit_2(capsys, tmp_path, trained_run, argv, message):
  (tmp_path / "garbage.mid").write_bytes(b"this is not a MIDI file")
  code, _, err = run_cli(capsys, "generate", "--workdir", str(trained_run), "--out", str(tmp_path / "out"),
                         "--quiet", *(a.format(tmp=tmp_path) for a in argv))
  assert code == 2, err
  assert err.count("\n") == 1 and message.format(tmp=tmp_path) in err


def test_resuming_with_another_model_shape_is_refused(capsys, trained_run):
  code, _, err = run_cli(capsys, "train", "--workdir", str(trained_run), "model.hidden=32")
  assert code == 2 and "model.hidden" in err


def test_menu_through_a_pipe_trains_generates_and_quits(midi_folder, tmp_path):
  answers = "\n".join([
      "7", "1",          # a wrong choice re-asks, then Train
      "0",               # create a new model
      "bad name!", "piano",  # an invalid name re-asks
      "",                # no filter
      str(midi_folder),  # the MIDI folder
      "tiny",            # config
      "abc", "6",        # a bad step count re-asks
      "2", "1",          # generate with the first run
      "3",               # quit
  ]) + "\n"
  env = dict(os.environ, MUSICGEN_HOME=str(tmp_path / "home"))
  result = subprocess.run([sys.executable, "-m", "musicgen_jax.cli"], input=answers, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "Please type a number from 1 to 3." in result.stdout
  assert "Use letters, digits" in result.stdout
  assert "Please type a whole number" in result.stdout
  assert "Saved piano at step 6" in result.stdout
  written = list((tmp_path / "home" / "generated" / "piano").glob("*.mid"))
  assert len(written) == 1 and f"Wrote {written[0]}" in result.stdout
  assert result.stdout.rstrip().endswith("Bye.")


def test_menu_survives_end_of_input(tmp_path):
  env = dict(os.environ, MUSICGEN_HOME=str(tmp_path))
  result = subprocess.run([sys.executable, "-m", "musicgen_jax.cli"], input="1\n", env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0 and "Traceback" not in result.stderr
  assert result.stdout.rstrip().endswith("Bye.")


def test_evaluate_prints_deterministic_json(capsys, trained_run, midi_folder, tmp_path, monkeypatch):
  import json

  monkeypatch.setenv("MUSICGEN_HOME", str(tmp_path))
  prepared = trained_run.parent / "data"
  code, out, _ = run_cli(capsys, "evaluate", "--workdir", str(trained_run), "--data", str(prepared),
                         "--split", "train")
  assert code == 0
  first = json.loads(out)
  assert set(first) == {"pitch_nll", "pitch_accuracy", "time_nll", "velocity_nll", "total_nll", "bits_per_note",
                        "bits_per_second", "events", "step", "condition"}
  assert first["step"] == 4 and first["events"] > 0 and first["condition"] == "none"
  assert first["total_nll"] == pytest.approx(first["pitch_nll"] + first["time_nll"] + first["velocity_nll"])
  assert first["bits_per_note"] == pytest.approx(2 * first["total_nll"] / math.log(2))
  code, out, _ = run_cli(capsys, "evaluate", "--workdir", str(trained_run), "--data", str(midi_folder),
                         "--split", "train", "--checkpoint", "4")
  assert code == 0 and json.loads(out) == first


def test_evaluate_scores_regression_heads_on_the_same_scale(capsys, midi_folder, tmp_path):
  import json

  data = tmp_path / "data"
  assert cli.main(["prepare", str(midi_folder), "--out", str(data), "--workers", "1"]) == 0
  assert cli.main(["train", "--workdir", str(tmp_path / "run"), "--config", "tiny", "--data", str(data), "--quiet",
                   "train.steps=4", "train.log_every=2", "model.heads=regression"]) == 0
  capsys.readouterr()
  code, out, _ = run_cli(capsys, "evaluate", "--workdir", str(tmp_path / "run"), "--data", str(data),
                         "--split", "train")
  metrics = json.loads(out)
  assert code == 0
  assert {"dt_mae_ms", "velocity_rmse", "time_nll", "velocity_nll", "total_nll", "bits_per_note"} <= set(metrics)
  assert 0 < metrics["time_nll"] < 50 and 0 < metrics["velocity_nll"] < 50


def test_sigterm_saves_and_exits_cleanly(midi_folder, trained_run, tmp_path):
  import signal
  import time

  workdir = tmp_path / "run"
  command = [sys.executable, "-m", "musicgen_jax.cli", "train", "--workdir", str(workdir), "--config", "tiny",
             "--data", str(trained_run.parent / "data"), "--quiet", "train.steps=100000", "train.log_every=5"]
  process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 300
  while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and time.time() < deadline:
    time.sleep(0.2)
  process.send_signal(signal.SIGTERM)
  out, err = process.communicate(timeout=120)
  assert process.returncode == 0, err[-2000:]
  assert f"in {workdir / 'checkpoints'}" in out
  from musicgen_jax import checkpointing

  saved = checkpointing.checkpoint_manager(workdir).latest_step()
  assert saved is not None and saved >= 10 and f"saved step {saved} " in out
  assert err.count("musicgen: stopping:") == 1


@pytest.mark.skipif(cudnn_lstm.platform() is not None, reason="checks a machine without cuDNN")
def test_a_run_moves_between_recurrences(capsys, trained_run, tmp_path):
  """The recurrence changes no parameter: a run trained with cuDNN generates here, and resumes with
  another recurrence; asking for cuDNN here is one line."""
  run = tmp_path / "run"
  shutil.copytree(trained_run, run)
  saved = json.loads((run / "config.json").read_text())
  saved["model"]["recurrence"] = "cudnn"
  (run / "config.json").write_text(json.dumps(saved))
  code, _, err = run_cli(capsys, "generate", "--workdir", str(run), "--out", str(tmp_path / "out"), "--num", "2",
                         "--length", "8", "--quiet")
  assert code == 0, err
  code, _, err = run_cli(capsys, "train", "--workdir", str(run), "--quiet", "model.recurrence=cudnn")
  assert code == 2 and err.count("\n") == 1 and "model.recurrence=cudnn needs a CUDA or ROCm GPU" in err
  code, _, err = run_cli(capsys, "train", "--workdir", str(run), "--quiet", "model.recurrence=scan", "train.steps=6")
  assert code == 0, err
  assert json.loads((run / "config.json").read_text())["model"]["recurrence"] == "scan"


BAD_VALUES = [
    "seed=-1", "data.window=0", "data.workers=-1", "data.prefetch=0", "data.transpose=200", "data.transpose=-1",
    "data.time_stretch=1.0", "data.loudness_stretch=-0.5", "data.eval_windows=0", "model.inputs=foo",
    "model.embed=0", "model.hidden=-5", "model.layers=0", "model.head_divisors=(2,0)", "model.head_divisors=(2,1000)",
    "model.dropout=1.5", "model.dropout=-0.1", "model.heads=mixture", "model.order=('pitch','time')",
    "model.order=('pitch','time','time')", "model.dt_bin=0", "model.dt_max=0.001", "model.dtype=float8",
    "model.param_dtype=int8", "train.steps=0",
    "train.steps=3000000000", "train.batch_size=0", "train.isolation=loose", "train.predict_last=-1",
    "train.predict_last=33", "train.steps_per_execution=0", "train.log_every=0", "train.eval_every=0",
    "train.checkpoint_every=-1", "train.keep_checkpoints=0", "train.sample_every=-5", "train.sample_count=0",
    "train.sample_length=0", "train.optimizers.pitch.name=adamx", "train.optimizers.pitch.decay=linear",
    "train.optimizers.time.learning_rate=-0.001", "train.optimizers.time.learning_rate=nan",
    "train.optimizers.velocity.warmup_steps=-1", "train.optimizers.pitch.decay_rate=0",
    "train.optimizers.time.decay_steps=0", "train.optimizers.velocity.clip_norm=-1",
    "train.optimizers.pitch.weight_decay=-0.1", "mesh.data=-1", "mesh.data=3", "sample.max_dt=0",
    "sample.release_threshold=200", "sample.release_threshold=-1", "model.condition=tempo",
    "sample.density_quantiles=(4.0,0.0)",
]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
  from musicgen_jax import store

  pieces = [store.Events(np.full(100, 60 + i, np.uint8), np.full(100, 0.1, np.float32), np.full(100, 70, np.uint8))
            for i in range(4)]
  return store.write_corpus(tmp_path_factory.mktemp("prepared"), {"train": pieces, "validation": pieces[:1]})


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]] | None:
  """Every file under `folder` with its modification time and bytes; None where the folder does not exist."""
  if not folder.exists():
    return None
  return {str(path.relative_to(folder)): (path.stat().st_mtime_ns, path.read_bytes() if path.is_file() else b"")
          for path in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("override", BAD_VALUES)
@pytest.mark.parametrize("folder", ["new", "trained"])
def test_every_bad_value_is_refused_in_one_line_before_the_run_folder_is_touched(capsys, tmp_path, prepared,
                                                                                 trained_run, folder, override):
  workdir = tmp_path / "run" if folder == "new" else trained_run
  before = snapshot(workdir)
  code, _, err = run_cli(capsys, "train", "--workdir", str(workdir), "--config", "tiny", "--data", str(prepared),
                         "--quiet", override)
  assert code == 2, err
  assert err.count("\n") == 1 and err.startswith("musicgen: error: ") and "Traceback" not in err
  key = override.partition("=")[0]
  assert key in err or (key.startswith("model.") and folder == "trained" and "another model shape" in err)
  assert snapshot(workdir) == before


@pytest.fixture
def broken_run(trained_run, tmp_path) -> Path:
  """A copy of the trained run whose config.json was edited by hand to a value no rule allows."""
  import json
  import shutil

  workdir = shutil.copytree(trained_run, tmp_path / "broken")
  config = json.loads((workdir / "config.json").read_text())
  config["model"]["dropout"] = 1.5
  (workdir / "config.json").write_text(json.dumps(config))
  return workdir


@pytest.mark.parametrize("command", [["generate", "--out", "{tmp}/out"], ["evaluate", "--data", "{data}"],
                                     ["train"]])
def test_a_bad_value_in_a_saved_config_is_one_line_for_every_command(capsys, broken_run, trained_run, tmp_path,
                                                                      command):
  before = snapshot(broken_run)
  argv = [a.format(tmp=tmp_path, data=trained_run.parent / "data") for a in command]
  code, _, err = run_cli(capsys, argv[0], "--workdir", str(broken_run), *argv[1:])
  assert code == 2 and err == "musicgen: error: bad config value model.dropout=1.5: it must be a number in [0, 1)\n"
  assert snapshot(broken_run) == before and not (tmp_path / "out").exists()


def test_generate_into_a_read_only_folder_is_refused_before_sampling(capsys, trained_run, tmp_path, monkeypatch,
                                                                      make_read_only):
  from musicgen_jax import sampling

  def no_sampling(*args, **kwargs):
    raise AssertionError("sampled before checking the output folder")

  monkeypatch.setattr(sampling, "sample_compiled", no_sampling)
  out = make_read_only(tmp_path / "out")
  for target in (out, out / "new"):
    code, _, err = run_cli(capsys, "generate", "--workdir", str(trained_run), "--out", str(target), "--quiet")
    assert code == 2 and err.count("\n") == 1 and f"output folder {target}" in err, err


def test_training_into_a_read_only_folder_is_refused_before_training(capsys, prepared, tmp_path, make_read_only):
  parent = make_read_only(tmp_path / "runs")
  code, _, err = run_cli(capsys, "train", "--workdir", str(parent / "run"), "--config", "tiny", "--data",
                         str(prepared), "--quiet")
  assert code == 2 and err.count("\n") == 1 and f"run folder {parent / 'run'}" in err, err
