"""Int8 inference: dense kernels stored as int8 with one float32 scale per output channel.

`quantize_params(params)` replaces every 2-D kernel `W [in, out]` (the `DenseGeneral` ones) by

    kernel        int8    [in, out]   round(W / s), s = max_i |W[i, :]| / 127 (symmetric, per column)
    kernel_scale  float32 [out]       s

and `DenseGeneral` then computes `x @ W` as an int8 x int8 matmul accumulated in int32: each row of
`x` is quantised with its own scale `r = max |x_row| / 127` at run time ("dynamic" activation
quantisation), so `x @ W ~ (round(x / r) @ kernel) * r * s`. Activations are quantised too because
XLA:CPU does not fuse an int8 -> float conversion into its matmul: weight-only int8 materialises a
float32 copy of the kernel at every call and is slower than float32 (README, "Int8 decoding":
one matmul measured both ways). Embedding tables, layer norms, convolutions (4-D), the relative position
biases, and the 3-D kernels of scanned layer stacks and of MoE experts keep their dtype.

For decoding only (no gradients through `round`); `Predictor(..., int8=True)` and
`mmt-jax infer --int8` apply it to a checkpoint's parameters as they are loaded.
"""
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

SCALE = "kernel_scale"


def _symmetric_int8(x, axis: int, xp=np):
    """float32 `x` -> (int8 `round(x / s)`, float32 `s`), `s = max |x| / 127` along `axis` (kept as
    a size-1 axis); a slice of zeros gets `s = 1`. `xp`: numpy (on the host) or jax.numpy."""
    scale = xp.max(xp.abs(x), axis=axis, keepdims=True) / 127.0
    scale = xp.where(scale > 0, scale, 1.0).astype(xp.float32)
    return xp.clip(xp.round(x / scale), -127, 127).astype(xp.int8), scale


def quantize_kernel(kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`kernel [in, out]` -> (int8 `[in, out]`, float32 scales `[out]`), symmetric per output
    channel; an all-zero column gets scale 1 (its int8 values are 0)."""
    values, scale = _symmetric_int8(np.asarray(kernel, np.float32), axis=0)
    return values, scale[0]


def quantize_params(params: Any) -> dict:
    """A copy of `params` with every 2-D `kernel` as int8 plus its `kernel_scale` beside it."""
    flat = traverse_util.flatten_dict(jax.device_get(params))
    out = {}
    for path, value in flat.items():
        if path[-1] == "kernel" and np.ndim(value) == 2:
            out[path], out[path[:-1] + (SCALE,)] = quantize_kernel(value)
        else:
            out[path] = value
    return traverse_util.unflatten_dict(out)


def int8_matmul(inputs: jax.Array, kernel: jax.Array, scale: jax.Array,
                dtype: jnp.dtype) -> jax.Array:
    """`inputs [rows, in] @ dequantised kernel` -> `[rows, out]` in `dtype`: the rows quantised on
    the fly, int8 x int8 accumulated in int32, both scales applied to the result."""
    x8, row_scale = _symmetric_int8(jnp.asarray(inputs, jnp.float32), axis=-1, xp=jnp)
    acc = jax.lax.dot(x8, kernel, preferred_element_type=jnp.int32)
    return (acc.astype(jnp.float32) * row_scale * scale).astype(dtype)
