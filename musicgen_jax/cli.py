"""The `musicgen` command: prepare, train, generate, evaluate, demo, config, and the original's menu.

Heavy imports (JAX, note-seq) happen inside the subcommands so that `musicgen --help` is instant and
`prepare` can start its worker processes before JAX starts any thread.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from musicgen_jax import __version__, paths
from musicgen_jax.errors import UserError

EXIT_USER_ERROR = 2


def positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
  if value <= 0:
    raise argparse.ArgumentTypeError(f"{value} must be at least 1")
  return value


def positive_float(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
  if not 0.0 < value < float("inf"):
    raise argparse.ArgumentTypeError(f"{value} must be a positive number")
  return value


def fraction(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
  if not 0.0 <= value < 1.0:
    raise argparse.ArgumentTypeError(f"{value} must be in [0, 1)")
  return value


def cmd_prepare(args: argparse.Namespace) -> int:
  from musicgen_jax import prepare

  manifest = prepare.prepare_corpus(args.sources, args.out, workers=args.workers, filter_text=args.filter,
                                    val_fraction=args.val_fraction, sustain=not args.no_sustain,
                                    file_timeout=args.file_timeout)
  counts = ", ".join(f"{name}: {split['files']} files, {split['events']} events"
                     for name, split in manifest["splits"].items())
  print(f"prepared {args.out} ({counts})")
  return 0


def cmd_train(args: argparse.Namespace) -> int:
  from musicgen_jax import checkpointing, plots, rundir, train
  from musicgen_jax.config import run_config

  config = run_config(args.workdir, args.config, args.data, args.overrides)
  try:
    state = train.train_and_evaluate(config, args.workdir, progress=not args.quiet, samples=plots.log_samples)
  except train.NonFiniteLoss as error:
    print(f"musicgen: training stopped: {error}", file=sys.stderr)
    return 1
  except checkpointing.CheckpointWriteError as error:
    # orbax leaves threads of the failed save waiting 5 minutes for a signal that never comes; they would
    # hold the process open, so it ends here.
    print(f"musicgen: error: {error}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(EXIT_USER_ERROR)
  print(f"saved step {int(state.step)} of {config.train.steps} in {rundir.checkpoint_dir(args.workdir)}")
  return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
  from musicgen_jax import evaluate

  print(json.dumps(evaluate.evaluate_run(args.workdir, args.data, split=args.split, checkpoint=args.checkpoint)))
  return 0


def cmd_generate(args: argparse.Namespace) -> int:
  from musicgen_jax import generate

  files = generate.generate(args.workdir, args.out, num=args.num, length=args.length, seconds=args.seconds,
                            batch_size=args.batch_size, temperature=args.temperature,
                            time_temperature=args.time_temperature, velocity_temperature=args.velocity_temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed, primer=args.primer,
                            primer_events=args.primer_events, keep_primer=args.keep_primer,
                            notes_per_second=args.notes_per_second, polyphony=args.polyphony,
                            checkpoint=args.checkpoint, prefix=args.prefix, overwrite=args.overwrite,
                            progress=not args.quiet)
  print(f"wrote {len(files)} MIDI file{'s' * (len(files) != 1)} to {Path(args.out).resolve()}")
  if args.plot:
    from musicgen_jax import plots

    plots.write_piano_rolls(files)
    print(f"wrote {len(files)} piano roll{'s' * (len(files) != 1)} (.png) beside them")
  if args.wav:
    from musicgen_jax import audio

    problem = audio.unavailable()
    if problem:
      print(f"musicgen: warning: no WAV files written: {problem}", file=sys.stderr)
    else:
      audio.render_all(files)
      print(f"wrote {len(files)} WAV file{'s' * (len(files) != 1)} beside them")
  return 0


def cmd_stats(args: argparse.Namespace) -> int:
  from musicgen_jax import stats

  report = stats.judge(args.generated, args.reference, split=args.split, max_dt=args.max_dt, excerpt=args.excerpts)
  print(json.dumps(report) if args.json else stats.format_table(report))
  return 0


def cmd_plot(args: argparse.Namespace) -> int:
  from musicgen_jax import plots

  for path in args.paths:
    print(plots.plot(path))
  return 0


def cmd_config(args: argparse.Namespace) -> int:
  from musicgen_jax import config as config_lib

  config = config_lib.read_config(args.workdir) if args.workdir else config_lib.load_config(args.config)
  print(config_lib.apply_overrides(config, args.overrides))
  return 0


def cmd_demo(args: argparse.Namespace) -> int:
  from musicgen_jax import demo

  demo.run_demo(args.home, steps=args.steps)
  return 0


def cmd_menu(args: argparse.Namespace) -> int:
  from musicgen_jax import menu

  return menu.run_menu(sys.stdin, sys.stdout)


def add_checkpoint_flag(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--checkpoint", default="latest", metavar="STEP|best|latest",
                      help="which checkpoint of the run to load (default: latest)")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="musicgen", description="Train a causal three-head LSTM on piano MIDI and generate new MIDI. "
      "With no arguments, opens the interactive menu (also scriptable through a pipe).")
  parser.add_argument("--version", action="version", version=f"musicgen-jax {__version__}")
  commands = parser.add_subparsers(title="commands", metavar="COMMAND")

  def command(name: str, handler: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
    sub = commands.add_parser(name, help=help_text, description=help_text)
    sub.set_defaults(handler=handler)
    return sub

  prep = command("prepare", cmd_prepare, "Turn MIDI files (a MAESTRO root, folders or files) into an event corpus.")
  prep.add_argument("sources", nargs="+", metavar="SOURCE", help="MAESTRO root, folder of MIDI files, or MIDI file")
  prep.add_argument("--out", required=True, metavar="DIR", help="folder to write the prepared corpus to")
  prep.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1,
                    help="parser processes (default: all cores)")
  prep.add_argument("--filter", metavar="TEXT", help="keep only pieces whose path, composer or title contains TEXT")
  prep.add_argument("--val-fraction", type=fraction, default=0.1, metavar="F",
                    help="share of a plain folder held out for validation (default 0.1; MAESTRO uses its own split)")
  prep.add_argument("--no-sustain", action="store_true", help="ignore the sustain pedal")
  prep.add_argument("--file-timeout", type=float, default=60.0, metavar="SECONDS",
                    help="skip a file that takes longer than this to read (default 60)")

  tr = command("train", cmd_train, "Train a run, or resume it from its latest checkpoint. Ctrl+C saves and exits.")
  tr.add_argument("--workdir", required=True, metavar="RUN", help="run folder (config, checkpoints, logs)")
  tr.add_argument("--config", metavar="FILE|NAME",
                  help=f"config file or bundled name: {', '.join(paths.bundled_configs())}")
  tr.add_argument("--data", metavar="DIR", help="prepared corpus from `musicgen prepare` (sets data.dir)")
  tr.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=5000")
  tr.add_argument("--quiet", action="store_true", help="no progress bar")

  gen = command("generate", cmd_generate, "Write new MIDI files from a trained run.")
  gen.add_argument("--workdir", required=True, metavar="RUN", help="run folder to load")
  gen.add_argument("--out", default=str(paths.outputs_dir()), metavar="DIR",
                   help="folder for the MIDI files (default: $MUSICGEN_HOME/generated)")
  gen.add_argument("--num", type=positive_int, default=1, metavar="N", help="files to write (default 1)")
  length = gen.add_mutually_exclusive_group()
  length.add_argument("--length", type=positive_int, metavar="EVENTS", help="events per file (default 1024)")
  length.add_argument("--seconds", type=positive_float, metavar="S",
                      help="instead of --length: end each file once its music reaches S seconds")
  gen.add_argument("--batch-size", type=positive_int, default=64, metavar="B",
                   help="files sampled at once (default 64)")
  gen.add_argument("--temperature", type=float, metavar="T",
                   help="pitch sampling temperature (default: the run's sample.temperature, 1 in the bundled configs)")
  gen.add_argument("--time-temperature", type=float, metavar="T",
                   help="temperature of the time (dt) distribution (distribution heads; default: the run's, 1)")
  gen.add_argument("--velocity-temperature", type=float, metavar="T",
                   help="temperature of the velocity distribution (distribution heads; default: the run's, 1)")
  gen.add_argument("--top-k", type=int, metavar="K",
                   help="sample only among the K likeliest pitches (0: off; default: the run's, off)")
  gen.add_argument("--top-p", type=float, metavar="P",
                   help="nucleus sampling mass (1: off; default: the run's, 0.98 in configs/default.py)")
  gen.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
  gen.add_argument("--primer", metavar="FILE.mid", help="MIDI file whose events warm up the model")
  gen.add_argument("--primer-events", type=positive_int, metavar="P",
                   help="use the primer's first P events (default: up to 2048)")
  gen.add_argument("--keep-primer", action="store_true", help="include the primer in the written files")
  gen.add_argument("--notes-per-second", type=positive_float, metavar="N",
                   help="play every file at N notes a second (runs whose model.condition reads density; default: "
                        "the primer's, or without one a density drawn for each file from the training pieces')")
  gen.add_argument("--polyphony", type=positive_float, metavar="N",
                   help="hold N notes at once on average in every file (runs whose model.condition reads polyphony; "
                        "default: the primer's, or without one a polyphony drawn for each file from the training "
                        "pieces')")
  gen.add_argument("--prefix", default="sample", help="file name prefix (default: sample)")
  gen.add_argument("--overwrite", action="store_true", help="replace files of the same names in --out")
  gen.add_argument("--quiet", action="store_true", help="no progress bar")
  gen.add_argument("--plot", action="store_true", help="also write a piano-roll PNG beside each MIDI file")
  gen.add_argument("--wav", action="store_true",
                   help="also render each file to WAV with FluidSynth (apt-get install fluidsynth fluid-soundfont-gm)")
  add_checkpoint_flag(gen)

  ev = command("evaluate", cmd_evaluate, "Score a run on held-out data; prints one JSON object.")
  ev.add_argument("--workdir", required=True, metavar="RUN", help="run folder to load")
  ev.add_argument("--data", required=True, metavar="DIR", help="prepared corpus, MIDI folder or MAESTRO root")
  ev.add_argument("--split", default="validation", help="split to score (default: validation)")
  add_checkpoint_flag(ev)

  st = command("stats", cmd_stats, "Judge generated MIDI against real pieces: per-piece statistics compared as "
               "distributions (overlap area, Yang & Lerch 2018), beside the ceiling of real held-out pieces.")
  st.add_argument("generated", metavar="GENERATED_DIR", help="folder of generated MIDI files (or one file)")
  st.add_argument("--reference", required=True, metavar="DIR",
                  help="prepared corpus (its --split; its other split gives the ceiling), MAESTRO root or MIDI folder")
  st.add_argument("--split", default="validation", help="reference split to compare with (default: validation)")
  st.add_argument("--max-dt", type=float, default=4.0, metavar="S",
                  help="the run's sample.max_dt: dt at this clip is counted (default 4.0)")
  st.add_argument("--excerpts", action="store_true",
                  help="judge against excerpts of the real pieces as long as the generated ones (their median "
                       "event count) instead of whole pieces: like with like for fixed-length generations")
  st.add_argument("--json", action="store_true", help="print one JSON object instead of the table")

  pl = command("plot", cmd_plot, "Draw RUN/curves.png from a run's metrics.jsonl, or a piano roll beside a MIDI file.")
  pl.add_argument("paths", nargs="+", metavar="RUN|FILE.mid", help="run folder or MIDI file; prints each PNG's path")

  cf = command("config", cmd_config, "Print a config with its keys (bundled, a file, or a run's).")
  cf.add_argument("--config", default="default", metavar="FILE|NAME", help="config to print (default: default)")
  cf.add_argument("--workdir", metavar="RUN", help="print this run's saved config instead")
  cf.add_argument("overrides", nargs="*", metavar="key=value", help="overrides to apply first")

  demo = command("demo", cmd_demo, "Prepare Bach chorales from music21, train the demo model, write samples.")
  demo.add_argument("--home", default=str(paths.home()), help="where the demo's data, run and outputs go")
  demo.add_argument("--steps", type=positive_int, help="training steps (default: configs/demo.py's, 3000)")

  command("menu", cmd_menu, "The original's interactive menu: train, continue, generate, quit.")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of the `musicgen` console script; returns the exit code."""
  import warnings

  from absl import flags, logging

  flags.FLAGS.mark_as_parsed()
  logging.set_verbosity(logging.ERROR)
  warnings.filterwarnings("ignore", message="Couldn't find ffmpeg")
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = build_parser()
  args = parser.parse_args(argv or ["menu"])
  if not hasattr(args, "handler"):
    parser.print_help()
    return EXIT_USER_ERROR
  try:
    return args.handler(args)
  except UserError as error:
    for line in str(error).splitlines():
      print(f"musicgen: error: {line}", file=sys.stderr)
    return EXIT_USER_ERROR
  except KeyboardInterrupt:
    print("musicgen: interrupted", file=sys.stderr)
    return 130
  except BrokenPipeError:
    sys.stdout = open(os.devnull, "w")
    return 0


if __name__ == "__main__":
  sys.exit(main())
