"""Multi-head dot-product attention, one core for T5 and ViT, with an autoregressive decode cache.

`dot_product_attention` is the core: `jax.nn.dot_product_attention(query, key, value, bias, mask, scale)`
(logits, bias and softmax in float32 whatever the activation dtype), so XLA sees one attention op and an
NVIDIA GPU can run cuDNN's fused kernel. In jax 0.10 `implementation=None` still means XLA's unfused
code; `implementation="auto"` here asks for cuDNN where the call is inside cuDNN's supported subset
(see `_cudnn_fits`) and XLA otherwise. The one exception is dropout on the attention probabilities
(training with `dropout_rate > 0`), which the fused call cannot do: only then the core runs an explicit
einsum-softmax-einsum with the same float32 logits.

`MultiHeadAttention` is T5's flavour by default (no projection biases, logits unscaled: T5 folds
1/sqrt(kv) into the query initialisation) and ViT's with `use_bias=True, scale_logits=True` (Hugging
Face's biases and 1/sqrt(head_dim) scaling).

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


IMPLEMENTATIONS = ("auto", "xla", "cudnn")


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                          bias: jax.Array | None = None, mask: jax.Array | None = None, *,
                          scale: float = 1.0, dropout_rate: float = 0.0,
                          dropout_rng: jax.Array | None = None,
                          implementation: str = "auto") -> jax.Array:
    """`query [B, Lq, H, D]`, `key`/`value` `[B, Lk, H, D]` (one dtype) -> `[B, Lq, H, D]`.

    `softmax(scale * q.k + bias, masked) . v` per head. `bias` (float, any dtype) and `mask` (truthy,
    True = attend) are 4-D and broadcast to `[B, H, Lq, Lk]`. Logits and softmax are float32; the
    probabilities are cast to the value dtype before the second product. A row whose keys are all masked
    attends uniformly over them (every logit gets the same large negative value).

    `dropout_rng` with `dropout_rate > 0` drops attention probabilities (rescaling the kept ones), on the
    explicit path; otherwise this is one `jax.nn.dot_product_attention` call whose `implementation` is
    chosen by `implementation`: "xla", "cudnn" (fails where cuDNN cannot run it), or "auto" (cuDNN on an
    NVIDIA GPU backend when `_cudnn_fits`, else XLA; decided when tracing).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; "
                         f"known: {IMPLEMENTATIONS}")
    if mask is not None:
        mask = jnp.asarray(mask, bool)
    if dropout_rng is not None and dropout_rate > 0.0:
        return _attention_with_dropout(query, key, value, bias, mask, scale, dropout_rate, dropout_rng)
    if implementation == "cudnn" or (implementation == "auto" and _cudnn_fits(query, key, bias, mask)):
        # cuDNN adds the bias (and the mask, turned into a bias) in the activation dtype.
        cudnn_bias = None if bias is None else jnp.asarray(bias, query.dtype)
        try:
            return jax.nn.dot_product_attention(query, key, value, bias=cudnn_bias, mask=mask,
                                                scale=scale, implementation="cudnn")
        except (NotImplementedError, ValueError, RuntimeError):
            if implementation == "cudnn":
                raise  # asked for explicitly; "auto" falls back to XLA below
    if bias is not None:
        bias = jnp.asarray(bias, jnp.float32)
    return jax.nn.dot_product_attention(query, key, value, bias=bias, mask=mask, scale=scale,
                                        implementation="xla")


def _attention_with_dropout(query, key, value, bias, mask, scale, rate, rng):
    """The same arithmetic as XLA's `jax.nn.dot_product_attention`, with dropout on the probabilities."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32)
    if scale != 1.0:
        logits = logits * jnp.float32(scale)
    if bias is not None:
        logits = logits + jnp.asarray(bias, jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, NEG_INF)
    weights = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
    keep = jax.random.bernoulli(rng, 1.0 - rate, weights.shape)
    weights = weights * keep.astype(weights.dtype) / jnp.asarray(1.0 - rate, weights.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, value)


def _cudnn_fits(query, key, bias, mask) -> bool:
    """Whether "auto" should ask for cuDNN's fused attention: the default backend is CUDA, the
    activations are bf16/fp16, the head dimension is a multiple of 8 up to 128, any bias or mask spans
    the full `[Lq, Lk]` (cuDNN does not broadcast over those), and with a bias or mask both lengths are
    even (cuDNN's backward pass requires it; one-token decode steps therefore stay on XLA). Shape or
    version limits that slip through fail when tracing and fall back to XLA."""
    if query.dtype not in (jnp.bfloat16, jnp.float16) or not _cuda_backend():
        return False
    head_dim, lq, lk = query.shape[-1], query.shape[1], key.shape[1]
    if head_dim % 8 or head_dim > 128:
        return False
    extras = [x for x in (bias, mask) if x is not None]
    if extras and (lq % 2 or lk % 2):
        return False
    return all(x.ndim == 4 and x.shape[-2:] == (lq, lk) for x in extras)


def _cuda_backend() -> bool:
    """Whether JAX's default backend is an NVIDIA GPU (cuDNN exists only there)."""
    if jax.default_backend() != "gpu":
        return False
    return "cuda" in jax.devices()[0].client.platform_version.lower()


class MultiHeadAttention(nn.Module):
    """`__call__(inputs_q [B, Lq, E], inputs_kv [B, Lk, E], mask [B, 1, Lq, Lk], bias [B|1, H, Lq, Lk])`
    -> `[B, Lq, E]`.

    T5 by default; ViT with `use_bias=True` (biases on the four projections) and `scale_logits=True`
    (logits times `1/sqrt(head_dim)`, and the query initialised without T5's folded scale).
    `implementation` picks the kernel of `dot_product_attention` ("auto", "xla" or "cudnn").

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
    use_bias: bool = False
    scale_logits: bool = False
    implementation: str = "auto"

    def _projection(self, name, init):
        return DenseGeneral(
            features=(self.num_heads, self.head_dim), kernel_axes=("embed", "joined_kv"),
            dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=init, use_bias=self.use_bias,
            name=name)

    @nn.compact
    def __call__(self, inputs_q, inputs_kv, mask=None, bias=None, *, enable_dropout=False,
                 decode=False, max_decode_length=None):
        # T5 leaves logits unscaled; the 1/sqrt(kv) lives in the query initialisation (Adafactor-equivalent).
        def query_init(key, shape, dtype):
            return self.kernel_init(key, shape, dtype) / jnp.sqrt(self.head_dim).astype(dtype)

        project_q = self._projection("query", self.kernel_init if self.scale_logits else query_init)
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

        dropout = enable_dropout and self.dropout_rate > 0.0
        out = dot_product_attention(
            query, key, value, bias, mask, scale=self.head_dim ** -0.5 if self.scale_logits else 1.0,
            dropout_rate=self.dropout_rate, dropout_rng=self.make_rng("dropout") if dropout else None,
            implementation=self.implementation)
        out = partitioning.with_sharding_constraint(out, kv_axes)
        return DenseGeneral(
            features=inputs_q.shape[-1], axis=(-2, -1), kernel_axes=("joined_kv", "embed"),
            dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init,
            use_bias=self.use_bias, name="out")(out)

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
