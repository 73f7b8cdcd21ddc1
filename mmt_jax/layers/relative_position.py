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


CROSS_SEGMENT_OPTIONS = ("bucket", "zero", "global")


def segment_positions(token_type_ids: jax.Array) -> jax.Array:
    """Positions that restart at 0 wherever the token type changes: `[B, L]` -> `[B, L]`.

    For MMT4's `[image ; text]` sequence this gives `0..Lv-1, 0..Lt-1` (Eq. 3).
    """
    token_type_ids = jnp.asarray(token_type_ids)
    length = token_type_ids.shape[-1]
    index = jnp.broadcast_to(jnp.arange(length), token_type_ids.shape)
    starts = jnp.concatenate([jnp.ones_like(token_type_ids[..., :1], bool),
                              token_type_ids[..., 1:] != token_type_ids[..., :-1]], axis=-1)
    run_start = jax.lax.cummax(jnp.where(starts, index, 0), axis=token_type_ids.ndim - 1)
    return index - run_start


class RelativePositionBias(nn.Module):
    """One bias table `rel_embedding [heads, num_buckets]` shared by all layers of a stack.

    `__call__(query_positions [B|1, Lq], key_positions [B|1, Lk])` -> bias `[B|1, heads, Lq, Lk]`.

    Segments (MMT4 Eq. 3): with `query_types`/`key_types` (`[B, Lq]`, `[B, Lk]` token type ids in
    `[0, num_segments)`) and per-segment positions (`segment_positions`), pairs within a segment get
    the T5 bias of their in-segment distance. The paper leaves pairs across segments open;
    `cross_segment` chooses:
      "bucket" (default): one learned bias per head and ordered pair of segments,
                `cross_segment_embedding [heads, num_segments**2]`, indexed `q_type * n + k_type`;
      "zero":   no bias across segments (attention there is driven by content alone);
      "global": the T5 bias of the given positions everywhere, for callers that pass one global
                position sequence over the concatenation instead of per-segment positions.

    2-D positions (beyond the paper): with `grid_segment` set and `query_grid`/`key_grid`
    (`[B, L, 2]` row and column of each position), pairs within that segment get
    `grid_row_embedding[h, bucket(d_row)] + grid_col_embedding[h, bucket(d_col)]` instead, so image
    patches know which neighbours are above or beside them.
    """

    num_heads: int
    bidirectional: bool
    num_buckets: int = 32
    max_distance: int = 128
    num_segments: int = 1
    cross_segment: str = "bucket"
    grid_segment: int | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    embedding_init: nn.initializers.Initializer = nn.initializers.variance_scaling(
        1.0, "fan_avg", "uniform")

    @nn.compact
    def __call__(self, query_positions: jax.Array, key_positions: jax.Array,
                 query_types: jax.Array | None = None, key_types: jax.Array | None = None,
                 query_grid: jax.Array | None = None, key_grid: jax.Array | None = None):
        if self.cross_segment not in CROSS_SEGMENT_OPTIONS:
            raise ValueError(f"cross_segment={self.cross_segment!r}; choose from {CROSS_SEGMENT_OPTIONS}")
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
        bias = jnp.transpose(jnp.take(table, buckets, axis=1), (1, 0, 2, 3))  # [B, heads, Lq, Lk]
        if self.num_segments == 1 or query_types is None:
            return bias
        query_types = jnp.asarray(query_types, jnp.int32)[:, None, :, None]
        key_types = jnp.asarray(key_types, jnp.int32)[:, None, None, :]
        if self.grid_segment is not None:
            in_grid = (query_types == self.grid_segment) & (key_types == self.grid_segment)
            bias = jnp.where(in_grid, self._grid_bias(query_grid, key_grid), bias)
        if self.cross_segment == "global":
            return bias
        if self.cross_segment == "zero":
            cross = jnp.zeros((), self.dtype)
        else:
            pairs = partitioning.param_with_axes(
                "cross_segment_embedding", self.embedding_init,
                (self.num_heads, self.num_segments ** 2), self.param_dtype,
                axes=("heads", "relpos_buckets"))
            pair_index = query_types * self.num_segments + key_types  # [B, 1, Lq, Lk]
            cross = jnp.take(jnp.asarray(pairs, self.dtype), pair_index[:, 0], axis=1)
            cross = jnp.transpose(cross, (1, 0, 2, 3))  # [B, heads, Lq, Lk]
        return jnp.where(query_types == key_types, bias, cross)

    def _grid_bias(self, query_grid, key_grid):
        """`[B, Lq, 2]`, `[B, Lk, 2]` (row, column) -> row bias + column bias `[B, heads, Lq, Lk]`."""
        if query_grid is None or key_grid is None:
            raise ValueError("grid_segment is set: pass query_grid and key_grid [batch, length, 2]")
        bias = 0.0
        for axis, name in ((0, "grid_row_embedding"), (1, "grid_col_embedding")):
            relative = (jnp.asarray(key_grid, jnp.int32)[:, None, :, axis]
                        - jnp.asarray(query_grid, jnp.int32)[:, :, None, axis])
            buckets = relative_position_bucket(relative, bidirectional=self.bidirectional,
                                               num_buckets=self.num_buckets,
                                               max_distance=self.max_distance)
            table = partitioning.param_with_axes(
                name, self.embedding_init, (self.num_heads, self.num_buckets), self.param_dtype,
                axes=("heads", "relpos_buckets"))
            bias = bias + jnp.transpose(jnp.take(jnp.asarray(table, self.dtype), buckets, axis=1),
                                        (1, 0, 2, 3))
        return bias
