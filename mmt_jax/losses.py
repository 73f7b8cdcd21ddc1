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


def chunked_cross_entropy(project, hidden: jax.Array, targets: jax.Array,
                          weights: jax.Array | None = None, *, chunk_length: int,
                          label_smoothing: float = 0.0, z_loss: float = 0.0):
    """`cross_entropy_with_logits(project(hidden), ...)` computed `chunk_length` positions at a
    time, each chunk's logits made again in the backward pass (`jax.checkpoint`): neither pass
    holds the float32 `[B, L, vocab]` logits, only one chunk's `[B, chunk_length, vocab]`.

    project: states `[B, n, E]` -> logits `[B, n, vocab]` (the model's output layer); hidden
    `[B, L, E]`; targets, weights `[B, L]`. Returns the per-token loss and z-loss `[B, L]` (as
    `cross_entropy_with_logits`) and `[B, L]` bool, whether each target is the argmax.
    """
    batch, length = targets.shape
    if weights is None:
        weights = jnp.ones(targets.shape, jnp.float32)
    pad = -length % chunk_length
    chunks = (length + pad) // chunk_length

    def split(x):  # [B, L, ...] -> [chunks, B, chunk_length, ...], padding with zero weights
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape((batch, chunks, chunk_length) + x.shape[2:])
        return jnp.swapaxes(x, 0, 1)

    @jax.checkpoint
    def one_chunk(parts):
        states, chunk_targets, chunk_weights = parts
        logits = project(states)
        loss, z = cross_entropy_with_logits(logits, chunk_targets, chunk_weights,
                                            label_smoothing=label_smoothing, z_loss=z_loss)
        return loss, z, jnp.argmax(logits, axis=-1) == chunk_targets

    outputs = jax.lax.map(one_chunk, (split(hidden), split(targets), split(weights)))
    return tuple(jnp.swapaxes(x, 0, 1).reshape(batch, -1)[:, :length] for x in outputs)


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


# A column is left out of a row's softmax by this logit (finite: a row with no candidate stays finite).
_EXCLUDED = -1e9


def contrastive_loss(image: jax.Array, text: jax.Array, scale: jax.Array, valid: jax.Array,
                     same_text: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Symmetric InfoNCE (CLIP, Radford et al. 2021, Fig. 3) over a batch of image-text pairs, and
    the share of pairs each side retrieves.

    image, text: `[B, D]` unit vectors (`ContrastiveHead`); scale: the scalar logit scale; valid:
    `[B]` whether row i is a true pair (rows that are not take no part, as anchors or as
    candidates); same_text: `[B, B]` bool, whether rows i and j hold the same text (the same title
    twice in a batch): such a j is not a negative for i in either direction. With
    `s_ij = scale * image_i . text_j` over the candidates of each row,

        loss = 1/2 [mean_i -log softmax_j(s_ij)_i + mean_j -log softmax_i(s_ij)_j]   (valid rows)

    Returns `(loss [], accuracy [])`: accuracy is the share of valid rows, over both directions,
    whose highest-scoring candidate is their own pair (or one with the same text).
    """
    valid = jnp.asarray(valid, bool)
    size = image.shape[0]
    own = jnp.eye(size, dtype=bool)
    same = own if same_text is None else (jnp.asarray(same_text, bool) | own)
    logits = scale * jnp.einsum("id,jd->ij", image.astype(jnp.float32), text.astype(jnp.float32))
    num_valid = jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0)
    losses, hits = [], []
    for scores in (logits, logits.T):  # image -> text rows, then text -> image rows
        candidate = valid[None, :] & (own | ~same)
        masked = jnp.where(candidate, scores, _EXCLUDED)
        row_loss = jax.nn.logsumexp(masked, axis=-1) - jnp.diagonal(scores)
        losses.append(jnp.sum(jnp.where(valid, row_loss, 0.0)) / num_valid)
        best = jnp.argmax(masked, axis=-1)
        hit = jnp.take_along_axis(same, best[:, None], axis=-1)[:, 0] & valid
        hits.append(jnp.sum(hit.astype(jnp.float32)) / num_valid)
    return (losses[0] + losses[1]) / 2, (hits[0] + hits[1]) / 2


def same_sequence(tokens: jax.Array) -> jax.Array:
    """`[B, L]` int tokens -> `[B, B]` bool, whether rows i and j hold the same sequence (compared
    by a 32-bit polynomial hash of the tokens, so memory is `[B, B]`, not `[B, B, L]`)."""
    tokens = jnp.asarray(tokens).astype(jnp.uint32)
    powers = jnp.cumprod(jnp.full((tokens.shape[-1],), 1_000_003, jnp.uint32))  # wraps mod 2^32
    fingerprint = jnp.sum(tokens * powers, axis=-1, dtype=jnp.uint32)
    return fingerprint[:, None] == fingerprint[None, :]
