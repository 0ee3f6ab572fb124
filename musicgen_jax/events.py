"""MIDI files <-> event streams: every note-on and note-off is one (pitch, dt, velocity) event.

Reading gives exactly the notes of note-seq (`midi_file_to_note_sequence`, then the sustain pedal),
but decodes the file bytes itself instead of through mido, whose per-message objects and checks
take most of note-seq's reading time; pretty_midi and note-seq then run unchanged on the result.
It also reads RIFF-wrapped files (RMID), and refuses what would exhaust time or memory instead of music.
"""

from __future__ import annotations

import functools
import os
import stat
import struct
import warnings
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from musicgen_jax.store import Events

if TYPE_CHECKING:
  import mido
  from note_seq.protobuf import music_pb2

MIN_NOTE_SECONDS = 0.05
WRITE_QPM = 120.0
# At 120 qpm one tick is 1/3840 s: a refinement of the 1/768 s grid of MAESTRO (384 per quarter,
# 120 qpm), so its times survive a write unchanged, and 0.13 ms at most off for other files.
WRITE_TICKS_PER_QUARTER = 1920
TICKS_PER_SECOND = WRITE_TICKS_PER_QUARTER * WRITE_QPM / 60.0
MIN_NOTE_TICKS = round(MIN_NOTE_SECONDS * TICKS_PER_SECOND)
# pretty_midi holds one float per tick of the whole file, several times over: 2e7 ticks (over 5 hours at
# 480 per quarter, 120 qpm) take about 0.6 GB. note-seq allows 1e10, enough to exhaust any memory.
MAX_TICKS = 2 * 10**7
# pretty_midi takes some 120 bytes of memory per byte of a dense file: 2 GB for 16 MiB, 40 times the
# largest MAESTRO file.
MAX_FILE_BYTES = 16 * 2**20
_HIGH_BITS = int.from_bytes(b"\x80" * 8, "big")  # the top bit of each data byte (messages have at most 2)


class MidiReadError(ValueError):
  """A file that can't be read as MIDI notes; the message gives the reason in a few words."""


class _Message:
  """A MIDI channel or system message with the attributes pretty_midi reads from mido's messages."""

  __slots__ = ("type", "time", "channel", "note", "velocity", "control", "value", "program", "pitch")

  def __init__(self, type_: str, time: int, channel: int):
    self.type = type_
    self.time = time
    self.channel = channel


@functools.cache
def _message_specs() -> tuple[dict[int, int], dict[int, str]]:
  """Number of data bytes and mido type name of each status byte that isn't meta or sysex."""
  from mido.messages.specs import SPEC_BY_STATUS
  specs = {status: spec for status, spec in SPEC_BY_STATUS.items() if status not in (0xF0, 0xFF)}
  return ({status: spec["length"] - 1 for status, spec in specs.items()},
          {status: spec["type"] for status, spec in specs.items()})


def _varint(data: bytes, pos: int) -> tuple[int, int]:
  """A MIDI variable-length quantity at `pos`, and the position after it."""
  value = 0
  while True:
    byte = data[pos]
    pos += 1
    value = (value << 7) | (byte & 0x7F)
    if byte < 0x80:
      return value, pos


def _sized_body(data: bytes, pos: int, end: int) -> tuple[bytes, int]:
  """A length-prefixed meta or sysex body at `pos` (which must fit in its track), and the position after it."""
  from mido.midifiles.midifiles import MAX_MESSAGE_LENGTH
  length, pos = _varint(data, pos)
  if length > MAX_MESSAGE_LENGTH or pos + length > end:
    raise EOFError("a message runs past the end of its track")
  return data[pos:pos + length], pos + length


def _channel_message(type_: str, status: int, body: bytes, delta: int) -> _Message:
  """The message of a status byte and its data bytes, with mido's type and attribute names."""
  message = _Message(type_, delta, status & 0x0F)
  kind = status & 0xF0
  if kind in (0x80, 0x90):
    message.note, message.velocity = body
  elif kind == 0xB0:
    message.control, message.value = body
  elif kind == 0xC0:
    message.program = body[0]
  elif kind == 0xE0:
    message.pitch = body[0] | ((body[1] << 7) - 8192)
  return message


