"""Where a run's generated music drifts from the data: one checkpoint against real pieces, by depth.

Generated music can be denser or hold more notes than the data although the model scores well: each drawn
event feeds back through the LSTM state. Four views of a run with distribution heads tell where:
  * teacher-forced on the first --length events of --pieces pieces of --split: by depth, the mean actual dt
    against the time head's expected dt, the release rate against the model's probability of a release
    (with every sub-event drawn before the velocity, or the pitch, known) and the notes held; and how the
    model reads each piece's tempo (log mean dt over the segment) there: the correlation across pieces of
    the expected with the actual, and the gain (the slope of the expected on the actual: below 1, the
    model pulls each piece's tempo towards the average);
  * the same on the model's own samples from silence: there drawn and expected agree when the sampler
    draws what the model says;
  * state or events: over the last depth segment of both, the expected dt read from the start against
    read from a zero state over those events alone (as a training window reads): equal where the model's
    predictions depend on the events it has just read, not on how long it has run;
  * free-running after a primer: each piece's first --primer events set the state, --continuation events
    are drawn (the run's sampling settings) and set beside the piece's real continuation: notes per second,
    notes held, and how long the primer's tempo is kept (the correlation across pieces of each segment's
    tempo with the primer's last segment's), by depth.
dt above the time head's last bin counts as that bin (`sample.max_dt` clips drawn gaps so too).

  python scripts/diagnose_generation.py --workdir RUN --data DATA [--split validation] [--pieces 32]
      [--length 2048] [--primer 512] [--continuation 1024] [--segment 256] [--seed 0] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from musicgen_jax import checkpointing, distributions, input_pipeline, models, sampling
from musicgen_jax.errors import UserError

Events = dict[str, np.ndarray]


def first_events(data: str, split: str, count: int, length: int) -> Events:
  """The first `length` events [count, length] of the first `count` pieces of the split that hold that many."""
  store = input_pipeline.open_store(data, split)
  chosen = [i for i in range(store.num_pieces) if store.lengths[i] >= length][:count]
  if len(chosen) < count:
    raise UserError(f"{split} holds {len(chosen)} pieces of at least {length} events, not {count}: "
                    "ask for fewer --pieces or shorter --length, --primer or --continuation")
  pieces = [store.piece(i) for i in chosen]
  return {"pitch": np.stack([p.pitch[:length] for p in pieces]).astype(np.int32),
          "dt": np.stack([p.dt[:length] for p in pieces]).astype(np.float32),
          "velocity": np.stack([p.velocity[:length] for p in pieces]).astype(np.float32)}


def time_class_probabilities(outputs: jax.Array, bins: distributions.TimeBins) -> jax.Array:
  """P(time class) [..., bins.count] from the time head's outputs [..., bins.outputs]."""
  if not bins.mixture:
    return jax.nn.softmax(outputs.astype(jnp.float32), axis=-1)
  return jnp.exp(-distributions.time_nll(outputs[..., None, :], jnp.arange(bins.count), bins))


def expected_dt(outputs: jax.Array, bins: distributions.TimeBins) -> jax.Array:
  """The expected dt in seconds [...] under the time head's outputs [..., bins.outputs], each class at its
  bin's midpoint."""
  midpoints = distributions.dt_of_class(jnp.arange(bins.count), jnp.float32(0.5), bins)
  return time_class_probabilities(outputs, bins) @ midpoints


