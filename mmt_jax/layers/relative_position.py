"""T5 relative position bias (Raffel et al. 2020, section 2.1) over explicit query/key positions.

The bias added to attention logits is `rel_embedding[head, bucket(key_position - query_position)]`:
exact buckets for small distances, logarithmic ones up to `max_distance`, and (bidirectional) a separate
half of the buckets for keys after the query. Positions are explicit so that callers can restart them per
segment (MMT4 Eq. 3) or pass a single decode step's position.
"""
import math

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import partitioning


def relative_position_bucket(relative_position: jax.Array, *, bidirectional: bool,
                             num_buckets: int = 32, max_distance: int = 128) -> jax.Array:
    """Maps `key_position - query_position` (int array, any shape) to bucket ids in `[0, num_buckets)`.

    Bidirectional: keys before the query (and the query itself) use buckets `[0, n/2)`, keys after it
    `[n/2, n)`. Causal: keys after the query all fall in bucket 0 (they are masked anyway).
    Within each half, distances below `n/4` (bidirectional) or `n/2` (causal) get their own bucket;
    larger ones share log-spaced buckets, saturating at `max_distance`.
    """
    relative_position = jnp.asarray(relative_position, jnp.int32)
    buckets = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += jnp.where(relative_position > 0, num_buckets, 0)
        distance = jnp.abs(relative_position)
    else:
        distance = jnp.maximum(-relative_position, 0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # max(distance, 1) keeps log finite where the small branch is selected anyway.
    log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact) / math.log(
        max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(is_small, distance, large)


class RelativePositionBias(nn.Module):
    """One bias table `rel_embedding [heads, num_buckets]` shared by all layers of a stack.

    `__call__(query_positions [B|1, Lq], key_positions [B|1, Lk])` -> bias `[B|1, heads, Lq, Lk]`.
    """

    num_heads: int
    bidirectional: bool
    num_buckets: int = 32
    max_distance: int = 128
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    embedding_init: nn.initializers.Initializer = nn.initializers.variance_scaling(
        1.0, "fan_avg", "uniform")

    @nn.compact
    def __call__(self, query_positions: jax.Array, key_positions: jax.Array) -> jax.Array:
        query_positions = jnp.atleast_2d(jnp.asarray(query_positions, jnp.int32))
        key_positions = jnp.atleast_2d(jnp.asarray(key_positions, jnp.int32))
        relative = key_positions[:, None, :] - query_positions[:, :, None]  # [B, Lq, Lk]
        buckets = relative_position_bucket(
            relative, bidirectional=self.bidirectional, num_buckets=self.num_buckets,
            max_distance=self.max_distance)
        table = partitioning.param_with_axes(
            "rel_embedding", self.embedding_init, (self.num_heads, self.num_buckets),
            self.param_dtype, axes=("heads", "relpos_buckets"))
        table = jnp.asarray(table, self.dtype)
        bias = jnp.take(table, buckets, axis=1)  # [heads, B, Lq, Lk]
        return jnp.transpose(bias, (1, 0, 2, 3))
