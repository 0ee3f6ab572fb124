"""The original project's interactive menu: [1] train (new or continue), [2] generate, [3] quit.

It reads plain lines, so it is scriptable through a pipe; bad input re-asks with a hint and the end
of input quits cleanly. Runs live in $MUSICGEN_HOME/runs, prepared data in $MUSICGEN_HOME/data and
generated files in $MUSICGEN_HOME/generated/<run>.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence, TextIO

from musicgen_jax import paths, rundir
from musicgen_jax.errors import UserError

MIDI_ENV = "MUSICGEN_MIDI"
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class EndOfInput(Exception):
  """The user closed standard input: leave the menu quietly."""


class Menu:
  """Asks questions on `out` and reads answers from `inp`, one line each."""

  def __init__(self, inp: TextIO, out: TextIO):
    self.inp, self.out = inp, out

  def say(self, text: str = "") -> None:
    print(text, file=self.out, flush=True)

  def ask(self, prompt: str, default: str | None = None) -> str:
    shown = f"{prompt} [{default}]: " if default else f"{prompt}: "
    print(shown, end="", file=self.out, flush=True)
    line = self.inp.readline()
    if not line:
      raise EndOfInput
    return line.strip() or (default or "")

  def choose(self, prompt: str, options: Sequence[str], first: int = 1) -> int:
    """Shows numbered options and returns the number picked, re-asking until it is one of them."""
    for number, option in enumerate(options, start=first):
      self.say(f"  [{number}] {option}")
    last = first + len(options) - 1
    while True:
      answer = self.ask(prompt)
      if answer.isdigit() and first <= int(answer) <= last:
        return int(answer)
      self.say(f"Please type a number from {first} to {last}.")

  def ask_steps(self) -> int | None:
    """Steps to train, or None to train until Ctrl+C."""
    while True:
      answer = self.ask("Steps to train (empty: until Ctrl+C)")
      if not answer:
        return None
      if answer.isdigit() and int(answer) > 0:
        return int(answer)
      self.say("Please type a whole number above 0, or press Enter to train until Ctrl+C.")


def list_runs() -> list[Path]:
  """Run folders under $MUSICGEN_HOME/runs, by name."""
  runs = paths.runs_dir()
  return sorted(p for p in runs.iterdir() if rundir.is_run(p)) if runs.is_dir() else []


def default_midi_source() -> str:
  """$MUSICGEN_MIDI, else the Bach chorales the demo converts from music21."""
  from musicgen_jax import demo

  return os.environ.get(MIDI_ENV) or str(demo.chorales_to_midi(paths.home() / "demo" / "chorales-midi"))


def ask_config(menu: Menu) -> str:
  """A config name or file, re-asked until it loads and every value passes the config checks."""
  from musicgen_jax import config_checks
  from musicgen_jax.config import load_config

  while True:
    name = menu.ask(f"Config ({', '.join(paths.bundled_configs())} or a file)", "default")
    try:
      config_checks.check(load_config(name))
      return name
    except UserError as error:
      menu.say(f"{error}\nType another config.")


def new_run(menu: Menu) -> tuple[Path, list[str], str]:
  """Asks a name, a filter string, the MIDI source and a config; prepares the data for the new run."""
  from musicgen_jax import prepare

  while True:
    name = menu.ask("Name of the new model")
    if RUN_NAME.match(name) and not (paths.runs_dir() / name).exists():
      break
    menu.say("Use letters, digits, '.', '_' or '-' (up to 64), and a name no run has yet.")
  filter_text = menu.ask("Text every music file to train on should contain (empty: all files)")
  while True:
    source = menu.ask("Folder of MIDI files or MAESTRO root", os.environ.get(MIDI_ENV) or "Bach chorales")
    source = default_midi_source() if source == "Bach chorales" else source
    if Path(source).exists():
      break
    menu.say(f"{source} does not exist; type a folder that holds .mid or .midi files.")
  config_name = ask_config(menu)
  data_dir = paths.data_dir() / name
  prepare.prepare_corpus([source], data_dir, workers=os.cpu_count() or 1, filter_text=filter_text or None)
  return paths.runs_dir() / name, [f"data.dir={data_dir}"], config_name


def steps_done(workdir: Path) -> int:
  """The step of a run's latest checkpoint, 0 if it has none."""
  from musicgen_jax import checkpointing

  if not rundir.checkpoint_dir(workdir).is_dir():
    return 0
  manager = checkpointing.checkpoint_manager(workdir, read_only=True)
  try:
    return manager.latest_step() or 0
  finally:
    manager.close()


def train_menu(menu: Menu) -> None:
  """[0] creates a new model, a number continues that run; training stops on Ctrl+C and saves."""
  from musicgen_jax import plots, train
  from musicgen_jax.config import run_config

  runs = list_runs()
  picked = menu.choose("Choose a model to train", ["create a new model", *(run.name for run in runs)], first=0)
  if picked == 0:
    workdir, overrides, config_name = new_run(menu)
  else:
    workdir, overrides, config_name = runs[picked - 1], [], None
  steps = menu.ask_steps()
  overrides.append(f"train.steps={train.UNTIL_STOPPED if steps is None else steps_done(workdir) + steps}")
  config = run_config(workdir, config_name, None, overrides)
  menu.say(f"Training {workdir.name}; press Ctrl+C to stop and save.")
  state = train.train_and_evaluate(config, workdir, samples=plots.log_samples)
  menu.say(f"Saved {workdir.name} at step {int(state.step)} in {rundir.checkpoint_dir(workdir)}.")


def generate_menu(menu: Menu) -> None:
  """Picks a run and writes one new track into $MUSICGEN_HOME/generated/<run>."""
  from musicgen_jax import generate

  runs = list_runs()
  if not runs:
    menu.say("There is no trained model yet: choose [1] to train one first.")
    return
  picked = menu.choose("Choose a model to generate with", [run.name for run in runs])
  run = runs[picked - 1]
  out_dir = paths.outputs_dir() / run.name
  seed = len(list(out_dir.glob("*.mid"))) if out_dir.is_dir() else 0
  files = generate.generate(run, out_dir, num=1, length=1024, batch_size=1, seed=seed, prefix=f"track{seed:04d}")
  menu.say(f"Wrote {files[0]}")


def run_menu(inp: TextIO, out: TextIO) -> int:
  """The menu loop; returns the exit code (0 on Quit or end of input)."""
  menu = Menu(inp, out)
  actions = {1: train_menu, 2: generate_menu}
  try:
    while True:
      menu.say("\nmusicgen-jax: piano music from an LSTM")
      choice = menu.choose("Your choice", ["Train a model", "Generate a music track", "Quit"])
      if choice == 3:
        break
      try:
        actions[choice](menu)
      except UserError as error:
        menu.say(f"Could not do that: {error}")
  except EndOfInput:
    menu.say()
  menu.say("Bye.")
  return 0
