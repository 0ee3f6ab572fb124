"""The heads alone: forward and backward pass of the three heads and their losses, the LSTM left out.

The heads' share of a training step is where `model.heads` and `model.inputs` differ (the trunk is the
same), so they are timed here apart from it: fixed time-major features stand in for the LSTM's outputs,
and one jitted call computes what the train step computes after them (`MusicLSTM.window_outputs`: the
held pitches of the window and the heads' outputs with dropout; each head's loss) and the gradients of
the loss with respect to the heads' parameters and the features. The batch is `synthetic_batch` of the config's shapes.

  python scripts/bench_heads.py [--config default] [--calls 5] [--rounds 5] [key=value ...]

Compare settings by running it once each (e.g. with `model.heads=regression` or `model.inputs=pitch`);
`taskset -c 0 python scripts/profile_train.py` gives a per-op profile of the whole step.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
from flax import nnx
from torch_reference import synthetic_batch

from musicgen_jax import losses, models
from musicgen_jax.config import apply_overrides, load_config


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="default")
  parser.add_argument("--calls", type=int, default=5, help="timed calls per round")
  parser.add_argument("--rounds", type=int, default=5, help="rounds; the fastest is kept")
  parser.add_argument("overrides", nargs="*")
  args = parser.parse_args()
  config = apply_overrides(load_config(args.config), args.overrides)
  batch = jax.tree.map(jnp.asarray, synthetic_batch(config.train.batch_size, config.data.window))
  graphdef, params = nnx.split(models.MusicLSTM(config.model, rngs=nnx.Rngs(config.seed)), nnx.Param)
  features = jax.random.normal(jax.random.key(1), (config.data.window, config.train.batch_size, config.model.hidden))
  weights = losses.position_weights(config.data.window, config.train.predict_last)

  @jax.jit
  def gradients(params: nnx.State, features: jax.Array, key: jax.Array) -> tuple[nnx.State, jax.Array]:
    def loss(params: nnx.State, features: jax.Array) -> jax.Array:
      model = nnx.merge(graphdef, params)
      inputs = model.with_controls(batch["inputs"], batch["targets"], batch["held"])
      outputs = model.window_outputs(features, inputs, batch["targets"], batch["held"],
                                     isolate_heads=config.train.isolation == "strict", rngs=nnx.Rngs(dropout=key))
      sums = losses.event_sums(outputs, models.swap_batch_time(batch["targets"]), weights[:, None], model.time_bins)
      return sum(losses.losses_from_sums(sums).values())

    return jax.grad(loss, argnums=(0, 1))(params, features)

  key = jax.random.key(2)
  jax.block_until_ready(gradients(params, features, key))
  best = float("inf")
  for _ in range(args.rounds):
    start = time.perf_counter()
    for _ in range(args.calls):
      jax.block_until_ready(gradients(params, features, key))
    best = min(best, (time.perf_counter() - start) / args.calls)
  events = config.train.batch_size * config.data.window
  print(json.dumps({"config": args.config, "overrides": args.overrides, "heads": config.model.heads,
                    "inputs": config.model.inputs, "rows": events, "heads_ms": round(1000 * best, 1),
                    "events_per_s": round(events / best), "cores": os.cpu_count(),
                    "load_avg_1m": os.getloadavg()[0]}))


if __name__ == "__main__":
  main()
