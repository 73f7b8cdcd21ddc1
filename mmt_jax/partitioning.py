"""Mesh construction and logical-axis sharding (the Partitioner of t5x's separation).

Sharding is configuration: modules name the logical axes of every parameter (`params_axes`) and
activation (`with_sharding_constraint`); the rules below map logical names to the mesh axes
`data`, `expert`, `model`. The batch is split over (`expert`, `data`) as in t5x's MoE partitioner, so
the expert axis also does data parallelism for dense layers.
"""
import contextlib
from typing import Sequence

import jax
import numpy as np
from flax import core as flax_core
from flax import linen as nn
from flax.linen import partitioning as flax_partitioning
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "expert", "model")
LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]


def standard_logical_axis_rules(activation_partitioning_dims: int = 1,
                                parameter_partitioning_dims: int = 1) -> tuple:
    """t5x's standard rules plus the MoE names. 1-D: weights split over `model` (Megatron style);
    2-D activations also split `embed` over `model`; 2-D parameters also split `embed` over `data`."""
    rules = [
        ("batch", ("expert", "data")),
        ("vocab", "model"),
        ("mlp", "model"),
        ("heads", "model"),
        ("joined_kv", "model"),
        ("expert", "expert"),
        ("expert_mlp", "model"),
        ("expert_replicas", "data"),
    ]
    if activation_partitioning_dims == 2:
        rules.append(("embed", "model"))
    if parameter_partitioning_dims == 2:
        rules.append(("embed", "data"))
    rules += [(name, None) for name in (
        "embed", "kv", "length", "relpos_buckets", "abspos_buckets", "layers", "stack",
        "mlp_activations", "unmodeled", "image_features", "segments", "contrastive", "sources",
        "alignment", "image_vectors",
        "conv_height", "conv_width", "conv_in", "conv_out")]
    return tuple(rules)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices=None) -> Mesh:
    """A mesh over (`data`, `expert`, `model`); one `-1` takes the remaining devices."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    shape = list(shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape {tuple(shape)} must have one size per axis {MESH_AXES}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {tuple(shape)}: at most one -1")
    if -1 in shape:
        known = int(np.prod([s for s in shape if s != -1]))
        if devices.size % known:
            raise ValueError(f"mesh shape {tuple(shape)} does not divide {devices.size} devices")
        shape[shape.index(-1)] = devices.size // known
    if int(np.prod(shape)) != devices.size:
        raise ValueError(f"mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices, "
                         f"{devices.size} are available")
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices.reshape(-1).tolist())


class Partitioner:
    """Binds a mesh and logical axis rules; turns logical axes into shardings and jits functions."""

    def __init__(self, mesh_shape: Sequence[int] = (-1, 1, 1), logical_axis_rules: LogicalRules = None,
                 devices=None):
        self.mesh = make_mesh(mesh_shape, devices)
        self.rules = tuple(logical_axis_rules or standard_logical_axis_rules())

    @contextlib.contextmanager
    def context(self):
        """Mesh + rules in scope, so the modules' logical sharding constraints resolve."""
        with jax.set_mesh(self.mesh), flax_partitioning.axis_rules(self.rules):
            yield

    @property
    def data_partition_spec(self) -> PartitionSpec:
        return nn.logical_to_mesh_axes(("batch",), self.rules)

    def data_sharding(self, ndim: int = 1) -> NamedSharding:
        """Sharding of a batch array: leading axis over the batch axes, the rest replicated."""
        spec = tuple(self.data_partition_spec) + (None,) * (ndim - 1)
        return NamedSharding(self.mesh, PartitionSpec(*spec))

    def batch_shardings(self, batch) -> dict:
        return jax.tree_util.tree_map(lambda x: self.data_sharding(np.ndim(x)), batch)

    def logical_shardings(self, logical_specs):
        """A tree of logical `PartitionSpec`s -> the same tree of `NamedSharding`s."""
        return nn.logical_to_mesh_sharding(logical_specs, self.mesh, self.rules)

    def params_shardings(self, params_axes):
        """Shardings of `params` from the `params_axes` collection that `param_with_axes` wrote."""
        names = flax_core.unfreeze(flax_partitioning.get_axis_names(params_axes))
        return self.logical_shardings(names)

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def shard_batch(self, batch):
        """Places a host-global batch on the mesh (single process)."""
        return jax.device_put(batch, self.batch_shardings(batch))

    def partition(self, fn, in_shardings, out_shardings, donate_argnums=()):
        """`jax.jit` with explicit shardings, called with mesh and rules in scope."""
        jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                         donate_argnums=donate_argnums)

        def run(*args, **kwargs):
            with self.context():
                return jitted(*args, **kwargs)

        return run
