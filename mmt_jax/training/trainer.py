"""The Trainer: a Model, a Partitioner and an optimizer -> a sharded train state and compiled steps.

Shapes come first: `jax.eval_shape` of the model's initial variables gives the parameters, their
logical axes (`params_axes`) and hence their shardings; the optimizer state follows its parameters.
The train step is jit-compiled once with explicit in/out shardings for the state and the batch and
donates the old state, so a step runs unchanged on 1 CPU device, 8 host devices or a pod slice.
"""
import collections
from typing import Mapping

import jax
import numpy as np
import optax

from mmt_jax.checkpoints import store
from mmt_jax.errors import TrainingError
from mmt_jax.partitioning import Partitioner
from mmt_jax.training.train_state import TrainState, train_step


class Trainer:
    """Args:
      model: a Model of `mmt_jax.model` (`model_for(module)`: dense or MoE).
      partitioner: the mesh and logical axis rules.
      optimizer: an optax transformation (see `training/optimizers.py`).
      input_shapes, input_types: the global batch's arrays (name -> shape / dtype).
      num_microbatches: gradient accumulation (`train_state.train_step`).
    """

    def __init__(self, model, partitioner: Partitioner, optimizer: optax.GradientTransformation,
                 input_shapes: Mapping[str, tuple], input_types: Mapping[str, np.dtype],
                 num_microbatches: int = 1):
        self.model, self.partitioner = model, partitioner
        self.input_shapes, self.input_types = dict(input_shapes), dict(input_types)
        batch_size = next(iter(input_shapes.values()))[0]
        data_shards = int(np.prod([partitioner.mesh.shape[a] for a in
                                   _axes(partitioner.data_partition_spec)]))
        if batch_size % data_shards:
            raise TrainingError(f"the global batch of {batch_size} does not divide over the "
                             f"{data_shards} data-parallel shards of mesh {dict(partitioner.mesh.shape)}"
                             f" (batch is split over {partitioner.data_partition_spec})")
        if batch_size % (num_microbatches * data_shards):
            raise TrainingError(f"batch {batch_size} / num_microbatches {num_microbatches} does not "
                             f"divide over {data_shards} data-parallel shards")

        def init_variables(key):
            return model.get_initial_variables(key, self.input_shapes, self.input_types)

        with partitioner.context():
            variables = jax.eval_shape(init_variables, jax.random.key(0))
        self.params_shardings = partitioner.params_shardings(variables["params_axes"])
        self.abstract_state = jax.eval_shape(lambda p: TrainState.create(p, optimizer),
                                             variables["params"])
        self.state_shardings = self.abstract_state.shardings(self.params_shardings,
                                                             partitioner.replicated())
        self.batch_shardings = {k: partitioner.data_sharding(len(s)) for k, s in input_shapes.items()}
        self._init_params = partitioner.partition(lambda key: init_variables(key)["params"], None,
                                                  self.params_shardings)
        self._create = partitioner.partition(lambda p: TrainState.create(p, optimizer),
                                             (self.params_shardings,), self.state_shardings)
        self._train = partitioner.partition(
            lambda s, b, r: train_step(model, s, b, r, num_microbatches),
            (self.state_shardings, self.batch_shardings, partitioner.replicated()),
            (self.state_shardings, None), donate_argnums=(0,))
        self._eval = partitioner.partition(lambda p, b: model.eval_fn(p, b)[1],
                                           (self.params_shardings, self.batch_shardings), None)
        self._merge = jax.jit(lambda a, b: {k: a[k].merge(v) for k, v in b.items()})
        # XLA:CPU runs at most 32 programs per device at once, and launches a program's part on
        # each device from a pool with one thread per device; a part waiting for its device's
        # turn holds its thread. A host 32 programs ahead of the devices can so leave a collective
        # without threads for all its participants: the process hangs until XLA aborts it (seen
        # with 8 host devices, a contrastive run logging every 50 steps, 2 loaded cores). On a
        # CPU mesh of several devices the host therefore stays at most 2 steps ahead; elsewhere
        # collectives do not wait on host threads, and nothing holds the host back.
        self._in_flight = StepsInFlight(
            2 if partitioner.mesh.devices.flat[0].platform == "cpu" and partitioner.mesh.size > 1
            else None)

    def initial_state(self, seed: int, initial_checkpoint: str | None = None
                      ) -> tuple[TrainState, list, list]:
        """A fresh state; with `initial_checkpoint` (an mmt_jax checkpoint directory) its parameters
        replace the fresh ones wherever the path and shape match, and a dense checkpoint's MLPs
        start every expert of an MoE model, and its encoder MoEMoE's question and text encoders
        (`checkpoints.initialize_from`). Returns `(state, fresh_paths, derived_paths)`."""
        params = self._init_params(jax.random.key(seed))
        fresh_paths, derived = [], []
        if initial_checkpoint:
            _, pretrained = store.load_checkpoint(initial_checkpoint)
            merged, fresh_paths, derived = store.initialize_from(jax.device_get(params),
                                                                 pretrained)
            params = jax.device_put(merged, self.params_shardings)
        return self._create(params), fresh_paths, derived

    def train_step(self, state: TrainState, batch, dropout_rng) -> tuple[TrainState, dict]:
        state, metrics = self._train(state, batch, dropout_rng)
        self._in_flight.add(metrics)
        return state, metrics

    def eval_step(self, params, batch) -> dict:
        metrics = self._eval(params, batch)
        self._in_flight.add(metrics)
        return metrics

    def merge_metrics(self, merged: dict | None, metrics: dict) -> dict:
        """A step's clu metrics merged into those of the steps before (None: none yet), in one
        program: clu's own `merge` runs two per metric."""
        return metrics if merged is None else self._merge(merged, metrics)

    def global_batch(self, local_batch: Mapping[str, np.ndarray]) -> dict:
        """This process's rows of the batch -> global arrays on the mesh (every process calls it)."""
        return {k: jax.make_array_from_process_local_data(self.batch_shardings[k], np.asarray(v))
                for k, v in local_batch.items()}


class StepsInFlight:
    """Keeps the host at most `limit` steps ahead of the devices: `add(outputs)`, after each step
    is dispatched, waits for the oldest step's outputs while more than `limit` are unfinished.
    `limit=None`: never waits."""

    def __init__(self, limit: int | None):
        self.limit, self._unfinished = limit, collections.deque()

    def add(self, outputs) -> None:
        if self.limit is None:
            return
        self._unfinished.append(outputs)
        while len(self._unfinished) > self.limit:
            jax.block_until_ready(self._unfinished.popleft())


def _axes(spec) -> list[str]:
    axes = []
    for entry in spec:
        if entry is None:
            continue
        axes += list(entry) if isinstance(entry, tuple) else [entry]
    return axes
