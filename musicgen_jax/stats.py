"""`musicgen stats`: judge generated music by comparing per-piece statistics with real pieces as distributions.

Every feature is computed per piece from its event stream: a number (note density, mean polyphony, ...)
or a normalised histogram (pitch classes, inter-onset intervals, ...). Two sets are then compared as
Yang & Lerch (2018, "On the evaluation of generative models in music") propose: the distances between
reference pieces (intra-set) and from judged pieces to reference pieces (inter-set) are smoothed by
Gaussian kernel density estimates, and their overlap area (1: the judged pieces sit among the
reference pieces as one more of them would) and KL divergence are reported. Intra-set distances
include each piece's zero distance to itself, so that a set compared with itself overlaps exactly 1;
those pairs are 1/n of the mass, negligible for a corpus.

The ceiling is the same comparison for real pieces: another split of the reference corpus (train,
or validation when the reference split is train) judged against the same reference split.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from musicgen_jax import events, prepare, store
from musicgen_jax.errors import UserError
from musicgen_jax.store import Events

DEFAULT_MAX_DT = 4.0  # s: `sample.max_dt` of the bundled configs.
DT_TOLERANCE = 1e-3  # s: writing MIDI rounds a clipped dt by a fraction of a millisecond.
IOI_EDGES = np.array([0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, np.inf])
DURATION_EDGES = np.array([0.0, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, np.inf])
VELOCITY_EDGES = np.arange(0, 129, 16)
FEATURES = ("pitch_class_histogram", "pitch_class_transitions", "pitch_range", "pitches_used", "note_density",
            "ioi_histogram", "duration_histogram", "velocity_mean", "velocity_std", "velocity_histogram",
            "mean_polyphony", "repeated_note_rate", "release_share", "clipped_dt_share")
GRID = 1024  # Points of the density estimates.
MIN_BANDWIDTH = 1 / 200  # Of the distances' range: keeps a set of equal distances from being a spike.
KERNEL_REACH = 4.0  # Bandwidths a Gaussian kernel is evaluated to.
EPSILON = 1e-10  # Added to densities in the KL divergence.
ROUNDING = 1e-12  # Relative error of squared distances computed from norms and dot products.
DECIMALS = 4


def ratio(numerator: float, denominator: float) -> float:
  """numerator / denominator, 0 for an empty denominator (an empty piece has no rates)."""
  return float(numerator) / float(denominator) if denominator else 0.0


def histogram(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
  """Shares of `values` in the bins between `edges` (all zero without values)."""
  counts = np.histogram(values, edges)[0].astype(np.float64)
  return counts / max(counts.sum(), 1.0)


def mean_polyphony(piece: events.Notes) -> float:
  """Notes sounding at once, averaged over the time at least one sounds (a note ending as another starts
  doesn't overlap it)."""
  time = np.concatenate([piece.start, piece.end])
  change = np.concatenate([np.ones(len(piece.start)), -np.ones(len(piece.end))])
  order = np.lexsort((change, time))
  sounding = np.cumsum(change[order])[:-1]
  span = np.diff(time[order])
  return ratio(np.sum(sounding * span), np.sum(span[sounding > 0]))


def piece_features(stream: Events, max_dt: float = DEFAULT_MAX_DT) -> dict[str, np.ndarray]:
  """Every feature of FEATURES for one piece, each a float64 vector (length 1 for numbers)."""
  piece = events.note_arrays(stream)
  pitch_class = piece.pitch % 12
  transitions = np.bincount(pitch_class[:-1] * 12 + pitch_class[1:], minlength=144).astype(np.float64)
  velocity = piece.velocity.astype(np.float64)
  has_notes = len(piece.pitch) > 0
  values = {
      "pitch_class_histogram": histogram(pitch_class, np.arange(13)),
      "pitch_class_transitions": transitions / max(transitions.sum(), 1.0),
      "pitch_range": np.ptp(piece.pitch) if has_notes else 0.0,
      "pitches_used": len(np.unique(piece.pitch)),
      "note_density": ratio(len(piece.pitch), np.sum(stream.dt, dtype=np.float64)),
      "ioi_histogram": histogram(np.diff(piece.start), IOI_EDGES),
      "duration_histogram": histogram(piece.end - piece.start, DURATION_EDGES),
      "velocity_mean": velocity.mean() if has_notes else 0.0,
      "velocity_std": velocity.std() if has_notes else 0.0,
      "velocity_histogram": histogram(velocity, VELOCITY_EDGES),
      "mean_polyphony": mean_polyphony(piece),
      "repeated_note_rate": ratio(np.sum(piece.pitch[1:] == piece.pitch[:-1]), len(piece.pitch) - 1),
      "release_share": ratio(np.sum(np.asarray(stream.velocity) == 0), len(stream)),
      "clipped_dt_share": ratio(np.sum(np.asarray(stream.dt) >= max_dt - DT_TOLERANCE), len(stream)),
  }
  return {name: np.atleast_1d(np.asarray(values[name], np.float64)) for name in FEATURES}


def feature_matrices(pieces: Sequence[Events], max_dt: float = DEFAULT_MAX_DT) -> dict[str, np.ndarray]:
  """Each feature of every piece: name -> [pieces, size]."""
  per_piece = [piece_features(piece, max_dt) for piece in pieces]
  return {name: np.stack([values[name] for values in per_piece]) for name in FEATURES}


def pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Euclidean distances [len(a), len(b)] between the rows of a and b, without an [a, b, size] intermediate.

  Squared distances within rounding of the squared norms are 0, so that equal rows are exactly 0 apart.
  """
  norms = np.sum(a * a, axis=1)[:, None] + np.sum(b * b, axis=1)[None, :]
  squared = norms - 2.0 * (a @ b.T)
  return np.sqrt(np.where(squared > ROUNDING * norms, squared, 0.0))


def bandwidth(samples: np.ndarray, floor: float) -> float:
  """Scott's rule for a 1-D Gaussian kernel, with the spread taken as the smaller of the standard deviation and the
  interquartile range / 1.349 (equal for a normal sample), at least `floor`. The quartiles keep a few outliers from
  widening the kernel of the rest: judged against real music whose feature is one value (the chorales' velocity),
  a set of files all but one of which have that value stays a peak there, where the standard deviation alone spread
  it so wide that one note's velocity in 8,000 cut the feature's overlap from 1 to 0.23."""
  lower, upper = np.percentile(samples, [25, 75])
  return max(min(float(np.std(samples)), float(upper - lower) / 1.349) * len(samples) ** -0.2, floor)


def kde_masses(samples: np.ndarray, width: float, edges: np.ndarray) -> np.ndarray:
  """A Gaussian kernel density estimate of `samples` as probability masses of the bins between `edges`.

  Binned first, then convolved with the kernel: linear in the number of samples, so a million distances are cheap.
  """
  step = edges[1] - edges[0]
  counts = np.histogram(samples, edges)[0].astype(np.float64)
  reach = min(int(np.ceil(KERNEL_REACH * width / step)), len(counts) // 2 - 1)
  kernel = np.exp(-0.5 * (np.arange(-reach, reach + 1) * step / width) ** 2)
  density = np.convolve(counts, kernel, mode="same")
  return density / density.sum()


def overlap_and_kl(reference: np.ndarray, judged: np.ndarray) -> tuple[float, float]:
  """The overlap area of the density estimates of two samples (1: the same) and KL(reference || judged)."""
  low = min(reference.min(), judged.min())
  high = max(reference.max(), judged.max())
  if high == low:
    return 1.0, 0.0
  widths = [bandwidth(x, (high - low) * MIN_BANDWIDTH) for x in (reference, judged)]
  pad = KERNEL_REACH * max(widths)
  edges = np.linspace(low - pad, high + pad, GRID + 1)
  p, q = (kde_masses(x, width, edges) for x, width in zip((reference, judged), widths))
  return float(np.minimum(p, q).sum()), float(np.sum(p * np.log((p + EPSILON) / (q + EPSILON))))


def mean_distance(a: np.ndarray) -> float | None:
  """The mean distance between two different pieces of a set (None for fewer than two)."""
  count = len(a)
  return float(pairwise_distances(a, a).sum() / (count * (count - 1))) if count > 1 else None


def summary_value(values: np.ndarray) -> float | list[float]:
  """The mean of a feature over pieces: a number, or the mean histogram as a list."""
  mean = np.round(values.mean(axis=0), DECIMALS)
  return float(mean[0]) if mean.shape == (1,) else mean.tolist()


def compare_feature(judged: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
  """`mean`, `overlap`, `kl` and `spread` (mean distance within the judged set / within the reference, 1: as varied)."""
  overlap, kl = overlap_and_kl(pairwise_distances(reference, reference).ravel(),
                               pairwise_distances(judged, reference).ravel())
  within_judged, within_reference = mean_distance(judged), mean_distance(reference)
  spread = ratio(within_judged, within_reference) if within_judged is not None and within_reference else None
  return {"mean": summary_value(judged), "overlap": round(overlap, DECIMALS), "kl": round(kl, DECIMALS),
          "spread": None if spread is None else round(spread, DECIMALS)}


def compare(judged: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
  """`compare_feature` of every feature of two sets of `feature_matrices`."""
  return {name: compare_feature(judged[name], reference[name]) for name in FEATURES}


def read_midi_pieces(files: Sequence[Path], source: Path) -> list[Events]:
  """The event streams of MIDI files (sustain applied); unreadable files are skipped with one warning line."""
  pieces, unreadable = [], []
  for file in files:
    try:
      pieces.append(events.midi_to_events(file))
    except events.MidiReadError as error:
      unreadable.append(f"{file.name}: {error}")
  if not pieces:
    raise UserError(f"none of the {len(files)} MIDI files in {source} can be read (e.g. {unreadable[0]})")
  if unreadable:
    print(f"musicgen: warning: skipped {len(unreadable)} unreadable MIDI files of {source} (e.g. {unreadable[0]})",
          file=sys.stderr)
  return pieces


def has_split(path: Path, split: str) -> bool:
  """Whether a prepared folder or MAESTRO root holds pieces of `split`."""
  if store.is_complete(path):
    return store.has_split(path, split)
  table = path.is_dir() and prepare.maestro_csv(path)
  return bool(table) and any(piece.split == split for piece in prepare.maestro_pieces(path, table))


def load_set(path: str | os.PathLike, split: str) -> list[Events]:
  """The pieces of a set: a prepared folder's or MAESTRO root's `split`, every file of a MIDI folder, or one file."""
  path = Path(path)
  if not path.exists():
    raise UserError(f"{path} does not exist: give a folder of MIDI files, a MAESTRO root or a prepared folder")
  if store.is_complete(path):
    if not store.has_split(path, split):
      raise UserError(f"{path} has no {split!r} split: choose one with --split (e.g. train, validation)")
    opened = store.open_split(path, split)
    return [opened.piece(i) for i in range(opened.num_pieces)]
  if not path.is_dir():
    return read_midi_pieces([path], path)
  table = prepare.maestro_csv(path)
  files = ([p.path for p in prepare.maestro_pieces(path, table) if p.split == split] if table
           else prepare.midi_files(path))
  if not files:
    raise UserError(f"{path} holds no MIDI files{f' in its {split!r} split' if table else ''} "
                    f"({', '.join(prepare.MIDI_SUFFIXES)}): give a folder that does")
  return read_midi_pieces(files, path)


def excerpts(piece: Events, length: int) -> list[Events]:
  """The consecutive excerpts of `length` events of a piece, the rest dropped (none from a shorter piece)."""
  return [Events(*(getattr(piece, field)[start:start + length] for field in store.FIELDS))
          for start in range(0, len(piece) - length + 1, length)]


def cut_into_excerpts(pieces: Sequence[Events], length: int, source: str) -> list[Events]:
  """Every piece's `excerpts`; a UserError naming `source` if no piece is that long."""
  cut = [excerpt for piece in pieces for excerpt in excerpts(piece, length)]
  if not cut:
    raise UserError(f"no piece of {source} holds {length:,} events, the generated pieces' length: "
                    "judge them without --excerpts, or generate shorter pieces")
  return cut


def ceiling_split(split: str) -> str:
  """The split of real pieces judged against `split` for the ceiling: train, or validation for train itself."""
  return "validation" if split == "train" else "train"


def judge(generated: str | os.PathLike, reference: str | os.PathLike, *, split: str = "validation",
          max_dt: float = DEFAULT_MAX_DT, excerpt: bool = False) -> dict[str, Any]:
  """Generated pieces compared feature by feature with a reference set, and the ceiling where there is one.

  With `excerpt` the real pieces are cut into excerpts as long as the generated pieces (their median event
  count), the reference and ceiling sets are those excerpts: generated pieces of a fixed event count are
  then judged against real music of the same count. Rates differ between the two readings: the mean note
  density of MAESTRO's validation pieces is 9.64 notes/s over whole pieces, 11.38 over their excerpts of
  2,052 events, since an excerpt of a fixed count lasts less in dense passages (BENCHMARKS.md, session 16).

  Returns {"generated", "reference", "ceiling" (or None), "max_dt", "excerpt_events" (or None), "features":
  {name: {"reference_mean", "generated", "ceiling"}}, "mean_overlap": {"generated", "ceiling"}}.
  """
  if not 0.0 < max_dt < float("inf"):
    raise UserError(f"--max-dt must be a positive number of seconds, not {max_dt}")
  reference_path, other = Path(reference), ceiling_split(split)
  generated_pieces = load_set(generated, split)
  length = int(np.median([len(piece) for piece in generated_pieces])) if excerpt else None
  real = lambda name: (cut_into_excerpts(load_set(reference_path, name), length, f"the {name} split of {reference}")
                       if excerpt else load_set(reference_path, name))
  reference_features = feature_matrices(real(split), max_dt)
  sets = {"generated": feature_matrices(generated_pieces, max_dt)}
  if has_split(reference_path, other):
    sets["ceiling"] = feature_matrices(real(other), max_dt)
  comparisons = {role: compare(features, reference_features) for role, features in sets.items()}
  pieces = {role: len(features[FEATURES[0]]) for role, features in sets.items()}
  return {
      "generated": {"path": str(generated), "pieces": pieces["generated"]},
      "reference": {"path": str(reference), "split": split, "pieces": len(reference_features[FEATURES[0]])},
      "ceiling": {"path": str(reference), "split": other, "pieces": pieces["ceiling"]} if "ceiling" in sets else None,
      "max_dt": max_dt,
      "excerpt_events": length,
      "features": {name: {"reference_mean": summary_value(reference_features[name]),
                          **{role: comparisons[role][name] for role in ("generated", "ceiling")
                             if role in comparisons}}
                   for name in FEATURES},
      "mean_overlap": {role: round(float(np.mean([c["overlap"] for c in comparison.values()])), DECIMALS)
                       for role, comparison in comparisons.items()},
  }


def cell(value: Any) -> str:
  """A table cell: numbers to 3 decimals, histograms and missing values as a dash."""
  return f"{value:.3f}" if isinstance(value, float) else "-"


def format_table(report: Mapping[str, Any]) -> str:
  """The report of `judge` as a readable table, the ceiling's columns beside the model's."""
  ceiling = report["ceiling"]
  roles = ("generated", "ceiling") if ceiling else ("generated",)
  columns = ("mean", "overlap", "kl", "spread")
  unit = f"excerpts of {report['excerpt_events']:,} events" if report["excerpt_events"] else "pieces"
  lines = [f"generated: {report['generated']['pieces']} pieces in {report['generated']['path']}",
           f"reference: {report['reference']['split']} split, {report['reference']['pieces']} {unit} of "
           f"{report['reference']['path']}"]
  if ceiling:
    lines.append(f"ceiling:   {ceiling['split']} split ({ceiling['pieces']} real {unit}) against the same reference")
  header = f"{'feature':<24} {'reference':>9} | " + " | ".join(
      " ".join(f"{name if i else role:>9}" for i, name in enumerate(columns)) for role in roles)
  lines += ["", header, "-" * len(header)]
  for name, feature in report["features"].items():
    lines.append(f"{name:<24} {cell(feature['reference_mean']):>9} | " + " | ".join(
        " ".join(f"{cell(feature[role][column]):>9}" for column in columns) for role in roles))
  lines.append(f"{'mean overlap':<24} {'':>9} | " + " | ".join(
      f"{'':>9} {report['mean_overlap'][role]:>9.3f} {'':>9} {'':>9}" for role in roles))
  lines += ["", "mean: feature mean of the set; overlap: of the intra-reference and set-to-reference distance "
            "densities (1 is best); kl: their KL divergence (0 is best); spread: variety within the set over "
            "that within the reference (1: as varied)"]
  return "\n".join(lines)
