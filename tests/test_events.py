"""MIDI <-> events: canonical order, sustain, drums, pairing, round trips, and note-seq equivalence of the reader."""

import io
from pathlib import Path

import mido
import note_seq
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from musicgen_jax import events as ev
from musicgen_jax.store import Events

TICKS = 480  # at mido's default 120 qpm: one tick is 1/960 s
SECOND = 960


def midi_bytes(*tracks: list[tuple]) -> bytes:
  """A type-1 MIDI file of tracks given as (absolute tick, mido message kwargs) pairs."""
  midi = mido.MidiFile(ticks_per_beat=TICKS)
  for messages in tracks:
    track = mido.MidiTrack()
    last = 0
    for tick, kwargs in sorted(messages, key=lambda m: m[0]):
      track.append(mido.Message(**kwargs, time=tick - last) if "tempo" not in kwargs
                   else mido.MetaMessage(**kwargs, time=tick - last))
      last = tick
    midi.tracks.append(track)
  out = io.BytesIO()
  midi.save(file=out)
  return out.getvalue()


def note(start: float, end: float, pitch: int, velocity: int = 80, channel: int = 0) -> list[tuple]:
  """Note-on and note-off messages of one note, times in seconds."""
  return [(round(start * SECOND), dict(type="note_on", note=pitch, velocity=velocity, channel=channel)),
          (round(end * SECOND), dict(type="note_off", note=pitch, velocity=0, channel=channel))]


def pedal(start: float, end: float) -> list[tuple]:
  """Sustain pedal down then up, times in seconds."""
  return [(round(start * SECOND), dict(type="control_change", control=64, value=127)),
          (round(end * SECOND), dict(type="control_change", control=64, value=0))]


def write(tmp_path: Path, *tracks: list[tuple], name: str = "piece.mid") -> Path:
  path = tmp_path / name
  path.write_bytes(midi_bytes(*tracks))
  return path


def as_rows(events: Events) -> list[tuple]:
  """(time in ms, pitch, velocity) rows, to compare streams with readable failures."""
  times = np.cumsum(events.dt, dtype=np.float64)
  return [(round(t * 1000, 3), int(p), int(v)) for t, p, v in zip(times, events.pitch, events.velocity)]


def plain_note_seq_events(path: Path, sustain: bool = True) -> Events:
  """The events of note-seq's own reader, mido and all: what `midi_to_events` must reproduce."""
  sequence = note_seq.midi_file_to_note_sequence(str(path))
  return ev.note_sequence_to_events(note_seq.apply_sustain_control_changes(sequence) if sustain else sequence)


def assert_same(a: Events, b: Events) -> None:
  for field in ("pitch", "dt", "velocity"):
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)


def test_canonical_order_releases_before_onsets_then_pitch(tmp_path):
  # A chord (64 then 60 written), and pitch 60 released and struck again at the same time.
  path = write(tmp_path, note(0.5, 1.0, 64, 70) + note(0.5, 1.0, 60, 90) + note(1.0, 1.5, 60, 100))
  assert as_rows(ev.midi_to_events(path)) == [
      (500, 60, 90), (500, 64, 70), (1000, 60, 0), (1000, 64, 0), (1000, 60, 100), (1500, 60, 0)]


def test_dt_counts_from_the_start_of_the_piece(tmp_path):
  events = ev.midi_to_events(write(tmp_path, note(0.25, 0.75, 60)))
  np.testing.assert_allclose(events.dt, [0.25, 0.5])
  assert events.dt.dtype == np.float32 and events.pitch.dtype == np.uint8 and events.velocity.dtype == np.uint8


def test_sustain_extends_notes_to_pedal_release(tmp_path):
  path = write(tmp_path, note(0.0, 0.5, 60) + pedal(0.25, 2.0))
  assert as_rows(ev.midi_to_events(path)) == [(0, 60, 80), (2000, 60, 0)]
  assert as_rows(ev.midi_to_events(path, sustain=False)) == [(0, 60, 80), (500, 60, 0)]


def test_sustained_note_ends_when_struck_again(tmp_path):
  path = write(tmp_path, note(0.0, 0.5, 60) + note(1.0, 1.2, 60, 50) + pedal(0.25, 3.0))
  assert as_rows(ev.midi_to_events(path)) == [(0, 60, 80), (1000, 60, 0), (1000, 60, 50), (3000, 60, 0)]