def _read_track(data: bytes, pos: int) -> tuple[list, int]:
  """One MTrk chunk at `pos` decoded like `mido.midifiles.read_track`, and the position after it.

  Raises where mido raises on the same bytes (any exception: the file is unreadable).
  """
  from mido.midifiles.meta import build_meta_message
  lengths, types = _message_specs()
  name, size = struct.unpack_from(">4sL", data, pos)
  if name != b"MTrk":
    raise OSError("no MTrk header at start of track")
  pos += 8
  end = pos + size
  if end > len(data):
    raise EOFError("track runs past the end of the file")
  track = []
  last_status = None
  while pos < end:
    delta, pos = _varint(data, pos)
    status = data[pos]
    running = status < 0x80
    if running:
      if last_status is None:
        raise OSError("running status without last_status")
      status = last_status
    if not running or status in (0xF0, 0xF7):  # as mido, sysex drops the byte read as running status
      pos += 1
    if status == 0xFF:
      body, after = _sized_body(data, pos + 1, end)
      track.append(build_meta_message(data[pos], list(body), delta))
      pos = after
      continue
    last_status = status
    if status in (0xF0, 0xF7):
      body, pos = _sized_body(data, pos, end)
      if max(body.removeprefix(b"\xf0").removesuffix(b"\xf7"), default=0) > 127:
        raise ValueError("data byte out of range")
      track.append(_Message("sysex", delta, 0))
      continue
    if status not in lengths or (running and lengths[status] == 0):
      raise OSError(f"bad status byte 0x{status:02x}")
    body = data[pos:pos + lengths[status]]
    pos += lengths[status]
    if pos > end:
      raise OSError("a message runs past the end of its track")
    if int.from_bytes(body, "big") & _HIGH_BITS:
      raise OSError("data byte out of range")
    track.append(_channel_message(types[status], status, body, delta))
  return track, pos


def _unwrap_rmid(data: bytes) -> bytes:
  """The standard MIDI data inside a RIFF RMID file (as Windows writes them); other bytes unchanged."""
  if not (data.startswith(b"RIFF") and data[8:12] == b"RMID"):
    return data
  pos = 12
  while pos + 8 <= len(data):
    name, size = struct.unpack_from("<4sL", data, pos)
    if name == b"data":
      return data[pos + 8:pos + 8 + size]
    pos += 8 + size + size % 2  # RIFF chunks are padded to an even size
  return data


def _parse_midi(data: bytes) -> mido.MidiFile:
  """A whole file decoded like `mido.MidiFile(file=...)`: the same tracks of messages, or an exception.

  Unlike mido, also reads RMID files, and raises for files longer than MAX_TICKS and for time
  divisions pretty_midi can't convert to seconds (zero or SMPTE frames).
  """
  import mido
  data = _unwrap_rmid(data)
  if not data.startswith(b"MThd"):
    raise OSError("not a MIDI file")
  size, = struct.unpack_from(">L", data, 4)
  if size < 6:
    raise EOFError("MIDI header too short")
  _, num_tracks, ticks_per_beat = struct.unpack_from(">hhh", data, 8)
  if ticks_per_beat <= 0:
    raise ValueError("SMPTE time division not supported" if ticks_per_beat < 0 else "zero ticks per beat")
  pos = 8 + size
  tracks = []
  for _ in range(num_tracks):
    track, pos = _read_track(data, pos)
    tracks.append(track)
  length = max((sum(message.time for message in track) for track in tracks), default=0)
  if length > MAX_TICKS:
    raise ValueError(f"implausibly long ({length} ticks)")
  return mido.MidiFile(ticks_per_beat=ticks_per_beat, tracks=tracks)


def _reason(error: Exception) -> str:
  """A few words on why MIDI bytes couldn't be decoded."""
  if isinstance(error, (EOFError, IndexError, struct.error)):
    return "truncated MIDI data"
  return str(error).splitlines()[0][:100] if str(error) else type(error).__name__


def read_file_bytes(path: str | os.PathLike) -> bytes:
  """The bytes of a would-be MIDI file; MidiReadError if it isn't a regular, non-empty file of plausible size.

  Checked before opening: a FIFO or a device would block or never end.
  """
  try:
    info = os.stat(path)
    if stat.S_ISDIR(info.st_mode):
      raise MidiReadError("is a directory")
    if not stat.S_ISREG(info.st_mode):
      raise MidiReadError("not a regular file")
    if info.st_size > MAX_FILE_BYTES:
      raise MidiReadError(f"implausibly large ({info.st_size} bytes)")
    with open(path, "rb") as f:
      data = f.read()
  except OSError as error:
    raise MidiReadError((error.strerror or str(error)).lower()) from error
  if not data:
    raise MidiReadError("empty file")
  return data


def read_note_sequence(path: str | os.PathLike, *, sustain: bool = True) -> music_pb2.NoteSequence:
  """The NoteSequence note-seq's `midi_file_to_note_sequence` gives for a file, sustain pedal applied if `sustain`.

  Raises MidiReadError for anything that isn't a readable MIDI file.
  """
  import note_seq
  import pretty_midi
  from note_seq.protobuf import music_pb2
  data = read_file_bytes(path)
  try:
    midi_file = _parse_midi(data)
    # pretty_midi fails on a track without messages, hence on a file without tracks: neither holds notes.
    midi_file.tracks = [track for track in midi_file.tracks if track]
    if not midi_file.tracks:
      return music_pb2.NoteSequence()
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      sequence = note_seq.midi_io.midi_to_note_sequence(pretty_midi.PrettyMIDI(mido_object=midi_file))
  except Exception as error:  # pretty_midi fails on bad data in many ways, as note-seq knows too.
    raise MidiReadError(_reason(error)) from error
  return note_seq.apply_sustain_control_changes(sequence) if sustain else sequence


