"""Multi-head dot-product attention with an autoregressive decode cache (T5 flavour: no biases, no
1/sqrt(d) logit scaling, which T5 folds into the query initialisation).

Decode cache (`cache` collection, batch-leading arrays, as t5x's decoding expects):
  self-attention:  `cached_key`, `cached_value` `[batch, max_length, heads, kv]` and `cache_index` (the
                   next position to write); one query token per call.
  cross-attention: `cached_encoder_key`, `cached_encoder_value` `[batch, encoder_length, heads, kv]`, the
                   projections of the encoder output, computed once when the cache is created and read
                   at every step. They are equal across the beams of one example, so beam search never
                   reorders them (`decoding.BEAM_INVARIANT_CACHE`).
"""
import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import partitioning

from mmt_jax.layers.dense import DenseGeneral, default_kernel_init

NEG_INF = -1e10


def make_attention_mask(query_mask: jax.Array, key_mask: jax.Array) -> jax.Array:
    """`[B, Lq]`, `[B, Lk]` truthy masks -> boolean `[B, 1, Lq, Lk]` (True where attending is allowed)."""
    return jnp.logical_and(query_mask[:, None, :, None] > 0, key_mask[:, None, None, :] > 0)


def make_causal_mask(length: int) -> jax.Array:
    """Boolean `[1, 1, L, L]`, True on and below the diagonal."""
    idx = jnp.arange(length)
    return (idx[None, :] <= idx[:, None])[None, None]


def make_segment_mask(query_segment_ids: jax.Array, key_segment_ids: jax.Array) -> jax.Array:
    """Block-diagonal mask for packed sequences: `[B, Lq]`, `[B, Lk]` -> `[B, 1, Lq, Lk]`."""
    return (query_segment_ids[:, None, :, None] == key_segment_ids[:, None, None, :])


def combine_masks(*masks):
    masks = [m for m in masks if m is not None]
    if not masks:
        return None
    out = masks[0]
    for m in masks[1:]:
        out = jnp.logical_and(out, m)
    return out


class MultiHeadAttention(nn.Module):
    """`__call__(inputs_q [B, Lq, E], inputs_kv [B, Lk, E], mask [B, 1, Lq, Lk], bias [B|1, H, Lq, Lk])`
    -> `[B, Lq, E]`.

    With `decode=True` the layer is either a causal self-attention that appends one token per call to
    its cache (`is_cross_attention=False`), or a cross-attention that reads the encoder projections from
    its cache. The first decode call (no cache yet) creates the cache: self-attention sizes it for
    `max_decode_length` (default: the query length); cross-attention stores the projections of
    `inputs_kv`. During decode steps the mask and bias arguments are those of the whole sequence
    (`[.., max_length, max_length]` for self-attention); the layer takes the row of its current position.
    """

    num_heads: int
    head_dim: int
    is_cross_attention: bool = False
    dropout_rate: float = 0.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = default_kernel_init

    def _projection(self, name, init):
        return DenseGeneral(
            features=(self.num_heads, self.head_dim), kernel_axes=("embed", "joined_kv"),
            dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=init, name=name)

    @nn.compact
    def __call__(self, inputs_q, inputs_kv, mask=None, bias=None, *, enable_dropout=False,
                 decode=False, max_decode_length=None):
        # T5 leaves logits unscaled; the 1/sqrt(kv) lives in the query initialisation (Adafactor-equivalent).
        def query_init(key, shape, dtype):
            return self.kernel_init(key, shape, dtype) / jnp.sqrt(self.head_dim).astype(dtype)

        project_q = self._projection("query", query_init)
        project_k = self._projection("key", self.kernel_init)
        project_v = self._projection("value", self.kernel_init)
        kv_axes = ("batch", "length", "heads", "kv")
        query = partitioning.with_sharding_constraint(project_q(inputs_q), kv_axes)

        if decode and self.is_cross_attention:
            key, value = self._cross_attention_cache(inputs_kv, project_k, project_v)
        else:
            key, value = project_k(inputs_kv), project_v(inputs_kv)
        key = partitioning.with_sharding_constraint(key, kv_axes)
        value = partitioning.with_sharding_constraint(value, kv_axes)

        if decode and not self.is_cross_attention:
            key, value, mask, bias = self._self_attention_cache(
                key, value, mask, bias, max_decode_length or inputs_q.shape[1])

        logits = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32)
        if bias is not None:
            logits = logits + jnp.asarray(bias, jnp.float32)
        if mask is not None:
            logits = jnp.where(mask, logits, NEG_INF)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        if enable_dropout and self.dropout_rate > 0.0:
            keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.dropout_rate, weights.shape)
            weights = weights * keep.astype(self.dtype) / jnp.asarray(1.0 - self.dropout_rate, self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, value)
        out = partitioning.with_sharding_constraint(out, kv_axes)
        return DenseGeneral(
            features=inputs_q.shape[-1], axis=(-2, -1), kernel_axes=("joined_kv", "embed"),
            dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init,
            name="out")(out)

    def _cross_attention_cache(self, inputs_kv, project_k, project_v):
        if not self.has_variable("cache", "cached_encoder_key"):
            key, value = project_k(inputs_kv), project_v(inputs_kv)
            self.variable("cache", "cached_encoder_key", lambda: key)
            self.variable("cache", "cached_encoder_value", lambda: value)
            return key, value
        return (self.get_variable("cache", "cached_encoder_key"),
                self.get_variable("cache", "cached_encoder_value"))

    def _self_attention_cache(self, key, value, mask, bias, max_length):
        initialized = self.has_variable("cache", "cached_key")
        batch = key.shape[0]
        shape = (batch, max_length, self.num_heads, self.head_dim)
        cached_key = self.variable("cache", "cached_key", jnp.zeros, shape, key.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, shape, value.dtype)
        cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        if not initialized:
            # Creating the cache: attend over the given tokens with the bias of their positions;
            # nothing is written yet and the output is not used.
            if bias is not None:
                bias = bias[:, :, :key.shape[1], :key.shape[1]]
            return key, value, mask, bias
        if key.shape[1] != 1:
            raise ValueError(f"decode=True takes one token per step, got query length {key.shape[1]}")
        index = cache_index.value
        cached_key.value = jax.lax.dynamic_update_slice_in_dim(cached_key.value, key, index, axis=1)
        cached_value.value = jax.lax.dynamic_update_slice_in_dim(cached_value.value, value, index, axis=1)
        cache_index.value = index + 1
        length = cached_key.value.shape[1]
        step_mask = (jnp.arange(length) <= index)[None, None, None, :]
        if mask is not None:
            step_mask = jnp.logical_and(step_mask, _query_row(mask, index))
        if bias is not None:
            bias = _query_row(bias, index)
        return cached_key.value, cached_value.value, step_mask, bias


def _query_row(x, index):
    """`[B, H, Lq, Lk]` -> `[B, H, 1, Lk]` at query `index` (passes through an already single row)."""
    if x.shape[2] == 1:
        return x
    return jax.lax.dynamic_slice_in_dim(x, index, 1, axis=2)