def test_tracks_merged_and_drums_dropped(tmp_path):
  path = write(tmp_path, note(0.0, 1.0, 60), note(0.5, 1.0, 67) + note(0.0, 0.1, 36, channel=9))
  assert as_rows(ev.midi_to_events(path)) == [(0, 60, 80), (500, 67, 80), (1000, 60, 0), (1000, 67, 0)]


def test_zero_velocity_onsets_clipped_and_silent_notes_dropped():
  sequence = note_seq.NoteSequence()
  sequence.notes.add(pitch=60, velocity=0, start_time=0.0, end_time=1.0)
  sequence.notes.add(pitch=62, velocity=90, start_time=0.5, end_time=0.5)
  sequence.notes.add(pitch=64, velocity=90, start_time=0.5, end_time=0.7, is_drum=True)
  assert as_rows(ev.note_sequence_to_events(sequence)) == [(0, 60, 1), (1000, 60, 0)]


def stream(rows: list[tuple[float, int, int]]) -> Events:
  """Events from (time in seconds, pitch, velocity) rows in stream order."""
  times, pitch, velocity = (np.array(column) for column in zip(*rows))
  return Events(pitch.astype(np.uint8), np.diff(times, prepend=0.0).astype(np.float32), velocity.astype(np.uint8))


def notes_of(sequence) -> list[tuple]:
  return [(n.pitch, n.velocity, round(n.start_time, 6), round(n.end_time, 6)) for n in sequence.notes]


def test_onset_ends_the_sounding_note_of_its_pitch_and_a_release_the_new_one():
  events = stream([(0.0, 60, 10), (1.0, 60, 20), (1.5, 62, 30), (2.0, 60, 0), (3.0, 62, 0), (4.0, 60, 0)])
  assert notes_of(ev.events_to_note_sequence(events)) == [(60, 10, 0, 1), (60, 20, 1, 2), (62, 30, 1.5, 3)]


def test_stray_releases_ignored_and_open_notes_closed_at_the_end():
  events = stream([(0.0, 60, 0), (0.5, 60, 10), (1.0, 64, 20), (1.5, 64, 0), (1.75, 64, 0), (2.0, 67, 30)])
  assert notes_of(ev.events_to_note_sequence(events)) == [
      (60, 10, 0.5, 2.0), (64, 20, 1.0, 1.5), (67, 30, 2.0, 2.0 + ev.MIN_NOTE_SECONDS)]


def midi_problems(path: str | Path) -> list[str]:
  """What would leave a synth playing a file wrong, read with mido from all tracks merged, per channel and pitch:
  a note-on of a sounding pitch, a note-off of a silent one, a note that lasts no tick, a note never ended.

  None of them means that note-ons and note-offs alternate, each note lasting a tick at least (so no pitch
  has two note-ons at one tick), and that the file closes every note it opens.
  """
  sounding = {}  # (channel, pitch): tick of its note-on
  problems = []
  tick = 0
  for message in mido.merge_tracks(mido.MidiFile(path).tracks):
    tick += message.time
    if message.type not in ("note_on", "note_off"):
      continue
    key = (message.channel, message.note)
    where = f"tick {tick}, channel {message.channel}, pitch {message.note}"
    if message.type == "note_on" and message.velocity > 0:
      if key in sounding:
        problems.append(f"{where}: note-on of a sounding pitch (on since tick {sounding[key]})")
      sounding[key] = tick
    elif key not in sounding:
      problems.append(f"{where}: note-off of a silent pitch")
    elif sounding.pop(key) == tick:
      problems.append(f"{where}: note lasts no tick")
  return problems + [f"channel {channel}, pitch {pitch}: note-on at tick {start} never ended"
                     for (channel, pitch), start in sounding.items()]


def on(tick: int, pitch: int, velocity: int = 80) -> tuple:
  return tick, dict(type="note_on", note=pitch, velocity=velocity)