def note_sequence_to_events(sequence: music_pb2.NoteSequence) -> Events:
  """The canonical event stream of a NoteSequence's non-drum notes (notes without duration are inaudible: dropped).

  Events are sorted by time; at equal times releases come before onsets, then by pitch, then velocity.
  """
  notes = np.array([(n.pitch, n.velocity, n.start_time, n.end_time) for n in sequence.notes if not n.is_drum],
                   np.float64).reshape(-1, 4)
  pitch, velocity, start, end = notes[notes[:, 3] > notes[:, 2]].T
  time = np.concatenate([start, end])
  pitches = np.concatenate([pitch, pitch]).astype(np.uint8)
  velocities = np.concatenate([np.clip(velocity, 1, 127), np.zeros_like(velocity)]).astype(np.uint8)
  order = np.lexsort((velocities, pitches, velocities > 0, time))
  dt = np.diff(time[order], prepend=0.0).astype(np.float32)
  return Events(pitches[order], dt, velocities[order])


def midi_to_events(path: str | os.PathLike, sustain: bool = True) -> Events:
  """The canonical event stream of a MIDI file: all non-drum notes of all tracks, sustain pedal applied if `sustain`."""
  return note_sequence_to_events(read_note_sequence(path, sustain=sustain))


class Notes(NamedTuple):
  """The notes of an event stream in onset order: pitch, velocity, start and end in seconds."""

  pitch: np.ndarray
  velocity: np.ndarray
  start: np.ndarray
  end: np.ndarray


def _next_of_pitch(pitch: np.ndarray, value: np.ndarray, default: int) -> np.ndarray:
  """For each entry of arrays sorted by pitch, `value` at the next entry of its pitch (`default` for the last)."""
  after = np.full(len(value), default, np.int64)
  same = pitch[1:] == pitch[:-1]
  after[:-1][same] = value[1:][same]
  return after


def note_arrays(events: Events) -> Notes:
  """The piano notes of an event stream, in stream order (no need to be canonical), as arrays.

  The stream is played as on a piano: an onset starts a note of its pitch and ends the one still sounding
  there (a re-strike); a release ends the sounding note of its pitch, if any; notes sounding at the end
  last until the last event. Times are on the tick grid of written files, where onsets of one pitch at
  one tick make one note (the loudest), and a note that would last no time gets MIN_NOTE_SECONDS, cut
  short at the next onset of its pitch. So, from any stream, the notes of a pitch never overlap and each
  lasts a tick at least: every file written closes each note it opens (pretty_midi writes the note-off
  first at equal ticks, so a note without length would sound forever).
  """
  dt = np.asarray(events.dt, np.float64)
  ticks = np.rint(np.cumsum(np.where(dt > 0, dt, 0.0)) * TICKS_PER_SECOND).astype(np.int64)
  pitch = np.asarray(events.pitch, np.int64)
  index = np.argsort(pitch, kind="stable")  # by pitch, each pitch in stream order
  pitch, velocity, ticks = pitch[index], np.asarray(events.velocity, np.int64)[index], ticks[index]
  # An onset's note ends at the next event of its pitch (a release or a re-strike), else at the last event.
  end = _next_of_pitch(pitch, ticks, ticks.max(initial=0))
  onset = velocity > 0
  index, pitch, velocity, start, end = index[onset], pitch[onset], velocity[onset], ticks[onset], end[onset]
  # Onsets of one pitch at one tick: the last one stays (the others end at once), at the loudest velocity.
  first = np.ones(len(start), bool)
  first[1:] = (pitch[1:] != pitch[:-1]) | (start[1:] != start[:-1])
  loudest = np.maximum.reduceat(velocity, np.flatnonzero(first))
  last = np.ones(len(start), bool)
  last[:-1] = first[1:]
  index, pitch, start, end = index[last], pitch[last], start[last], end[last]
  next_onset = _next_of_pitch(pitch, start, np.iinfo(np.int64).max)
  end = np.where(end > start, end, np.minimum(start + MIN_NOTE_TICKS, next_onset))
  order = np.argsort(index)
  return Notes(pitch[order], np.clip(loudest[order], 1, 127), start[order] / TICKS_PER_SECOND,
               end[order] / TICKS_PER_SECOND)


def events_to_note_sequence(events: Events) -> music_pb2.NoteSequence:
  """The piano notes of an event stream (see `note_arrays`) as a NoteSequence at WRITE_QPM."""
  from note_seq.protobuf import music_pb2
  notes = note_arrays(events)
  sequence = music_pb2.NoteSequence(ticks_per_quarter=WRITE_TICKS_PER_QUARTER,
                                    total_time=notes.end.max(initial=0.0))
  sequence.tempos.add(time=0.0, qpm=WRITE_QPM)
  for pitch, velocity, start, end in zip(*(field.tolist() for field in notes)):
    sequence.notes.add(pitch=pitch, velocity=velocity, start_time=start, end_time=end)
  return sequence


def write_midi(events: Events, path: str | os.PathLike) -> None:
  """Writes an event stream as a one-track piano MIDI file (see `events_to_note_sequence` for the notes)."""
  import note_seq
  note_seq.sequence_proto_to_midi_file(events_to_note_sequence(events), os.fspath(path))
