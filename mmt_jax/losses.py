"""Token-level cross entropy with label smoothing and z-loss (t5x's loss, Raffel et al. 2020), and the
loss defaults every Model uses (`LossConfig`)."""
import dataclasses

import jax
import jax.numpy as jnp


def cross_entropy_with_logits(logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None,
                              *, label_smoothing: float = 0.0, z_loss: float = 0.0):
    """Per-token loss `[B, L]` and its z-loss part `[B, L]`, both multiplied by `weights`.

    logits `[B, L, V]` (any float dtype; computed in float32), targets `[B, L]` int, weights `[B, L]`.
    With label smoothing the target distribution puts `1 - s` on the target and `s / (V - 1)` on every
    other token, and the loss is offset by that distribution's entropy so a perfect model scores 0.
    The z-loss `z_loss * log(sum(exp(logits)))^2` keeps the softmax normaliser near 1 (PaLM, sec. 5).
    """
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    confidence = 1.0 - label_smoothing
    low = label_smoothing / (vocab - 1)
    entropy = -(confidence * jnp.log(confidence) + (vocab - 1) * low * jnp.log(low + 1e-20))
    log_z = jax.nn.logsumexp(logits, axis=-1)
    log_probs = logits - log_z[..., None]
    target_log_prob = jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), -1)[..., 0]
    if label_smoothing:
        loss = -(confidence - low) * target_log_prob - low * jnp.sum(log_probs, axis=-1) - entropy
    else:
        loss = -target_log_prob
    z = z_loss * jnp.square(log_z)
    if weights is None:
        weights = jnp.ones_like(loss)
    weights = weights.astype(jnp.float32)
    return (loss + z) * weights, z * weights


# The one place the loss defaults live: our Models (mmt_jax/model.py), hence our trainer, and the
# t5x adapter (mmt_jax/t5x/models.py) all take them from here, so one batch gives one loss.
NUM_REAL_TARGET_TOKENS = "NUM_REAL_TARGET_TOKENS"


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """How token losses become the scalar loss.

    label_smoothing, z_loss: see `cross_entropy_with_logits` (z-loss 1e-4 as in T5.1.1's t5x gins).
    loss_normalizing_factor: divide the summed token loss by the number of real target tokens
      (`NUM_REAL_TARGET_TOKENS`, the default: a per-token mean, which the trainer's microbatching
      reweights so the update equals the whole batch's), by a constant, or by nothing (None: a sum).
    """
    label_smoothing: float = 0.0
    z_loss: float = 1e-4
    loss_normalizing_factor: float | str | None = NUM_REAL_TARGET_TOKENS

    def normalizer(self, num_tokens: jax.Array):
        if self.loss_normalizing_factor == NUM_REAL_TARGET_TOKENS:
            return jnp.maximum(num_tokens, 1.0)
        if self.loss_normalizing_factor is None:
            return 1.0
        return float(self.loss_normalizing_factor)


DEFAULT_LOSS = LossConfig()
