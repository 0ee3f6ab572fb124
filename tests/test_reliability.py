"""Reliability (issue 6): any file through `prepare`, and SIGKILL of `prepare` or `train` at any moment.

Every odd MIDI file is written by the tests (none is committed). The kill tests run the real CLI in
subprocesses and compare with an uninterrupted run; `scripts/reliability_report.py` prints their figures.
"""

from __future__ import annotations

import collections
import gc
import itertools
import json
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from musicgen_jax import events, prepare, store

# ---------------------------------------------------------------------------------------------------------------
# Standard MIDI files byte by byte (mido refuses to write the broken ones).


def varint(value: int) -> bytes:
  """A MIDI variable-length quantity."""
  groups = [value & 0x7F]
  while value > 0x7F:
    value >>= 7
    groups.append(0x80 | value & 0x7F)
  return bytes(reversed(groups))


def chunk(name: bytes, body: bytes, size: int | None = None) -> bytes:
  """A chunk of `body`, whose length field says `size` if given (a lie) else the truth."""
  return name + struct.pack(">L", len(body) if size is None else size) + body


def track(*messages: tuple[int, bytes], size_error: int = 0) -> bytes:
  """An MTrk chunk of (delta ticks, message bytes) closed by an end-of-track; `size_error` makes its length lie."""
  body = b"".join(varint(delta) + message for delta, message in messages) + b"\x00\xff\x2f\x00"
  return chunk(b"MTrk", body, len(body) + size_error)


def smf(*tracks: bytes, fmt: int = 1, division: int = 480, declared: int | None = None) -> bytes:
  """A MIDI file of ready-made tracks; `declared` overrides the number of tracks its header gives."""
  header = struct.pack(">hhh", fmt, len(tracks) if declared is None else declared, division)
  return chunk(b"MThd", header) + b"".join(tracks)


def rmid(midi: bytes) -> bytes:
  """A MIDI file wrapped in RIFF, as Windows' .rmi files are (chunks padded to an even size)."""
  data = b"data" + struct.pack("<L", len(midi)) + midi + b"\x00" * (len(midi) % 2)
  return b"RIFF" + struct.pack("<L", 4 + len(data)) + b"RMID" + data


def on(pitch: int, velocity: int = 80, channel: int = 0) -> bytes:
  return bytes([0x90 | channel, pitch, velocity])


def off(pitch: int, channel: int = 0) -> bytes:
  return bytes([0x80 | channel, pitch, 64])


def meta(kind: int, body: bytes) -> bytes:
  return bytes([0xFF, kind]) + varint(len(body)) + body


def tempo(microseconds_per_beat: int) -> tuple[int, bytes]:
  return 0, meta(0x51, microseconds_per_beat.to_bytes(3, "big"))


def melody(pitches: list[int], ticks: int = 240, channel: int = 0) -> list[tuple[int, bytes]]:
  """One note after the other, each `ticks` long: two events per pitch."""
  return [message for p in pitches for message in ((0, on(p, channel=channel)), (ticks, off(p, channel)))]


