"""Parameterised building blocks: dense projections, layer norms (centred, RMS), token embeddings.

Every parameter is created with `param_with_axes`, so the `params_axes` collection names its logical axes
(t5x's contract), and kernels are stored 2-D exactly as in a t5x T5.1.1 checkpoint: a projection to
`heads x kv` keeps a joined `[embed, heads*kv]` kernel that is reshaped when used.
"""
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.linen import partitioning

from mmt_jax import quantization

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]
default_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


def _normalize_axes(axes, ndim):
    return tuple(ax if ax >= 0 else ndim + ax for ax in axes)


class DenseGeneral(nn.Module):
    """A linear map contracting `axis` of the input onto `features`; bias-free unless `use_bias`.

    inputs `[..., *contracted]` -> `[..., *features]`; the kernel is stored as
    `[prod(contracted), prod(features)]` with logical axes `kernel_axes` (one name per stored dimension).
    With `use_bias` (ViT; T5 has none) a zero-initialised `bias` is stored as `[prod(features)]` with
    logical axis `kernel_axes[-1]`, the layout of a Hugging Face `Linear.bias`. Parameters from
    `quantization.quantize_params` (an int8 kernel with its `kernel_scale`) are applied as an int8
    matmul (`quantization.int8_matmul`).
    """

    features: int | Sequence[int]
    kernel_axes: tuple[str, str]
    axis: int | Sequence[int] = -1
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    kernel_init: Initializer = default_kernel_init
    use_bias: bool = False

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        axis = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
        axis = _normalize_axes(axis, inputs.ndim)
        contracted = tuple(inputs.shape[ax] for ax in axis)
        stored_shape = (int(np.prod(contracted)), int(np.prod(features)))

        def init(key, shape, dtype):
            # Initialise with the unflattened shape so that fan-in counts only contracted dimensions.
            full = self.kernel_init(key, contracted + features, dtype)
            return jnp.reshape(full, shape)

        kernel = partitioning.param_with_axes(
            "kernel", init, stored_shape, self.param_dtype, axes=self.kernel_axes)
        quantized = self.has_variable("params", quantization.SCALE)
        kernel = kernel if quantized else jnp.asarray(kernel, self.dtype)
        inputs = jnp.asarray(inputs, self.dtype)
        trailing = axis == tuple(range(inputs.ndim - len(axis), inputs.ndim))
        if quantized or trailing:
            # Trailing contraction as one 2-D matmul `[rows, in] @ [in, out]`: XLA:CPU then needs no
            # transposed copies of the activations for the weight gradient (measured in bench/: the
            # small T5 train step went from 4.4 s to 3.4 s).
            inputs = inputs if trailing else jnp.moveaxis(
                inputs, axis, tuple(range(inputs.ndim - len(axis), inputs.ndim)))
            leading = inputs.shape[:inputs.ndim - len(axis)]
            rows = jnp.reshape(inputs, (-1, stored_shape[0]))
            out = (quantization.int8_matmul(rows, kernel, self.get_variable(
                "params", quantization.SCALE), self.dtype) if quantized else rows @ kernel)
            out = jnp.reshape(out, leading + features)
        else:
            out = jax.lax.dot_general(inputs, kernel.reshape(contracted + features),
                                      ((axis, tuple(range(len(axis)))), ((), ())))
        if self.use_bias:
            bias = partitioning.param_with_axes(
                "bias", nn.initializers.zeros, (stored_shape[1],), self.param_dtype,
                axes=(self.kernel_axes[-1],))
            out = out + jnp.asarray(bias, self.dtype).reshape(features)
        return out


class Embed(nn.Module):
    """Token embedding table `[vocab, embed]`; `attend` gives logits against the same table (tied heads).

    `axes` names the table's logical axes: ("vocab", "embed") for words (the vocabulary split over
    `model`); a small table such as MMT4's two segment embeddings names its rows otherwise
    ("segments", replicated), as 2 rows cannot be split over a larger model axis.
    """

    num_embeddings: int
    features: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    embedding_init: Initializer = nn.initializers.normal(stddev=1.0)
    axes: tuple[str, str] = ("vocab", "embed")

    def setup(self):
        self.embedding = partitioning.param_with_axes(
            "embedding", self.embedding_init, (self.num_embeddings, self.features), self.param_dtype,
            axes=self.axes)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens `[...]` (any integer or float dtype) -> `[..., embed]`."""
        tokens = jnp.asarray(tokens, jnp.int32)
        return jnp.take(jnp.asarray(self.embedding, self.dtype), tokens, axis=0)

    def attend(self, query: jax.Array) -> jax.Array:
        """query `[..., embed]` -> logits `[..., vocab]`."""
        return jnp.einsum("...e,ve->...v", jnp.asarray(query, self.dtype),
                          jnp.asarray(self.embedding, self.dtype))


class LayerNorm(nn.Module):
    """Layer norm over the last axis, computed in float32 whatever the activation dtype.

    `center=True`: `scale * (x - mean) / std + bias` (MMT4's projection norm, ViT).
    `center=False`: `scale * x / rms(x)`, no mean and no bias (T5's norm; see `RMSNorm`).
    """

    epsilon: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    center: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = jnp.asarray(x, jnp.float32)
        if self.center:
            x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
        features = (x.shape[-1],)
        y = y * partitioning.param_with_axes("scale", nn.initializers.ones, features,
                                             self.param_dtype, axes=("embed",))
        if self.center:
            y = y + partitioning.param_with_axes("bias", nn.initializers.zeros, features,
                                                 self.param_dtype, axes=("embed",))
        return jnp.asarray(y, self.dtype)


class RMSNorm(LayerNorm):
    """T5's layer norm (as Hugging Face and t5x compute it): no mean subtraction, no bias."""

    center: bool = False