@nnx.jit(static_argnames="first")
def teacher_forced(model: models.MusicLSTM, events: Events, first: int = 0) -> dict[str, jax.Array]:
  """Per event from `first` on of streams [B, T] that start in silence: the model's expected dt and P(release)
  given what came before, and the notes held before it. The model reads from its zero state from event
  `first` on (the notes held then given), as a training window does; from the start by default."""
  start = {k: jnp.full((events["pitch"].shape[0], 1), v, events[k].dtype) for k, v in sampling.START_EVENT.items()}
  inputs = {k: jnp.concatenate([start[k], events[k][:, :-1]], axis=1) for k in events}
  held = models.held_pitches(inputs["pitch"], inputs["dt"], inputs["velocity"])
  window = lambda streams: {k: v[:, first:] for k, v in streams.items()}
  inputs, events = window(inputs), window(events)
  outputs, _ = model(inputs, targets=events, held=held[:, first - 1] if first else None)
  sounding = held[:, first:] >= 0
  expected = jax.lax.map(lambda piece: expected_dt(piece, model.time_bins), outputs["time_logits"])
  if model.order.index("velocity") < model.order.index("pitch"):  # Restricted as the sampler restricts it.
    allowed = sampling.allowed_classes("velocity", {}, sounding, distributions.NUM_VELOCITIES)
    logits = jnp.where(allowed, outputs["velocity_logits"].astype(jnp.float32), -jnp.inf)
    release = jax.nn.softmax(logits, axis=-1)[..., 0]
  else:
    release = jnp.sum(jnp.where(sounding, jax.nn.softmax(outputs["pitch_logits"].astype(jnp.float32), -1), 0.0), -1)
  return {"expected_dt": expected, "p_release": release, "held": jnp.sum(sounding, axis=-1)}


@nnx.jit(static_argnames="length")
def continuation(model: models.MusicLSTM, primer: Events, keys: jax.Array, settings: sampling.Settings,
                 length: int) -> Events:
  """`length` events [B, length] drawn after each row of `primer` [B, P], as `generate --primer` draws them (a
  conditioned model at each primer's own controls)."""
  controls = sampling.primer_controls(model.controls, primer)
  state, event = sampling.prime(model, primer, controls)
  return sampling.sample(model, state, event, keys, settings, length, sampling.held_after(primer),
                         controls=controls)[0]


def segments(total: int, size: int) -> list[tuple[int, int]]:
  """[start, end) of the consecutive depth segments of `size` events that cover `total`."""
  return [(start, min(start + size, total)) for start in range(0, total, size)]


def notes_per_second(events: Events, max_dt: float) -> float:
  """Onsets per second of music over all rows of `events`, gaps clipped at `max_dt`."""
  return float(np.sum(events["velocity"] > 0) / np.sum(np.minimum(events["dt"], max_dt), dtype=np.float64))


def notes_held(events: Events) -> np.ndarray:
  """The notes sounding [B, T] after each event of streams [B, T] that start in silence."""
  return np.asarray(jnp.sum(models.held_pitches(*(jnp.asarray(events[k]) for k in ("pitch", "dt", "velocity"))) >= 0,
                            axis=-1))


def tempo(dt: np.ndarray, max_dt: float) -> np.ndarray:
  """Each row's tempo [B] over gaps `dt` [B, T]: the log of its mean gap, gaps clipped at `max_dt`."""
  return np.log(np.maximum(np.minimum(dt, max_dt).mean(axis=1), 1e-6))


def correlation(a: np.ndarray, b: np.ndarray) -> float | None:
  """Pearson's correlation of two rows of values, None where either is constant."""
  return float(np.corrcoef(a, b)[0, 1]) if np.std(a) > 0 and np.std(b) > 0 else None


def gain(actual: np.ndarray, expected: np.ndarray) -> float | None:
  """The least-squares slope of `expected` on `actual`, None where `actual` is constant."""
  return float(np.polyfit(actual, expected, 1)[0]) if np.std(actual) > 0 else None


def calibration(model: models.MusicLSTM, events: Events, size: int) -> list[dict[str, Any]]:
  """`teacher_forced` on `events`, averaged over each depth segment, beside the actual dt and releases, and
  how the expected tempo follows each piece's actual tempo there."""
  predicted = jax.tree.map(np.asarray, teacher_forced(model, {k: jnp.asarray(v) for k, v in events.items()}))
  max_dt = model.time_bins.max_dt
  actual_dt = np.minimum(events["dt"], max_dt)
  rows = []
  for lo, hi in segments(events["dt"].shape[1], size):
    actual, expected = tempo(events["dt"][:, lo:hi], max_dt), tempo(predicted["expected_dt"][:, lo:hi], max_dt)
    rows.append({"events": [lo, hi], "dt_ms": 1e3 * float(actual_dt[:, lo:hi].mean()),
                 "expected_dt_ms": 1e3 * float(predicted["expected_dt"][:, lo:hi].mean()),
                 "release_rate": float(np.mean(events["velocity"][:, lo:hi] == 0)),
                 "p_release": float(predicted["p_release"][:, lo:hi].mean()),
                 "held": float(predicted["held"][:, lo:hi].mean()),
                 "tempo_correlation": correlation(actual, expected), "tempo_gain": gain(actual, expected)})
  return rows


