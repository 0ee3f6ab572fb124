"""The command line: every user mistake is one line and exit 2; the menu works through a pipe."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mido
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
                        "bits_per_second", "events", "step"}
  assert first["step"] == 4 and first["events"] > 0
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
