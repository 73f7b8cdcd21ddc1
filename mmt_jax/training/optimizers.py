"""Optimizers and learning-rate schedules, each a plain function for gin to bind.

  MMT4 (paper section 4): AdamW, peak 2e-4, linear decay   -> adamw(linear_decay(2e-4, total_steps))
  MoEMoE (appendix F): 1e-3, x0.2 at given steps            -> adamw(step_decay(1e-3, (s1, s2)))
  T5 pretraining style                                      -> adafactor(rsqrt_decay(1e-2, 10000))

Every optimizer clips the global gradient norm first when `clip_norm` is set. `train_only` freezes
part of an MoE model (MoEMoE Table 4).
"""
from typing import Sequence

import jax.numpy as jnp
import optax
from flax import traverse_util

TRAINING_MODES = ("full", "experts", "backbone")


def linear_decay(peak: float, total_steps: int, warmup_steps: int = 0,
                 end_value: float = 0.0) -> optax.Schedule:
    """Linear warm-up from 0 to `peak` over `warmup_steps`, then linear decay to `end_value` at
    `total_steps`."""
    decay = optax.linear_schedule(peak, end_value, max(total_steps - warmup_steps, 1))
    if not warmup_steps:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup_steps), decay],
                                [warmup_steps])


def step_decay(peak: float, boundaries: Sequence[int], factor: float = 0.2,
               warmup_steps: int = 0) -> optax.Schedule:
    """`peak`, multiplied by `factor` at each step in `boundaries` (after an optional warm-up)."""
    steps = optax.piecewise_constant_schedule(peak, {int(b): factor for b in boundaries})
    if not warmup_steps:
        return steps
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup_steps),
                                 lambda step: steps(step + warmup_steps)], [warmup_steps])


def rsqrt_decay(peak: float, warmup_steps: int = 10_000) -> optax.Schedule:
    """T5's schedule: `peak` for `warmup_steps`, then `peak * sqrt(warmup_steps / step)`."""
    return lambda step: peak * jnp.sqrt(warmup_steps / jnp.maximum(step, warmup_steps))


def _clipped(tx: optax.GradientTransformation, clip_norm: float | None):
    return optax.chain(optax.clip_by_global_norm(clip_norm), tx) if clip_norm else tx


def adamw(learning_rate: optax.ScalarOrSchedule, weight_decay: float = 0.01, b1: float = 0.9,
          b2: float = 0.999, eps: float = 1e-8,
          clip_norm: float | None = 1.0) -> optax.GradientTransformation:
    return _clipped(optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay),
                    clip_norm)


def adafactor(learning_rate: optax.ScalarOrSchedule, clip_norm: float | None = None,
              decay_rate: float = 0.8, momentum: float | None = None,
              multiply_by_parameter_scale: bool = True) -> optax.GradientTransformation:
    """Adafactor with factored second moments (T5's optimizer); no first moment by default."""
    return _clipped(optax.adafactor(learning_rate, decay_rate=decay_rate, momentum=momentum,
                                    multiply_by_parameter_scale=multiply_by_parameter_scale),
                    clip_norm)


def train_only(tx: optax.GradientTransformation, mode: str = "full") -> optax.GradientTransformation:
    """MoEMoE's training modes (Table 4): "full" trains everything; "experts" only the MoE experts and
    routers (paths containing `mlp/expert/` or `mlp/router/`), everything else frozen (the paper's
    best); "backbone" everything but them. Frozen parameters go through `optax.set_to_zero`, so they
    never change and have no optimizer state (gin: `train.train.optimizer = @optimizers.train_only()`,
    `optimizers.train_only.tx = @optimizers.adamw()`)."""
    if mode not in TRAINING_MODES:
        raise ValueError(f"training mode {mode!r}; choose from {TRAINING_MODES}")
    if mode == "full":
        return tx

    def labels(params):
        flat = traverse_util.flatten_dict(params, sep="/")
        moe = {path: "/mlp/expert/" in f"/{path}" or "/mlp/router/" in f"/{path}" for path in flat}
        if not any(moe.values()):
            raise ValueError(f"training mode {mode!r} needs MoE layers, and the model has none")
        return traverse_util.unflatten_dict(
            {path: "train" if is_moe == (mode == "experts") else "frozen"
             for path, is_moe in moe.items()}, sep="/")

    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
