"""Train state and the train step: parameters, optimizer state and step count; one optax update."""
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


class TrainState(struct.PyTreeNode):
    step: jax.Array
    params: Any
    opt_state: Any
    tx: optax.GradientTransformation = struct.field(pytree_node=False)

    @classmethod
    def create(cls, params, tx: optax.GradientTransformation) -> "TrainState":
        return cls(step=jnp.array(0, jnp.int32), params=params, opt_state=tx.init(params), tx=tx)

    def shardings(self, params_shardings, replicated):
        """The same tree with shardings: optimizer slots shaped like a parameter follow it, scalars
        (step, counts) are replicated. `self` may hold shapes only (`jax.eval_shape`)."""
        opt_state = optax.tree_map_params(
            self.tx, lambda _, sharding: sharding, self.opt_state, params_shardings,
            transform_non_params=lambda _: replicated)
        return self.replace(step=replicated, params=params_shardings, opt_state=opt_state)


def train_step(model, state: TrainState, batch, dropout_rng):
    """One gradient step of `model.loss_fn`; returns `(new_state, metrics)`.

    The dropout rng is folded with the step so that a resumed run draws the same masks.
    """
    rng = jax.random.fold_in(dropout_rng, state.step) if dropout_rng is not None else None
    (_, metrics), grads = jax.value_and_grad(model.loss_fn, has_aux=True)(state.params, batch, rng)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics
