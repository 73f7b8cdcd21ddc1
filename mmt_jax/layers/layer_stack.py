"""A stack of layers, unrolled or scanned, each optionally rematerialised: flaxformer's `scan_layers`
and `LayerRemat` as configuration (`T5Config.scan_layers`, `T5Config.remat_policy`).

Parameter names. Unrolled, layer i's parameters are `layers_{i}/...` (t5x's names, what every
converter reads and writes). Scanned, the stack is one `jax.lax.scan` over a single layer and its
parameters are one subtree `layers/...` whose arrays carry a leading layer axis (logical axis
`layers`, replicated by the standard rules):

    layers_{i}/attention/query/kernel [embed, joined_kv]
        <->  layers/attention/query/kernel [num_layers, embed, joined_kv],  row i is layer i

`scanned(tree)` and `unscanned(tree)` convert either way; `checkpoints.initialize_from` uses them so
a converted (unrolled) Hugging Face or t5x checkpoint starts a scanned model, and the HF export
unrolls before writing. Whatever a scanned layer sows (`intermediates`: the MoE statistics) or keeps
for decoding (`cache`) is stacked the same way, `[num_layers, batch, ...]`; decoding.py finds the
batch axis of such a leaf by the subtree name `SCANNED`.

Why scan: compile time stays flat as layers grow (XLA compiles one layer, not N), and the backward
pass keeps one stacked residual per saved tensor. Every layer of a scanned stack is the same module,
so an MoE placement must be "all" or "none" for that stack. optax's Adafactor measures its parameter
scale over the whole array, so with scan on it sees all layers' weights at once (AdamW, the default,
is unaffected).

Remat policies (what the forward pass keeps for the backward pass, per layer):
    none     everything: no recomputation, most memory
    minimal  the outputs of matmuls without batch dimensions (the projections, XLA's costliest ops);
             norms, activations and attention weights are recomputed
             (`jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims`)
    full     nothing but the layer's input: the whole layer runs again in the backward pass
"""
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import linen as nn
from flax.linen import partitioning

SCANNED = "layers"
REMAT_POLICIES = {
    "none": None,
    "minimal": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "full": jax.checkpoint_policies.nothing_saveable,
}
# Collections stacked along the layer axis of a scanned stack; rng streams split per layer.
_STACKED = {"params": 0, "intermediates": 0, "cache": 0}
_SPLIT_RNGS = {"params": True, "dropout": True, "router_noise": True}
_UNROLLED = re.compile(r"layers_(\d+)")


def check_remat_policy(policy: str) -> None:
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat policy {policy!r}; choose from {sorted(REMAT_POLICIES)}")


def _carrying(layer_cls: type[nn.Module]) -> type[nn.Module]:
    """`layer_cls` with scan's body signature: `(carry, *args) -> (layer(carry, *args), None)`."""
    class Carrying(layer_cls):
        @nn.compact
        def __call__(self, carry, *args):
            return super().__call__(carry, *args), None

    Carrying.__name__ = Carrying.__qualname__ = layer_cls.__name__
    return Carrying


def apply_stack(layer_cls: type[nn.Module], layer_fields: Sequence[dict[str, Any]], x,
                arrays: tuple, static: tuple, *, scan: bool, remat_policy: str):
    """Runs `x` through one layer per entry of `layer_fields`: layer i is `layer_cls(**fields_i)`
    called as `layer(x, *arrays, *static)` and returns the new `x` (same shape).

    arrays: arguments every layer shares (masks, the relative position bias; None allowed);
    static: trailing Python values every layer shares (flags such as `enable_dropout`), kept out of
    tracing by remat and scan. Call it inside the owning module's compact method.
    """
    check_remat_policy(remat_policy)
    cls = layer_cls if not scan else _carrying(layer_cls)
    if remat_policy != "none":
        first_static = 2 + len(arrays)  # argument 0 is the module, 1 is x
        cls = nn.remat(cls, policy=REMAT_POLICIES[remat_policy], prevent_cse=not scan,
                       static_argnums=tuple(range(first_static, first_static + len(static))))
    if not scan:
        for i, fields in enumerate(layer_fields):
            x = cls(**fields, name=f"layers_{i}")(x, *arrays, *static)
        return x
    if any(fields != layer_fields[0] for fields in layer_fields):
        raise ValueError("a scanned stack needs identical layers; this one's differ (an MoE "
                         "placement other than 'all' or 'none'?)")
    stack = partitioning.scan_with_axes(
        cls, variable_axes=_STACKED, split_rngs=_SPLIT_RNGS,
        in_axes=(nn.broadcast,) * (len(arrays) + len(static)), length=len(layer_fields),
        axis_name=SCANNED)
    x, _ = stack(**layer_fields[0], name=SCANNED)(x, *arrays, *static)
    return x


def unscanned(tree):
    """Every scanned stack `layers/X [n, ...]` of a nested dict split into `layers_{i}/X [...]`;
    trees without one come back unchanged."""
    if not isinstance(tree, Mapping):
        return tree
    out = {}
    for key, value in tree.items():
        if key == SCANNED and isinstance(value, Mapping):
            leaves = jax.tree_util.tree_leaves(value)
            for i in range(np.shape(leaves[0])[0]):
                out[f"layers_{i}"] = jax.tree_util.tree_map(lambda a, i=i: a[i], value)
        else:
            out[key] = unscanned(value)
    return out


def scanned(tree, like):
    """`tree` with each run `layers_0 .. layers_{n-1}` stacked into `layers/X [n, ...]` wherever
    `like` (a tree of the same model, e.g. its fresh initialisation) has a scanned stack; the
    inverse of `unscanned`."""
    if not isinstance(tree, Mapping) or not isinstance(like, Mapping):
        return tree
    out = {key: scanned(value, like.get(key)) for key, value in tree.items()
           if not _UNROLLED.fullmatch(key)}
    numbered = sorted((int(_UNROLLED.fullmatch(k).group(1)), k) for k in tree if _UNROLLED.fullmatch(k))
    if SCANNED in like and numbered:
        if [i for i, _ in numbered] != list(range(len(numbered))):
            raise ValueError(f"layers {[k for _, k in numbered]} are not numbered 0..n-1")
        out[SCANNED] = jax.tree_util.tree_map(lambda *layers: np.stack(layers),
                                              *(tree[k] for _, k in numbered))
    else:
        out.update({k: scanned(tree[k], like.get(k)) for _, k in numbered})
    return out