def state_or_events(model: models.MusicLSTM, streams: dict[str, Events],
                    depths: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
  """The expected dt over the last depth segment of each set of streams (`calibration`'s last row `depths`
  gives it read from the start), and read from a zero state over that segment alone: equal where what the
  model predicts depends on the events it has just read, not on how long it has run."""
  segment = next(iter(depths.values()))[-1]["events"]
  alone = lambda events: 1e3 * float(np.mean(np.asarray(teacher_forced(
      model, {k: jnp.asarray(v) for k, v in events.items()}, segment[0])["expected_dt"])))
  return {"events": segment, **{name: {"from_start_ms": depths[name][-1]["expected_dt_ms"],
                                       "segment_alone_ms": alone(events)} for name, events in streams.items()}}


def drift(model: models.MusicLSTM, pieces: Events, primer: int, settings: sampling.Settings, seed: int,
          size: int) -> list[dict[str, Any]]:
  """Notes per second, notes held and the primer's tempo kept (the correlation of each segment's tempo with
  that of the primer's last `size` events), by depth after the primer, of the drawn and the real
  continuations."""
  head = {k: v[:, :primer] for k, v in pieces.items()}
  length = pieces["dt"].shape[1] - primer
  keys = sampling.sequence_keys(seed, 0, pieces["dt"].shape[0])
  drawn = jax.tree.map(np.asarray, continuation(model, head, keys, settings, length))
  real = {k: v[:, primer:] for k, v in pieces.items()}
  real_held = notes_held(pieces)[:, primer:]
  drawn_held = notes_held({k: np.concatenate([head[k], drawn[k].astype(head[k].dtype)], 1) for k in head})[:, primer:]
  max_dt = float(settings.max_dt)
  primer_tempo = tempo(head["dt"][:, -size:], max_dt)
  rows = []
  for lo, hi in segments(length, size):
    real_density, drawn_density = (notes_per_second({k: v[:, lo:hi] for k, v in stream.items()}, max_dt)
                                   for stream in (real, drawn))
    rows.append({"events": [lo, hi], "real_notes_per_s": real_density, "drawn_notes_per_s": drawn_density,
                 "ratio": drawn_density / real_density, "real_held": float(real_held[:, lo:hi].mean()),
                 "drawn_held": float(drawn_held[:, lo:hi].mean()),
                 "real_tempo_kept": correlation(primer_tempo, tempo(real["dt"][:, lo:hi], max_dt)),
                 "drawn_tempo_kept": correlation(primer_tempo, tempo(drawn["dt"][:, lo:hi], max_dt))})
  return rows


def figure(value: float | None, width: int) -> str:
  """A correlation or gain right-aligned in `width`, "-" where there is none."""
  return f"{value:{width}.2f}" if value is not None else f"{'-':>{width}}"


def format_report(report: dict[str, Any]) -> str:
  """The report as tables."""
  lines = [f"run {report['workdir']} (step {report['step']}), {report['pieces']} pieces of {report['split']}"]
  for name in ("real", "own samples"):
    lines += ["", f"teacher-forced on {name}, first {report['length']} events (tempo: expected against actual)",
              f"{'events':>11} {'dt ms':>8} {'expected':>9} {'releases':>9} {'P(release)':>11} {'held':>6} "
              f"{'tempo r':>8} {'gain':>5}"]
    lines += [f"{row['events'][0]:5d}-{row['events'][1]:<5d} {row['dt_ms']:8.1f} {row['expected_dt_ms']:9.1f} "
              f"{row['release_rate']:9.3f} {row['p_release']:11.3f} {row['held']:6.2f} "
              f"{figure(row['tempo_correlation'], 8)} {figure(row['tempo_gain'], 5)}" for row in report[name]]
  context = report["context"]
  lines += ["", f"events {context['events'][0]}-{context['events'][1]}, expected dt read from the start against "
            "from a zero state over them alone (the notes held before them given)"]
  lines += [f"{name:>12}: {context[name]['from_start_ms']:.1f} ms against {context[name]['segment_alone_ms']:.1f} ms"
            for name in ("real", "own samples")]
  lines += ["", f"free-running after a primer of {report['primer']} events: notes per second, notes held, and the "
            "primer's tempo kept (correlation with its last segment's)",
            f"{'events':>11} {'real':>7} {'drawn':>7} {'ratio':>6} {'held real':>10} {'held drawn':>11} "
            f"{'kept real':>10} {'kept drawn':>11}"]
  lines += [f"{row['events'][0]:5d}-{row['events'][1]:<5d} {row['real_notes_per_s']:7.2f} "
            f"{row['drawn_notes_per_s']:7.2f} {row['ratio']:6.3f} {row['real_held']:10.2f} {row['drawn_held']:11.2f} "
            f"{figure(row['real_tempo_kept'], 10)} {figure(row['drawn_tempo_kept'], 11)}"
            for row in report["continuation"]]
  return "\n".join(lines)


def diagnose(args: argparse.Namespace) -> dict[str, Any]:
  """The four views of `diagnose` for the parsed command line."""
  run = checkpointing.load_run(args.workdir, args.checkpoint)
  if run.config.model.heads != "distribution":
    raise UserError(f"{args.workdir} has {run.config.model.heads} heads: this diagnosis reads distribution heads")
  model = nnx.merge(run.graphdef, run.params)
  settings = sampling.make_settings(run.config)
  pieces = first_events(args.data, args.split, args.pieces, max(args.length, args.primer + args.continuation))
  state, event = sampling.start(model)
  keys = sampling.sequence_keys(args.seed, 0, args.pieces)
  own, _ = sampling.sample_compiled(run.graphdef, run.params, state, event, keys, settings, args.length,
                                    controls=sampling.sequence_controls(run.config, args.seed, 0, args.pieces))
  streams = {"real": {k: v[:, :args.length] for k, v in pieces.items()}, "own samples": jax.tree.map(np.asarray, own)}
  depths = {name: calibration(model, events, args.segment) for name, events in streams.items()}
  return {"workdir": str(args.workdir), "step": run.step, "split": args.split, "pieces": args.pieces,
          "length": args.length, "primer": args.primer,
          **depths, "context": state_or_events(model, streams, depths),
          "continuation": drift(model, {k: v[:, :args.primer + args.continuation] for k, v in pieces.items()},
                                args.primer, settings, args.seed, args.segment)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="run folder")
  parser.add_argument("--data", required=True, help="prepared corpus (`musicgen prepare`)")
  parser.add_argument("--split", default="validation")
  parser.add_argument("--checkpoint", default="latest")
  parser.add_argument("--pieces", type=int, default=32, help="pieces (rows) in each view")
  parser.add_argument("--length", type=int, default=2048, help="events scored teacher-forced")
  parser.add_argument("--primer", type=int, default=512, help="events of each piece that set the state")
  parser.add_argument("--continuation", type=int, default=1024, help="events drawn after the primer")
  parser.add_argument("--segment", type=int, default=256, help="events per depth segment")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
  args = parser.parse_args()
  if min(args.pieces, args.length, args.primer, args.continuation, args.segment) < 1:
    parser.error("--pieces, --length, --primer, --continuation and --segment must be at least 1")
  try:
    report = diagnose(args)
  except UserError as error:
    sys.exit(f"diagnose_generation: error: {error}")
  print(json.dumps(report, indent=1) if args.json else format_report(report))


if __name__ == "__main__":
  main()