def test_midi_problems_names_each_fault(tmp_path):
  path = write(tmp_path, [on(0, 60), on(0, 60, 0),  # zero length: the note-off pretty_midi writes first
                          on(10, 62, 0), on(10, 62),  # ...and the note-off before the note-on
                          on(20, 64), on(30, 64), on(40, 64, 0),
                          on(50, 65), (60, dict(type="note_off", note=65)), (70, dict(type="note_off", note=65))])
  assert midi_problems(path) == [
      "tick 0, channel 0, pitch 60: note lasts no tick",
      "tick 10, channel 0, pitch 62: note-off of a silent pitch",
      "tick 30, channel 0, pitch 64: note-on of a sounding pitch (on since tick 20)",
      "tick 70, channel 0, pitch 65: note-off of a silent pitch",
      "channel 0, pitch 62: note-on at tick 10 never ended"]
  assert midi_problems(write(tmp_path, note(0.0, 1.0, 60) + note(1.0, 2.0, 60), note(0.5, 1.0, 60, channel=1))) == []


TICK = 1 / ev.TICKS_PER_SECOND


@pytest.mark.parametrize("rows, expected", [
    pytest.param([(0.0, 60, 80), (0.0, 60, 0)], [(60, 80, 0.0, ev.MIN_NOTE_SECONDS)], id="zero length"),
    pytest.param([(0.0, 60, 80), (0.4 * TICK, 60, 0)], [(60, 80, 0.0, ev.MIN_NOTE_SECONDS)],
                 id="shorter than half a tick"),
    pytest.param([(0.0, 60, 80), (0.0, 60, 0), (0.025, 60, 70), (0.1, 60, 0)],
                 [(60, 80, 0.0, 0.025), (60, 70, 0.025, 0.1)], id="zero length struck again within MIN_NOTE_SECONDS"),
    pytest.param([(0.0, 60, 80), (0.0, 60, 0), (TICK, 60, 70), (0.1, 60, 0)],
                 [(60, 80, 0.0, TICK), (60, 70, TICK, 0.1)], id="zero length struck again a tick later"),
    pytest.param([(0.0, 60, 80), (1.0, 60, 70), (2.0, 60, 0), (3.0, 60, 0)],
                 [(60, 80, 0.0, 1.0), (60, 70, 1.0, 2.0)], id="overlapping notes of one pitch"),
    pytest.param([(0.0, 60, 50), (0.0, 60, 90), (1.0, 60, 0), (1.0, 60, 0)], [(60, 90, 0.0, 1.0)],
                 id="two onsets at one time"),
    pytest.param([(0.0, 60, 90), (0.4 * TICK, 60, 50), (1.0, 60, 0)], [(60, 90, 0.0, 1.0)],
                 id="two onsets at one tick"),
    pytest.param([(0.0, 60, 90), (0.0, 60, 0), (0.0, 60, 50), (1.0, 60, 0)], [(60, 90, 0.0, 1.0)],
                 id="a note without length and a note at one time"),
    pytest.param([(0.0, 60, 0), (0.0, 62, 90), (0.0, 60, 80), (0.0, 62, 0), (0.0, 60, 0), (0.0, 60, 70)],
                 [(62, 90, 0.0, ev.MIN_NOTE_SECONDS), (60, 80, 0.0, ev.MIN_NOTE_SECONDS)], id="everything at one time"),
    pytest.param([(0.0, 60, 200), (0.5, 60, 255), (1.0, 60, 0)], [(60, 127, 0.0, 0.5), (60, 127, 0.5, 1.0)],
                 id="velocities above 127"),
])
def test_ill_formed_streams_write_clean_files(tmp_path, rows, expected):
  events = stream(rows)
  assert notes_of(ev.events_to_note_sequence(events)) == [(p, v, round(s, 6), round(e, 6)) for p, v, s, e in expected]
  ev.write_midi(events, tmp_path / "piece.mid")
  assert midi_problems(tmp_path / "piece.mid") == []


def test_time_never_runs_backwards():
  events = Events(np.array([60, 60, 62, 62], np.uint8), np.array([1.0, -0.5, np.nan, 0.25], np.float32),
                  np.array([80, 0, 80, 0], np.uint8))
  assert notes_of(ev.events_to_note_sequence(events)) == [(60, 80, 1.0, 1.0 + ev.MIN_NOTE_SECONDS), (62, 80, 1.0, 1.25)]


