"""T5 feed-forward block: `wo(act_0(x W_0) * act_1(x W_1) * ...)`.

One activation (`("relu",)`, original T5) gives a single `wi` kernel; several give gated units
`wi_0, wi_1, ...` (T5.1.1's `("gelu", "linear")` is GEGLU, Shazeer 2020).
"""
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import partitioning

from mmt_jax.layers.dense import DenseGeneral, default_kernel_init

ACTIVATIONS = {
    "relu": jax.nn.relu,
    # tanh approximation, as t5x's `gelu` and Hugging Face's `gelu_new` for T5.1.1.
    "gelu": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
    "linear": lambda x: x,
}


class MlpBlock(nn.Module):
    """`[B, L, embed]` -> `[B, L, embed]` through a hidden `[B, L, mlp]`.

    `activation_axes` names the two leading activation dimensions for the sharding constraints:
    ("batch", "length") here; an MoE expert, vmapped over the `expert` mesh axis, sees its
    `[groups, capacity]` slots as ("expert_replicas", "unmodeled").
    """

    intermediate_dim: int
    activations: Sequence[str] = ("gelu", "linear")
    dropout_rate: float = 0.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = default_kernel_init
    activation_axes: tuple[str, str] = ("batch", "length")

    @nn.compact
    def __call__(self, inputs, enable_dropout=False):  # positional too: MoE experts vmap it
        unknown = set(self.activations) - set(ACTIVATIONS)
        if unknown:
            raise ValueError(f"unknown activation(s) {sorted(unknown)}; known: {sorted(ACTIVATIONS)}")
        hidden = None
        for i, name in enumerate(self.activations):
            layer_name = "wi" if len(self.activations) == 1 else f"wi_{i}"
            h = DenseGeneral(self.intermediate_dim, kernel_axes=("embed", "mlp"), dtype=self.dtype,
                             param_dtype=self.param_dtype, kernel_init=self.kernel_init,
                             name=layer_name)(inputs)
            h = ACTIVATIONS[name](h)
            hidden = h if hidden is None else hidden * h
        hidden = partitioning.with_sharding_constraint(hidden, (*self.activation_axes, "mlp"))
        hidden = nn.Dropout(self.dropout_rate, broadcast_dims=(-2,))(
            hidden, deterministic=not enable_dropout)
        out = DenseGeneral(inputs.shape[-1], kernel_axes=("mlp", "embed"), dtype=self.dtype,
                           param_dtype=self.param_dtype, kernel_init=self.kernel_init,
                           name="wo")(hidden)
        return partitioning.with_sharding_constraint(out, (*self.activation_axes, "embed"))
