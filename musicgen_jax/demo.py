"""`musicgen demo`: the whole job end to end on data that ships with a dependency, no network needed.

The Bach chorales of music21's corpus are converted once to MIDI (cached), prepared, used to train
`configs/demo.py` for a few minutes on the CPU, and the run writes a handful of new MIDI files.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from musicgen_jax import atomic, paths

COMPLETE_MARKER = ".complete"


def chorales_to_midi(out_dir: Path, progress: bool = True) -> Path:
  """Writes music21's Bach chorales as MIDI into `out_dir` once; later calls reuse the folder."""
  if (out_dir / COMPLETE_MARKER).is_file():
    return out_dir
  from music21 import converter, corpus
  from tqdm import tqdm

  out_dir.mkdir(parents=True, exist_ok=True)
  skipped = []
  for source in tqdm(corpus.getComposer("bach"), desc="Bach chorales -> MIDI", unit="file", disable=not progress):
    target = out_dir / f"{source.stem}.mid"
    if target.exists():
      continue
    try:
      with atomic.replacing(target) as tmp:
        converter.parse(source, forceSource=True).write("midi", fp=str(tmp))
    except Exception as error:  # music21 raises many types on a badly formed score; skip that score.
      skipped.append(f"{source.name} ({type(error).__name__})")
  if skipped:
    print(f"skipped {len(skipped)} chorales music21 could not convert: {', '.join(skipped)}", file=sys.stderr)
  (out_dir / COMPLETE_MARKER).touch()
  return out_dir


def run_demo(home: str | os.PathLike | None = None, *, steps: int | None = None, num_files: int = 4,
             progress: bool = True) -> list[Path]:
  """Prepares the chorales, trains `configs/demo.py` (for `steps` steps, default its `train.steps`; resuming
  if run before), generates."""
  from musicgen_jax import config_checks, generate, plots, prepare, rundir, train
  from musicgen_jax.config import apply_overrides, load_config, model_differences, read_config
  from musicgen_jax.errors import UserError

  root = Path(home or paths.home()) / "demo"
  data_dir, run, generated = root / "data", root / "run", root / "generated"
  config = apply_overrides(load_config("demo"), [f"data.dir={data_dir}", *([f"train.steps={steps}"] if steps else [])])
  config_checks.check(config)
  if rundir.is_run(run) and model_differences(read_config(run), config):
    raise UserError(f"{run} holds a demo run of another model (an earlier version's): remove that folder, "
                    "or pass --home elsewhere, to train the demo's model afresh")
  paths.check_writable(root, "demo folder")
  midi_dir = chorales_to_midi(root / "chorales-midi", progress)
  prepare.prepare_corpus([str(midi_dir)], data_dir, workers=os.cpu_count() or 1, filter_text=None,
                         progress=progress)
  train.train_and_evaluate(config, run, progress=progress, samples=plots.log_samples)
  files = generate.generate(run, generated, num=num_files, length=512,
                            batch_size=num_files, seed=0, overwrite=True, progress=progress)
  print("\n".join([
      f"Generated {len(files)} MIDI files:", *(f"  {path}" for path in files),
      f"The trained run is {run} (config.json, checkpoints/, metrics.jsonl, TensorBoard logs in tensorboard/).",
      "Try next:",
      f"  musicgen generate --workdir {run} --out {generated} --num 16 --seconds 30 --overwrite  (drawn as the "
      "run's config says, pitches from the nucleus of mass 0.9; --top-p 1 draws from the whole distribution)",
      f"  musicgen generate --workdir {run} --out {generated} --num 4 --notes-per-second 6 --polyphony 3.3 "
      "--overwrite  (slower and thinner than most chorales; left out, each file's are drawn from the chorales')",
      f"  musicgen stats {generated} --reference {data_dir}  (how the samples compare with the chorales)",
      f"  musicgen evaluate --workdir {run} --data {data_dir}  (NLL per event and bits per note)",
      f"  musicgen plot {run}  (training curves)",
      "  musicgen prepare /path/to/maestro-v3.0.0 --out data/maestro  (then train configs/default.py on it)",
  ]))
  return files
