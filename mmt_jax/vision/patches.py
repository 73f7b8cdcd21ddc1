"""MMT4's simplest representator (Fig. 4.1): non-overlapping `p x p` patches, flattened."""
import jax
import jax.numpy as jnp


def image_patches(images: jax.Array, patch_size: int) -> jax.Array:
    """`[B, H, W, C]` -> `[B, (H/p) * (W/p), p * p * C]`, patches in row-major order, each flattened
    row by row with channels last (the layout of a `p x p x C` patch)."""
    b, h, w, c = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    x = jnp.reshape(images, (b, h // p, p, w // p, p, c))
    x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))  # [B, rows, cols, p, p, C]
    return jnp.reshape(x, (b, (h // p) * (w // p), p * p * c))
