"""Reliability (issue 6): any file through `prepare`, and SIGKILL of `prepare` or `train` at any moment.

Every odd MIDI file is written by the tests (none is committed). The kill tests run the real CLI in
subprocesses and compare with an uninterrupted run; `scripts/reliability_report.py` prints their figures.
"""

from __future__ import annotations

import collections
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
      "header and no track.mid": (smf(), "no tracks"),
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
         smf(track(tempo(400000), (0, meta(0x03, b"name"))), track(*melody([30, 90], channel=2), (5, b"\xf0\x02\x01\xf7")),
             division=96)]
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


def fuzz_reader(examples: int):
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