def random_stream(rng: np.random.Generator) -> Events:
  """A stream of a few pitches, many of its times equal or under a tick apart and many releases, all at random."""
  length = rng.integers(1, 200)
  dt = rng.choice([0.0, 1.0, 0.0], length) * rng.exponential(0.05, length)
  dt = np.where(rng.random(length) < 0.2, rng.uniform(0.0, 2 * TICK, length), dt)
  velocity = np.where(rng.random(length) < 0.5, 0, rng.integers(1, 256, length))
  return Events(rng.integers(60, 64, length).astype(np.uint8), dt.astype(np.float32), velocity.astype(np.uint8))


def test_random_streams_write_clean_files_with_all_their_notes(tmp_path):
  rng = np.random.default_rng(0)
  for i in range(300):
    events = random_stream(rng)
    ev.write_midi(events, tmp_path / "piece.mid")
    assert midi_problems(tmp_path / "piece.mid") == [], f"stream {i}"
    onsets = [m for m in mido.MidiFile(tmp_path / "piece.mid").tracks[1] if m.type == "note_on" and m.velocity]
    assert len(onsets) == len(ev.note_arrays(events).pitch), f"stream {i}"


def test_well_formed_streams_keep_their_notes_exactly():
  rng = np.random.default_rng(1)
  for _ in range(50):
    sequence = note_seq.NoteSequence()
    for pitch in rng.choice(np.arange(21, 109), 6, replace=False):
      ticks = np.cumsum(rng.integers(0, 3, 20) * rng.integers(1, 2000, 20))  # notes touching, and rests
      for start, end in zip(ticks[0::2], ticks[1::2]):
        if end > start:
          sequence.notes.add(pitch=pitch, velocity=rng.integers(1, 128), start_time=start / ev.TICKS_PER_SECOND,
                              end_time=end / ev.TICKS_PER_SECOND)
    notes = ev.note_arrays(ev.note_sequence_to_events(sequence))
    assert sorted(zip(*(field.tolist() for field in notes))) == sorted(
        (n.pitch, n.velocity, n.start_time, n.end_time) for n in sequence.notes)


def test_empty_stream_writes_an_empty_file(tmp_path):
  empty = Events.concatenate([])
  assert not ev.events_to_note_sequence(empty).notes
  ev.write_midi(empty, tmp_path / "empty.mid")
  assert len(ev.midi_to_events(tmp_path / "empty.mid")) == 0


def assert_round_trip(events: Events, tmp_path: Path) -> None:
  """events -> MIDI -> events keeps pitches and velocities and all times to 1 ms."""
  ev.write_midi(events, tmp_path / "again.mid")
  again = ev.midi_to_events(tmp_path / "again.mid")
  np.testing.assert_array_equal(again.pitch, events.pitch)
  np.testing.assert_array_equal(again.velocity, events.velocity)
  np.testing.assert_allclose(np.cumsum(again.dt, dtype=np.float64), np.cumsum(events.dt, dtype=np.float64), atol=1e-3)


def test_round_trip_hand_made(tmp_path):
  path = write(tmp_path, note(0.1, 0.4, 60, 1) + note(0.1, 2.0, 64, 127) + note(0.4, 0.9, 60) + pedal(1.0, 1.5),
               note(0.3, 0.3001, 72) + note(1.2, 1.7, 48, channel=9))
  assert_round_trip(ev.midi_to_events(path), tmp_path)


@pytest.fixture(scope="module")
def short_maestro_files(maestro) -> list[Path]:
  """The three smallest MAESTRO MIDI files: real performances, fast to read."""
  return sorted(maestro.glob("*/*.midi"), key=lambda p: p.stat().st_size)[:3]


def test_round_trip_maestro(short_maestro_files, tmp_path):
  for path in short_maestro_files:
    events = ev.midi_to_events(path)
    assert len(events) > 100
    assert_round_trip(events, tmp_path)


@pytest.mark.parametrize("sustain", [True, False])
def test_reader_equals_note_seq_on_maestro(short_maestro_files, sustain):
  for path in short_maestro_files:
    assert_same(ev.midi_to_events(path, sustain=sustain), plain_note_seq_events(path, sustain))


