"""MAESTRO-scale training: a causal 2 x 512 LSTM reading pitch, dt and velocity."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the default configuration, locked so a misspelt override is an error."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.dir = ""  # A folder written by `musicgen prepare`; `--data` sets it.
  config.data.window = 256  # Events the model reads per training example.
  config.data.sustain = True  # Apply the sustain pedal when reading MIDI.
  config.data.workers = 0  # grain worker processes (0: in the training process).
  config.data.prefetch = 4  # Batches each worker keeps ready.
  config.data.transpose = 6  # Random transposition in [-transpose, +transpose] semitones.
  config.data.time_stretch = 0.1  # dt scaled by one factor in [1 - s, 1 + s].
  config.data.loudness_stretch = 0.1  # Onset velocity scaled by one factor in [1 - s, 1 + s].
  config.data.eval_windows = 256  # Fixed validation windows scored at each evaluation.

  config.model = ml_collections.ConfigDict()
  config.model.inputs = "pitch+dt+velocity"  # Or "pitch" (the original).
  config.model.embed = 64
  config.model.hidden = 512
  config.model.layers = 2
  config.model.head_divisors = (2, 4)  # Head widths hidden // 2 and hidden // 4, as the original.
  config.model.dropout = 0.1
  # "distribution": each head a categorical over its sub-event's classes, sampled in generation (pitch,
  # velocity with 0 = release, dt in `dt_bin` bins up to `dt_max` with dt = 0 a class of its own), each
  # head reading the sub-events before it in `order`. "regression": the original's point estimates.
  config.model.heads = "distribution"
  config.model.order = ("pitch", "velocity", "time")
  config.model.dt_bin = 0.01  # Seconds.
  config.model.dt_max = 4.0  # Seconds; longer gaps are drawn this long.
  # The time head's family: 0, a categorical over the dt classes; K > 0, dt = 0 or a mixture of K logistics
  # over log dt, scored on the same classes.
  config.model.time_mixture = 0
  # "density": every position also reads a note-density control (log notes per second over the training
  # window), which generation sets per file (`--notes-per-second`, or drawn from `sample.density_quantiles`,
  # or a primer's own), so that files keep one tempo and differ as pieces do. "polyphony": the same for the
  # notes sounding at once (`--polyphony`, `sample.polyphony_quantiles`). "density+polyphony": both, by
  # default (at 4,500 steps the files' density +12% of the validation pieces' against +23% to +33% with "none",
  # and their notes held no longer climb). "none": the events alone.
  config.model.condition = "density+polyphony"
  config.model.dtype = "float32"  # Compute dtype; "bfloat16" on accelerators.
  config.model.param_dtype = "float32"
  # How the LSTM runs: auto (cudnn on GPUs in float32, fused on CPUs, scan elsewhere), scan, fused or cudnn.
  config.model.recurrence = "auto"

  config.train = ml_collections.ConfigDict()
  config.train.steps = 100_000
  config.train.batch_size = 64
  config.train.isolation = "strict"  # Or "joint" (the original code: losses summed into the trunk).
  config.train.predict_last = 0  # Score only the last k positions (0: every position).
  config.train.steps_per_execution = 10  # Steps per compiled call (reduced to divide the cadences below).
  config.train.log_every = 50
  config.train.eval_every = 1000
  config.train.checkpoint_every = 1000
  config.train.keep_checkpoints = 3
  config.train.sample_every = 5000  # Write and log a few samples every so many steps (0: never).
  config.train.sample_count = 4
  config.train.sample_length = 512
  config.train.optimizers = ml_collections.ConfigDict()
  for name in ("pitch", "time", "velocity"):
    optimizer = ml_collections.ConfigDict()
    optimizer.name = "adam"  # adam, adamw or sgd.
    optimizer.learning_rate = 1e-3
    optimizer.warmup_steps = 500
    optimizer.decay = "cosine"  # constant, cosine or exponential.
    optimizer.decay_rate = 1.0  # Exponential decay factor per `decay_steps`.
    optimizer.decay_steps = 1
    optimizer.weight_decay = 0.0
    optimizer.clip_norm = 1.0  # Global-norm clipping of this optimizer's gradients (0: off).
    config.train.optimizers[name] = optimizer

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = 0  # Devices on the data-parallel axis (0: all of them).
  config.mesh.distributed = False  # Call jax.distributed.initialize() first (multi-host GPU/TPU).

  config.sample = ml_collections.ConfigDict()
  # Predicted velocity (MIDI units) below this is a release. None: set when training starts to half
  # the training split's mean onset velocity, where a release becomes the likelier event.
  config.sample.release_threshold = ml_collections.FieldReference(None, field_type=float)
  config.sample.max_dt = 4.0  # Seconds; longer predicted gaps are clipped.
  # How `musicgen generate` (and the samples written during training) draw from this run unless told
  # otherwise: the pitch's temperature, top-k (0: off) and nucleus mass (1: off), and the temperatures of
  # the time and velocity distributions (distribution heads). 1, 0, 1, 1, 1 would be the model's own
  # distribution; the pitch's far tail is left out (nucleus 0.98): its rare pitches, in registers the music
  # is not in, are the notes held too long (4,500 steps: mean polyphony -2% to +4% instead of +25% to +36%).
  config.sample.temperature = 1.0
  config.sample.top_k = 0
  config.sample.top_p = 0.98
  config.sample.time_temperature = 1.0
  config.sample.velocity_temperature = 1.0
  # Notes per second and notes sounding at once of the training pieces at 21 evenly spaced quantiles, from
  # which a conditioned model draws each file's controls. (): set when training starts.
  config.sample.density_quantiles = ()
  config.sample.polyphony_quantiles = ()

  config.lock()
  return config
