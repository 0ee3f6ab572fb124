"""The PyTorch reference of the training benchmarks, and the synthetic batches both frameworks train on.

`TorchStep` is a config's model in plain PyTorch: nn.Embedding, nn.LSTM (cuDNN on CUDA), the
original's three regression heads (FC + Dropout + ReLU twice, then FC), cross-entropy, L1 and MSE
losses, the same head isolation, and one Adam with clipping per head's parameter group. Used by
scripts/bench_train.py (CPU) and scripts/bench_accelerator.py (CUDA); it imports nothing of the
training loop (grain, orbax).
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np

from musicgen_jax import models


def synthetic_batch(batch_size: int, window: int, seed: int = 0) -> dict:
  """A batch with the pipeline's layout and dtypes, drawn at random."""
  rng = np.random.default_rng(seed)

  def events() -> dict:
    return {"pitch": rng.integers(0, 128, (batch_size, window)).astype(np.int32),
            "dt": rng.exponential(0.1, (batch_size, window)).astype(np.float32),
            "velocity": rng.integers(0, 128, (batch_size, window)).astype(np.float32)}

  held = np.where(rng.random((batch_size, 128)) < 0.05, rng.exponential(0.5, (batch_size, 128)), -1.0)
  return {"inputs": events(), "targets": events(), "held": held.astype(np.float32)}


class TorchStep:
  """The PyTorch reference: the same model shapes, losses, isolation and per-head Adam with clipping, on
  `device` (`cpu` or `cuda`); under autocast to bfloat16 when `model.dtype=bfloat16`, as ours computes."""

  steps_per_call = 1

  def __init__(self, config: ml_collections.ConfigDict, torch: Any, device: str = "cpu"):
    self.torch, self.device = torch, device
    nn = torch.nn
    model, self.isolate = config.model, config.train.isolation == "strict"
    torch.manual_seed(config.seed)
    self.continuous = model.inputs == "pitch+dt+velocity"
    self.bfloat16 = model.dtype == "bfloat16"  # Then autocast: float32 parameters, bfloat16 compute, as ours.
    widths = [model.hidden] + [model.hidden // d for d in model.head_divisors]

    def head(out_features: int) -> Any:
      layers = []
      for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.Dropout(model.dropout), nn.ReLU()]
      return nn.Sequential(*layers, nn.Linear(widths[-1], out_features)).to(device)

    self.embed = nn.Embedding(models.NUM_PITCHES, model.embed).to(device)
    self.lstm = nn.LSTM(model.embed + (2 if self.continuous else 0), model.hidden, model.layers,
                        batch_first=True).to(device)
    self.heads = {"pitch": head(models.NUM_PITCHES), "time": head(1), "velocity": head(1)}
    trunk = [*self.embed.parameters(), *self.lstm.parameters(), *self.heads["pitch"].parameters()]
    groups = {"pitch": trunk, "time": list(self.heads["time"].parameters()),
              "velocity": list(self.heads["velocity"].parameters())}
    self.groups = [(params, torch.optim.Adam(params, lr=config.train.optimizers[name].learning_rate),
                    config.train.optimizers[name].clip_norm) for name, params in groups.items()]
    batch = synthetic_batch(config.train.batch_size, config.data.window)
    self.batch = jax.tree.map(lambda x: torch.from_numpy(x).to(device), batch)
    self()

  def __call__(self) -> None:
    with self.torch.autocast(self.device, dtype=self.torch.bfloat16, enabled=self.bfloat16):
      loss = self.loss()
    for _, optimizer, _ in self.groups:
      optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for params, optimizer, clip_norm in self.groups:
      if clip_norm > 0:
        self.torch.nn.utils.clip_grad_norm_(params, clip_norm)
      optimizer.step()
    if self.device == "cuda":
      self.torch.cuda.synchronize()

  def loss(self) -> Any:
    torch, inputs, targets = self.torch, self.batch["inputs"], self.batch["targets"]
    x = self.embed(inputs["pitch"].long())
    if self.continuous:
      dt = torch.log1p(inputs["dt"].clamp(min=0.0) / models.DT_INPUT_SCALE)
      x = torch.cat([x, torch.stack([dt, inputs["velocity"] / models.MAX_VELOCITY], -1)], -1)
    features, _ = self.lstm(x)
    side = features.detach() if self.isolate else features
    logits = self.heads["pitch"](features)
    return (torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets["pitch"].long().flatten())
            + (self.heads["time"](side)[..., 0].float() - targets["dt"]).abs().mean()
            + (self.heads["velocity"](side)[..., 0].float() - targets["velocity"] / models.MAX_VELOCITY)
            .square().mean())