def test_reader_equals_note_seq_on_tricky_file(tmp_path):
  # Several tracks and channels, a program change mid-track, pedal before the first note, a pitch
  # bend, a tempo change, overlapping notes of one pitch, a note-on without note-off, drums.
  conductor = [(0, dict(type="set_tempo", tempo=400000)), (700, dict(type="set_tempo", tempo=650000))]
  piano = (pedal(0.0, 0.9) + note(0.1, 0.3, 60) + note(0.2, 0.6, 60, 30) + note(0.5, 1.4, 67)
           + [(300, dict(type="pitchwheel", pitch=1000)), (500, dict(type="program_change", program=5)),
              (900, dict(type="note_on", note=70, velocity=60))] + note(1.0, 1.5, 72) + pedal(1.2, 1.8))
  other = note(0.0, 0.7, 55, channel=3) + pedal(0.4, 1.0)[:1] + note(0.3, 0.4, 38, channel=9)
  path = write(tmp_path, conductor, piano, other)
  for sustain in (True, False):
    assert_same(ev.midi_to_events(path, sustain=sustain), plain_note_seq_events(path, sustain))


def mido_tracks(data: bytes) -> list[list[tuple]] | str:
  """What mido makes of MIDI bytes, as comparable rows per track, or "error" (as the reader, past MAX_TICKS too)."""
  try:
    midi = mido.MidiFile(file=io.BytesIO(data))
  except Exception:
    return "error"
  if max((sum(m.time for m in track) for track in midi.tracks), default=0) > ev.MAX_TICKS:
    return "error"
  return [[message_row(m) for m in track] for track in midi.tracks]


def fast_tracks(data: bytes) -> list[list[tuple]] | str:
  try:
    midi = ev._parse_midi(data)
  except Exception:
    return "error"
  return [[message_row(m) for m in track] for track in midi.tracks]


# The attributes pretty_midi reads, per message type.
READ_BY_PRETTY_MIDI = {
    "note_on": ("channel", "note", "velocity"), "note_off": ("channel", "note", "velocity"),
    "control_change": ("channel", "control", "value"), "program_change": ("channel", "program"),
    "pitchwheel": ("channel", "pitch"), "set_tempo": ("tempo",), "track_name": ("name",), "text": ("text",),
    "lyrics": ("text",), "key_signature": ("key",), "time_signature": ("numerator", "denominator"),
}


def message_row(message) -> tuple:
  return (message.type, message.time, *(getattr(message, name) for name in READ_BY_PRETTY_MIDI.get(message.type, ())))


SAMPLE = midi_bytes(
    [(0, dict(type="set_tempo", tempo=500000))],
    note(0.0, 0.5, 60) + note(0.25, 0.5, 64) + pedal(0.1, 0.4)
    + [(10, dict(type="pitchwheel", pitch=-300)), (20, dict(type="program_change", program=3)),
       (30, dict(type="sysex", data=[1, 2, 3])), (40, dict(type="aftertouch", value=9))])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(14, len(SAMPLE) - 1), st.integers(0, 255)), max_size=3),
       st.integers(14, len(SAMPLE)))
def test_parser_agrees_with_mido_on_corrupted_files(changes, length):
  data = bytearray(SAMPLE)
  for position, value in changes:
    data[position] = value
  data = bytes(data[:length])
  assert fast_tracks(data) == mido_tracks(data)


@pytest.mark.parametrize("content, reason", [
    (b"", "empty file"),
    (b"hello, this is a text file\n", "not a MIDI file"),
    (np.random.default_rng(0).bytes(500), "not a MIDI file"),
    (SAMPLE[:len(SAMPLE) // 2], "truncated MIDI data"),
])
def test_unreadable_files_raise_with_a_short_reason(tmp_path, content, reason):
  (tmp_path / "bad.mid").write_bytes(content)
  with pytest.raises(ev.MidiReadError, match=reason):
    ev.midi_to_events(tmp_path / "bad.mid")


def test_implausibly_long_file_raises(tmp_path):
  path = write(tmp_path, note(0.0, 1.0, 60) + note(ev.MAX_TICKS / SECOND, ev.MAX_TICKS / SECOND + 1, 62))
  with pytest.raises(ev.MidiReadError, match="implausibly long"):
    ev.midi_to_events(path)


def test_folder_named_like_a_midi_file_raises(tmp_path):
  (tmp_path / "x.mid").mkdir()
  with pytest.raises(ev.MidiReadError, match="directory"):
    ev.midi_to_events(tmp_path / "x.mid")