def many_notes(count: int) -> bytes:
  """A one-track file of `count` (a multiple of 40) short notes, two at a time, built at bytes speed."""
  cycle = b"".join(varint(delta) + message for p in range(40, 80, 2)
                   for delta, message in ((0, on(p)), (0, on(p + 1)), (10, off(p)), (0, off(p + 1))))
  return smf(chunk(b"MTrk", cycle * (count // 40) + b"\x00\xff\x2f\x00"))


# ---------------------------------------------------------------------------------------------------------------
# 1. Any file: each gives events or is skipped with its reason; no file crashes or hangs the preparation.

TUNE = smf(track(*melody([60, 64, 67])))  # 6 events
# Two notes, their second note-on and both note-offs (note-ons of velocity 0) in running status, then the pedal.
RUNNING_STATUS = track((0, on(60)), (0, bytes([64, 80])), (240, bytes([60, 0])), (0, bytes([64, 0])),
                       (0, bytes([0xB0, 64, 127])), (480, bytes([0xB0, 64, 0])))
Outcome = int | str  # the number of events a file gives, or the reason it is skipped


def special_files() -> dict[str, tuple[Callable[[Path], object], Outcome]]:
  """Things with a MIDI name that aren't files of bytes: made in place, with their outcome."""
  def sparse(path: Path) -> None:
    with open(path, "wb") as f:
      f.truncate(events.MAX_FILE_BYTES + 1)

  return {
      "x.mid": (Path.mkdir, "is a directory"),
      "pipe.mid": (os.mkfifo, "not a regular file"),  # opening it would block forever
      "endless.mid": (lambda path: path.symlink_to("/dev/zero"), "not a regular file"),
      "dangling.mid": (lambda path: path.symlink_to(path.with_name("nowhere")), "file not found"),
      "loop.mid": (lambda path: path.symlink_to(path), "file not found"),
      "huge.mid": (sparse, f"implausibly large ({events.MAX_FILE_BYTES + 1} bytes)"),
  }


def corpus_files() -> dict[str, tuple[bytes, Outcome]]:
  """Odd MIDI files by name: their bytes, and the events they give or why they are skipped."""
  rng = np.random.default_rng(6)
  chord = [(0, on(p)) for p in range(48, 88, 4)] + [(240 if i == 0 else 0, off(p)) for i, p in
                                                      enumerate(range(48, 88, 4))]
  pedalled = [message for i in range(50) for message in (
      (0, bytes([0xB0, 64, 127])), (0, on(40 + i % 30)), (60, bytes([0xB0, 64, 30 + i % 60])), (60, off(40 + i % 30)),
      (0, bytes([0xB0, 64, 0])))]
  hour = 3600 * 960  # ticks in an hour at 480 per beat and the default 120 beats per minute
  return {
      "empty.mid": (b"", "empty file"),
      "random.mid": (rng.bytes(1000), "not a MIDI file"),
      "text.mid": (b"Liebestraum No. 3, for piano (not a MIDI file at all)\n", "not a MIDI file"),
      "header only.mid": (smf(declared=1), "truncated MIDI data"),
      "header and no track.mid": (smf(), "no notes"),
      "tracks of no messages.mid": (smf(chunk(b"MTrk", b""), chunk(b"MTrk", b"")), "no notes"),
      "track of no messages beside music.mid": (smf(chunk(b"MTrk", b""), track(*melody([60, 62]))), 4),
      "more tracks declared than present.mid": (smf(track(*melody([60])), declared=1000), "truncated MIDI data"),
      "truncated.mid": (TUNE[:30], "truncated MIDI data"),
      "track length too long.mid": (smf(track(*melody([60]), size_error=50)), "truncated MIDI data"),
      "track length too short.mid": (smf(track(*melody([60, 62]), size_error=-5)),
                                     "a message runs past the end of its track"),
      "rmid.rmi.mid": (rmid(TUNE), 6),
      "riff without data.mid": (b"RIFF\x04\x00\x00\x00RMID", "not a MIDI file"),
      "meta only.mid": (smf(track(tempo(400000), (0, meta(0x03, b"Title")), (0, meta(0x58, b"\x04\x02\x18\x08")),
                                  (960, meta(0x01, "Ünïcödé text".encode())))), "no notes"),
      "empty track.mid": (smf(track()), "no notes"),
      "empty track beside music.mid": (smf(track(), track(*melody([60, 62]))), 4),
      "drums only.mid": (smf(track(*melody([36, 38, 42], channel=9))), "no notes"),
      "format 0 several channels.mid": (smf(track(*melody([60, 62], channel=0), *melody([64], channel=3),
                                                  *melody([67], channel=15)), fmt=0), 8),
      "format 2.mid": (smf(track(*melody([60])), track(*melody([62, 64]))), 6),
      "sixteen tracks.mid": (smf(*(track(*melody([40 + i]), (0, on(30, channel=9))) for i in range(16))), 32),
      "note-ons without note-off.mid": (smf(track((0, on(50)), (0, on(52)), *melody([60]), (10, on(54)))), 2),
      "overlapping notes on one pitch.mid": (smf(track((0, on(60)), (100, on(60)), (100, off(60)), (100, off(60)))), 4),
      "pitches 0 and 127.mid": (smf(track(*melody([0, 127]))), 4),
      "velocity 1.mid": (smf(track((0, on(60, velocity=1)), (240, off(60)))), 2),
      "velocity out of range.mid": (smf(track((0, bytes([0x90, 60, 200])), (240, off(60)))), "data byte out of range"),
      "tempo 1 us per beat.mid": (smf(track(tempo(1), *melody([60, 62]))), 4),
      "tempo 16777215 us per beat.mid": (smf(track(tempo(16777215), *melody([60, 62]))), 4),
      "an hour of silence.mid": (smf(track(*melody([60]), (hour, on(62)), (240, off(62)))), 4),
      "implausibly long.mid": (smf(track(*melody([60]), (events.MAX_TICKS, on(62)), (240, off(62)))),
                               f"implausibly long ({events.MAX_TICKS + 480} ticks)"),
      "ticks per beat 1.mid": (smf(track(*melody([60, 62], ticks=1)), division=1), 4),
      "ticks per beat 32767.mid": (smf(track(*melody([60, 62], ticks=30000)), division=32767), 4),
      "ticks per beat 0.mid": (smf(track(*melody([60])), division=0), "zero ticks per beat"),
      "smpte division.mid": (smf(track(*melody([60])), division=-(25 << 8) + 40), "SMPTE time division not supported"),
      "running status.mid": (smf(RUNNING_STATUS), 4),
      "trailing garbage.mid": (TUNE + rng.bytes(300), 6),
      "dense 10-note chords.mid": (smf(track(*chord * 30)), 600),
      "heavy pedal.mid": (smf(track(*pedalled)), 100),
      "120000 notes.mid": (many_notes(120_000), 240_000),
      "Ünïcödé ピアノ with  spaces.mid": (TUNE, 6),
      "UPPER CASE.MID": (TUNE, 6),
      "long suffix.midi": (TUNE, 6),
      "Mixed.MiDi": (TUNE, 6),
  }


def write_corpus(folder: Path) -> dict[str, Outcome]:
  """Writes every odd file into `folder`; the outcome expected of each, by name."""
  folder.mkdir(parents=True, exist_ok=True)
  expected = {}
  for name, (content, outcome) in corpus_files().items():
    (folder / name).write_bytes(content)
    expected[name] = outcome
  for name, (make, outcome) in special_files().items():
    make(folder / name)
    expected[name] = outcome
  return expected


def outcomes_by_name(manifest: dict, out: Path) -> dict[str, Outcome]:
  """What a preparation made of each file: its number of events in the store, or the reason it was skipped."""
  result: dict[str, Outcome] = {Path(s["path"]).name: s["reason"] for s in manifest["skipped"]}
  for split, entry in manifest["splits"].items():
    lengths = store.open_split(out, split).lengths
    result.update({Path(path).name: int(length) for path, length in zip(entry["pieces"], lengths)})
  return result


def test_every_odd_file_gives_events_or_its_reason(tmp_path):
  expected = write_corpus(tmp_path / "corpus")
  manifest = prepare.prepare_corpus([str(tmp_path / "corpus")], tmp_path / "out", workers=2, val_fraction=0.0,
                                    progress=False)
  assert outcomes_by_name(manifest, tmp_path / "out") == expected
  rmi = store.open_split(tmp_path / "out", "train").piece(manifest["splits"]["train"]["pieces"].index(
      str(tmp_path / "corpus" / "rmid.rmi.mid")))
  assert rmi.pitch.tolist() == [60, 60, 64, 64, 67, 67]


def test_file_over_the_time_limit_is_skipped_and_tried_again_next_run(tmp_path):
  (tmp_path / "src").mkdir()
  for name, content in {"a.mid": TUNE, "slow.mid": many_notes(1_000_000), "z.mid": TUNE}.items():
    (tmp_path / "src" / name).write_bytes(content)  # slow.mid takes some 10 s to read
  start = time.monotonic()
  manifest = prepare.prepare_corpus([str(tmp_path / "src")], tmp_path / "out", val_fraction=0.0, progress=False,
                                    file_timeout=0.5)
  assert time.monotonic() - start < 8
  assert outcomes_by_name(manifest, tmp_path / "out") == {"a.mid": 6, "slow.mid": "timed out", "z.mid": 6}
  again = prepare.prepare_corpus([str(tmp_path / "src")], tmp_path / "out", val_fraction=0.0, progress=False,
                                 file_timeout=0.5)
  assert again["cache"] == {"hits": 2, "parsed": 1}


def reader_processes() -> list:
  """The MIDI reader workers of this process: the children of its fork server."""
  psutil = pytest.importorskip("psutil")
  if prepare.worker_context().get_start_method() != "forkserver":
    pytest.skip("finds the workers as the fork server's children")
  return [p for p in psutil.Process().children(recursive=True) if p.ppid() != os.getpid()]


def test_reader_process_killed_mid_file_costs_that_file_only(tmp_path):
  # What the kernel's out-of-memory killer would do to a worker reading a monstrous file.
  (tmp_path / "src").mkdir()
  for name, content in {"a.mid": TUNE, "slow.mid": many_notes(1_000_000), "z.mid": TUNE}.items():
    (tmp_path / "src" / name).write_bytes(content)
  result = {}
  preparation = threading.Thread(target=lambda: result.update(prepare.prepare_corpus(
      [str(tmp_path / "src")], tmp_path / "out", val_fraction=0.0, progress=False)))
  preparation.start()
  deadline = time.monotonic() + 30
  while not [p for p in reader_processes() if p.cpu_times().user > 1.0] and time.monotonic() < deadline:
    time.sleep(0.05)
  for process in reader_processes():
    process.kill()
  preparation.join(timeout=30)
  assert outcomes_by_name(result, tmp_path / "out") == {"a.mid": 6, "slow.mid": "reader process killed by SIGKILL",
                                                        "z.mid": 6}


# Files to mutate: plain, RIFF-wrapped, running status and pedal, a conductor track, a sysex, another division.
SEEDS = [TUNE, rmid(TUNE), smf(RUNNING_STATUS),
         smf(track(tempo(400000), (0, meta(0x03, b"name"))),
             track(*melody([30, 90], channel=2), (5, b"\xf0\x02\x01\xf7")), division=96)]
MUTATION = st.tuples(st.sampled_from(["set", "insert", "delete"]), st.integers(0, 10**6), st.integers(0, 255))


def mutate(data: bytes, mutations: list[tuple[str, int, int]], length: int) -> bytes:
  """`data` with bytes set, inserted or deleted at positions taken modulo its length, then cut to `length`."""
  result = bytearray(data)
  for kind, position, value in mutations:
    index = position % (len(result) + 1)
    if kind == "insert":
      result.insert(index, value)
    elif index < len(result):
      if kind == "set":
        result[index] = value
      else:
        del result[index]
  return bytes(result[:length])


def read_outcome(path: Path) -> Outcome:
  """The reader's verdict on one file: its number of events, which must be a valid stream, or its reason."""
  try:
    stream = events.midi_to_events(path)
  except events.MidiReadError as error:
    reason = str(error)
    assert reason and "\n" not in reason and len(reason) <= 100
    return reason
  assert stream.pitch.dtype == np.uint8 and stream.velocity.dtype == np.uint8 and stream.dt.dtype == np.float32
  assert (stream.pitch < 128).all() and (stream.velocity < 128).all()
  assert np.isfinite(stream.dt).all() and (stream.dt >= 0).all()
  assert len(stream) % 2 == 0 and (stream.velocity > 0).sum() == len(stream) // 2
  return len(stream)


def fuzz_reader(examples: int) -> Callable:
  """A hypothesis test of `examples` mutated files: each read or refused with a reason, never anything else."""
  @settings(max_examples=examples, deadline=None, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
  @given(seed=st.sampled_from(SEEDS), mutations=st.lists(MUTATION, max_size=6), length=st.integers(0, 400))
  def check(tmp_path, seed, mutations, length):
    path = tmp_path / "fuzzed.mid"
    path.write_bytes(mutate(seed, mutations, length))
    read_outcome(path)

  return check


test_reader_fuzzed_briefly = fuzz_reader(150)
test_reader_fuzzed_at_length = pytest.mark.slow(fuzz_reader(20_000))


# ---------------------------------------------------------------------------------------------------------------
# 2. A preparation killed at any moment: never a half-written store that looks complete; a rerun is exact.


def cli(*args: str) -> list[str]:
  return [sys.executable, "-m", "musicgen_jax.cli", *args]


KillWhen = Callable[[float], bool]  # asked every few ms with the seconds since the start: kill now?


def after(seconds: float) -> KillWhen:
  return lambda elapsed: elapsed >= seconds


def run_and_kill(command: list[str], kill_when: KillWhen | None, log: Path, env: dict[str, str] | None = None) -> bool:
  """Runs `command`, SIGKILLed as soon as `kill_when` says so (None: never); whether it was killed.

  A run that ends by itself must succeed.
  """
  start = time.monotonic()
  with open(log, "ab") as output:
    process = subprocess.Popen(command, stdout=output, stderr=output, env=env)
    while process.poll() is None:
      if kill_when is not None and kill_when(time.monotonic() - start):
        process.kill()
        process.wait()
        return True
      time.sleep(0.01)
  assert process.returncode == 0, log.read_text(errors="replace")[-3000:]
  return False


def piano_corpus(folder: Path, files: int = 40, notes: int = 2000) -> None:
  """`files` distinct one-track MIDI files of `notes` random notes (1000 take some 10 ms to read)."""
  folder.mkdir(parents=True)
  for index in range(files):
    rng = np.random.default_rng(index)
    pitches = rng.integers(21, 109, notes).tolist()
    (folder / f"piece {index:02d}.mid").write_bytes(smf(track(*melody(pitches, ticks=int(rng.integers(20, 200))))))


def store_contents(out: Path) -> dict[str, bytes]:
  """The files that make a prepared store: the splits' arrays, and the manifest without its cache counts."""
  manifest = json.loads((out / prepare.MANIFEST).read_text())
  del manifest["cache"]
  contents = {prepare.MANIFEST: json.dumps(manifest, sort_keys=True).encode()}
  for split in manifest["splits"]:
    contents.update({f"{split}/{f.name}": f.read_bytes() for f in store.split_dir(out, split).iterdir()})
  return contents


def bytes_lost(reference: dict[str, bytes], contents: dict[str, bytes]) -> int:
  """How many bytes differ between two stores' files, a missing or extra byte counting as one."""
  lost = 0
  for name in reference.keys() | contents.keys():
    a, b = (np.frombuffer(files.get(name, b""), np.uint8) for files in (reference, contents))
    common = min(len(a), len(b))
    lost += int(np.sum(a[:common] != b[:common])) + abs(len(a) - len(b))
  return lost


def leftovers(out: Path) -> list[str]:
  return [p.name for p in [*out.iterdir(), *(out / prepare.CACHE_DIR).iterdir()] if prepare.LEFTOVER.fullmatch(p.name)]


def cached_files(out: Path) -> int:
  return len(list((out / prepare.CACHE_DIR).glob("*.npz")))


MAX_FINISHED_BEFORE_KILL = 8  # Reruns that may end before their moment, over all rounds.


def kill_prepare(tmp: Path, rounds: int, kills_per_round: int, seed: int) -> dict:
  """Prepares a corpus uninterrupted, then `rounds` times into a new folder: SIGKILLs at seeded moments
  within the time a run takes (the uninterrupted run's, or a shorter one's), checking after each that the
  folder has no manifest or the exact store, then a rerun to the end, compared byte for byte. Returns the
  figures.
  """
  piano_corpus(tmp / "corpus", notes=3000)
  files = len(list((tmp / "corpus").iterdir()))
  command = lambda out: cli("prepare", str(tmp / "corpus"), "--out", str(out), "--workers", "1")
  start = time.monotonic()
  run_and_kill(command(tmp / "reference"), None, tmp / "prepare.log")
  duration = time.monotonic() - start
  reference = store_contents(tmp / "reference")
  rng = random.Random(seed)
  kills_by_phase, finished_before_kill, lost = collections.Counter(), 0, 0
  for round_ in range(rounds):
    out = tmp / f"killed-{round_}"
    killed = 0
    # A rerun reuses the files read before, and the load of the machine changes, so a run may finish
    # before its moment: then draw again, within the time that run took.
    while killed < kills_per_round and finished_before_kill < MAX_FINISHED_BEFORE_KILL:
      cached = cached_files(out) if out.exists() else 0
      start = time.monotonic()
      if not run_and_kill(command(out), after(rng.uniform(0.2, duration)), tmp / "prepare.log"):
        finished_before_kill += 1
        duration = min(duration, time.monotonic() - start)
        continue
      killed += 1
      now_cached = cached_files(out) if out.exists() else 0
      phase = "writing the store" if now_cached == files else "reading files" if now_cached > cached else "starting"
      kills_by_phase[phase] += 1
      if (out / prepare.MANIFEST).exists():
        assert store_contents(out) == reference
    run_and_kill(command(out), None, tmp / "prepare.log")
    lost += bytes_lost(reference, store_contents(out))
    assert not leftovers(out)
  return {"files": files, "uninterrupted_seconds": round(duration, 1), "kills": sum(kills_by_phase.values()),
          "kills_by_phase": dict(kills_by_phase), "finished_before_kill": finished_before_kill, "bytes_lost": lost}


def test_prepare_killed_at_seeded_moments_reruns_to_the_same_store(tmp_path):
  figures = kill_prepare(tmp_path, rounds=2, kills_per_round=2, seed=0)
  assert figures["kills"] >= 3 and figures["bytes_lost"] == 0


class SimulatedKill(BaseException):
  """Stands for a SIGKILL at one precise point of the parent process (nothing after it runs)."""


def crash_at_rename(monkeypatch: pytest.MonkeyPatch, number: int) -> None:
  """Makes the `number`-th rename of this process (os.replace or Path.rename) raise SimulatedKill instead."""
  calls = itertools.count(1)

  def guarded(original: Callable) -> Callable:
    def rename(*args, **kwargs):
      if next(calls) == number:
        raise SimulatedKill
      return original(*args, **kwargs)
    return rename

  monkeypatch.setattr(os, "replace", guarded(os.replace))
  monkeypatch.setattr(Path, "rename", guarded(Path.rename))


def crash_before_each_rename(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
  """Reprepares a changed corpus over an earlier store (the worst case for a rerun), the parent killed just
  before its first rename (each commits a split or the manifest), then before its second, and so on until a
  run completes; after each, the manifest must be absent. Returns the figures of the store the last run left.
  """
  piano_corpus(tmp / "corpus", files=12, notes=50)
  prepare_quietly = lambda out: prepare.prepare_corpus([str(tmp / "corpus")], out, progress=False, val_fraction=0.3)
  prepare_quietly(tmp / "out")
  old = store_contents(tmp / "out")
  for path in sorted((tmp / "corpus").iterdir())[::2]:
    path.write_bytes(TUNE)
  prepare_quietly(tmp / "reference")
  crashes = 0
  while True:
    with monkeypatch.context() as patch:
      crash_at_rename(patch, crashes + 1)
      try:
        prepare_quietly(tmp / "out")
        break
      except SimulatedKill:
        crashes += 1
    assert not (tmp / "out" / prepare.MANIFEST).exists()
  reference = store_contents(tmp / "reference")
  assert reference != old and not leftovers(tmp / "out")
  return {"crash_points": crashes, "bytes_lost": bytes_lost(reference, store_contents(tmp / "out"))}


def test_crash_before_any_rename_of_the_store_leaves_no_manifest_and_reruns_exactly(tmp_path, monkeypatch):
  figures = crash_before_each_rename(tmp_path, monkeypatch)
  assert figures["crash_points"] >= 3 and figures["bytes_lost"] == 0


def test_store_of_a_preparation_killed_while_writing_is_not_taken_for_complete(tmp_path, monkeypatch):
  piano_corpus(tmp_path / "corpus", files=12, notes=50)
  with monkeypatch.context() as patch:
    crash_at_rename(patch, 2)  # the train split is in place, the validation split not yet
    with pytest.raises(SimulatedKill):
      prepare.prepare_corpus([str(tmp_path / "corpus")], tmp_path / "out", progress=False, val_fraction=0.3)
  assert not (tmp_path / "out" / prepare.MANIFEST).exists()
  assert not store.has_split(tmp_path / "out", "train")


# ---------------------------------------------------------------------------------------------------------------
# 3. Training killed at any moment: it completes bit-identical to an uninterrupted run.

TRAIN_STEPS, CHECKPOINT_EVERY = 30, 5  # Six checkpoints a run: enough moments to kill it at.
TRAIN_OVERRIDES = (f"train.steps={TRAIN_STEPS}", f"train.checkpoint_every={CHECKPOINT_EVERY}", "train.log_every=5",
                   "train.eval_every=10")
UNTIMED_METRICS = ("train/step_time_s", "train/events_per_s")


def train_command(workdir: Path, data: Path) -> list[str]:
  return cli("train", "--workdir", str(workdir), "--config", "tiny", "--data", str(data), "--quiet", *TRAIN_OVERRIDES)


def training_env(tmp: Path) -> dict[str, str]:
  """The environment of the training launches: compiled steps cached on disk, so restarts skip compiling. Under
  pytest that is the suite's shared cache (conftest.py); run by scripts/reliability_report.py, one under `tmp`."""
  return {"JAX_COMPILATION_CACHE_DIR": str(tmp / "jax-cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0", **os.environ}


def restore_every_checkpoint(workdir: Path) -> tuple[list[int], list[int]]:
  """Restores every checkpoint orbax lists for a run: the steps it lists, and those that fail to restore."""
  from musicgen_jax import checkpointing, config, rundir, steps

  if not rundir.checkpoint_dir(workdir).is_dir():
    return [], []
  manager = checkpointing.checkpoint_manager(workdir, read_only=True)
  abstract = checkpointing.abstract(steps.create_train_state(config.read_config(workdir))[1])
  failed = []
  try:
    for step in manager.all_steps():
      try:
        state, data_position = checkpointing.restore(manager, step, abstract)
      except Exception:  # any failure is the finding, whatever its type
        failed.append(step)
        continue
      if int(state.step) != step or data_position is None:
        failed.append(step)
    return list(manager.all_steps()), failed
  finally:
    manager.close()
    gc.collect()  # orbax leaves the futures of failed reads unretrieved: their log lines come out now, captured


def metrics_lines(workdir: Path) -> tuple[list[dict], bool]:
  """The parsed lines of a run's metrics.jsonl (each must parse), and whether a torn last line follows them."""
  path = workdir / "metrics.jsonl"
  lines = path.read_bytes().split(b"\n") if path.exists() else [b""]
  return [json.loads(line) for line in lines[:-1]], lines[-1] != b""


def tear_metrics_tail(workdir: Path) -> None:
  """Appends the start of a metrics line, as a kill in the middle of writing it would leave."""
  workdir.mkdir(parents=True, exist_ok=True)
  with open(workdir / "metrics.jsonl", "ab") as f:
    f.write(b'{"step": 5, "train/loss_pi')


def final_metrics(lines: list[dict]) -> dict[tuple[int, str], float]:
  """The last value logged for each (step, metric), timings left out: what a resumed run must reproduce."""
  return {(line["step"], key): value for line in lines for key, value in line.items()
          if key != "step" and key not in UNTIMED_METRICS}


def params_of(workdir: Path) -> list[np.ndarray]:
  import jax

  from musicgen_jax import checkpointing

  return [np.asarray(leaf) for leaf in jax.tree.leaves(checkpointing.load_run(workdir).params)]


def tiny_corpus(tmp: Path) -> Path:
  """A prepared corpus of eight short pieces, one of them for validation."""
  piano_corpus(tmp / "midi", files=8, notes=60)
  manifest = prepare.prepare_corpus([str(tmp / "midi")], tmp / "data", val_fraction=0.2, progress=False)
  assert manifest["splits"]["validation"]["files"] >= 1
  return tmp / "data"


def checkpoint_steps(workdir: Path) -> set[int]:
  """The steps of the run's finished checkpoint folders (orbax writes under a temporary name, then renames)."""
  folder = workdir / "checkpoints"
  return {int(p.name) for p in folder.iterdir() if p.name.isdigit()} if folder.is_dir() else set()


def reference_run(tmp: Path) -> dict:
  """An uninterrupted run (which also fills the compilation cache): its data, parameters, metrics, and how
  long it took to its first checkpoint (an upper bound of the start-up of the restarts, which skip compiling).
  """
  data, env = tiny_corpus(tmp), training_env(tmp)
  first_checkpoint = []

  def watch(elapsed: float) -> bool:
    if not first_checkpoint and checkpoint_steps(tmp / "reference"):
      first_checkpoint.append(elapsed)
    return False

  run_and_kill(train_command(tmp / "reference", data), watch, tmp / "train.log", env)
  return {"data": data, "env": env, "start_up": first_checkpoint[0], "params": params_of(tmp / "reference"),
          "metrics": final_metrics(metrics_lines(tmp / "reference")[0])}


def training_kill(rng: random.Random, workdir: Path, start_up: float) -> tuple[str, KillWhen]:
  """A seeded moment to kill one launch: a third of the time, within its start-up; else up to half a second
  after it finishes its first, second or third checkpoint, while saving the next or deleting old ones.
  """
  done = checkpoint_steps(workdir)
  remaining = (TRAIN_STEPS - max(done, default=0)) // CHECKPOINT_EVERY
  if remaining <= 1 or rng.random() < 1 / 3:
    return "start-up", after(rng.uniform(0.0, start_up))
  count, delay, seen = rng.randint(1, min(3, remaining - 1)), rng.uniform(0.0, 0.5), []

  def kill_when(elapsed: float) -> bool:
    if not seen and len(checkpoint_steps(workdir) - done) >= count:
      seen.append(elapsed)
    return bool(seen) and elapsed >= seen[0] + delay

  return f"after {count} new checkpoint{'s' * (count > 1)}", kill_when


def kill_training(tmp: Path, reference: dict, kills: int, seed: int) -> dict:
  """Trains like `reference`, SIGKILLed at seeded moments (`training_kill`) until `kills` kills happened,
  restarting each time; after each kill every listed checkpoint must restore and metrics.jsonl parse. A run
  that completes (before the kills are done, a new one starts) must equal the reference bit for bit.
  """
  tmp.mkdir(parents=True, exist_ok=True)
  rng = random.Random(seed)
  figures = collections.Counter(runs=0, kills=0, launches=0, checkpoints_restored=0, torn_metrics_lines=0,
                                torn_metrics_lines_made=0)
  kills_by_moment = collections.Counter()
  while figures["kills"] < kills or not figures["runs"]:
    workdir = tmp / f"run-{figures['runs']}"
    figures["runs"] += 1
    while True:
      moment, kill_when = training_kill(rng, workdir, reference["start_up"]) if figures["kills"] < kills else ("", None)
      figures["launches"] += 1
      if not run_and_kill(train_command(workdir, reference["data"]), kill_when, tmp / "train.log", reference["env"]):
        break
      figures["kills"] += 1
      kills_by_moment[moment] += 1
      listed, failed = restore_every_checkpoint(workdir)
      assert not failed, f"checkpoints {failed} of {workdir} are listed but don't restore"
      figures["checkpoints_restored"] += len(listed)
      figures["torn_metrics_lines"] += metrics_lines(workdir)[1]
      if figures["kills"] == kills:  # whatever the kills left, the final launch must repair a torn line
        tear_metrics_tail(workdir)
        figures["torn_metrics_lines_made"] += 1
    lines, torn = metrics_lines(workdir)
    assert not torn and final_metrics(lines) == reference["metrics"]
    differing = [int(np.sum(a != b)) for a, b in zip(params_of(workdir), reference["params"], strict=True)]
    figures["parameters_differing"] += sum(differing)
  return {**figures, "kills_by_moment": dict(kills_by_moment)}


@pytest.fixture(scope="module")
def uninterrupted_training(tmp_path_factory) -> dict:
  return reference_run(tmp_path_factory.mktemp("training"))


def test_training_killed_three_times_ends_bit_identical(uninterrupted_training, tmp_path):
  figures = kill_training(tmp_path, uninterrupted_training, kills=3, seed=1)
  assert figures["kills"] >= 3 and figures["parameters_differing"] == 0


@pytest.mark.slow
def test_training_killed_ten_times_ends_bit_identical(uninterrupted_training, tmp_path):
  figures = kill_training(tmp_path, uninterrupted_training, kills=10, seed=0)
  assert figures["kills"] >= 10 and figures["parameters_differing"] == 0


# Run as a script: the train command killed by SIGKILL while orbax retires its first old checkpoint. Deleting
# in place is cut short half-way; a rename (atomic) is done, then the kill comes before anything else.
DIE_WHILE_DELETING = """
import os, signal, sys
from pathlib import Path
from orbax.checkpoint._src.path import deleter
from musicgen_jax import cli

retire = deleter.PathDeleter.delete

def retire_then_die(self, path, **kwargs):
  if kwargs.get("destination") is None:
    files = sorted(p for p in Path(str(path)).rglob("*") if p.is_file())
    for file in files[len(files) // 2:]:
      file.unlink()
  else:
    retire(self, path, **kwargs)
  os.kill(os.getpid(), signal.SIGKILL)

deleter.PathDeleter.delete = retire_then_die
sys.exit(cli.main(sys.argv[1:]))
"""


def test_kill_while_an_old_checkpoint_is_retired_leaves_every_listed_checkpoint_restorable(
    uninterrupted_training, tmp_path):
  (tmp_path / "driver.py").write_text(DIE_WHILE_DELETING)
  command = [sys.executable, str(tmp_path / "driver.py"), *train_command(tmp_path / "run", uninterrupted_training[
      "data"])[3:]]
  process = subprocess.run(command, env=uninterrupted_training["env"], capture_output=True)
  assert process.returncode == -signal.SIGKILL, process.stderr.decode()[-2000:]
  listed, failed = restore_every_checkpoint(tmp_path / "run")
  assert listed and not failed, f"checkpoints {failed} of {listed} listed don't restore"


# ---------------------------------------------------------------------------------------------------------------
# 4. Bounded memory: workers hand back events through the cache, the parent loads one split at a time.


def test_parent_loads_the_events_of_one_split_at_a_time(tmp_path, monkeypatch):
  piano_corpus(tmp_path / "corpus", files=12, notes=50)
  loaded, written = [], []
  read_cache, write_split = prepare.read_cache, store.write_split
  monkeypatch.setattr(prepare, "read_cache", lambda file: loaded.append(file) or read_cache(file))
  monkeypatch.setattr(store, "write_split", lambda root, split, pieces: written.append((split, len(loaded))) or
                      write_split(root, split, pieces))
  manifest = prepare.prepare_corpus([str(tmp_path / "corpus")], tmp_path / "out", progress=False, val_fraction=0.3)
  train, validation = (manifest["splits"][split]["files"] for split in ("train", "validation"))
  assert written == [("train", train), ("validation", train + validation)]
