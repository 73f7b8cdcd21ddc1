"""Train state and the train step: parameters, optimizer state and step count; one optax update."""
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from mmt_jax.losses import NUM_REAL_TARGET_TOKENS


class TrainState(struct.PyTreeNode):
    step: jax.Array
    params: Any
    opt_state: Any
    tx: optax.GradientTransformation = struct.field(pytree_node=False)

    @classmethod
    def create(cls, params, tx: optax.GradientTransformation) -> "TrainState":
        return cls(step=jnp.array(0, jnp.int32), params=params, opt_state=tx.init(params), tx=tx)

    def shardings(self, params_shardings, replicated):
        """The same tree with shardings: an optimizer slot whose tree path ends in a parameter's
        path and has its shape (Adam's moments, also under `multi_transform` masks) follows that
        parameter; everything else (step, counts, factored Adafactor rows) is replicated. `self` may
        hold shapes only (`jax.eval_shape`)."""
        params = {_keys(path): (leaf.shape, sharding) for (path, leaf), sharding in zip(
            jax.tree_util.tree_leaves_with_path(self.params),
            jax.tree_util.tree_leaves(params_shardings))}
        depths = sorted({len(path) for path in params})

        def slot_sharding(path, leaf):
            keys = _keys(path)
            for depth in depths:
                shape, sharding = params.get(keys[-depth:], (None, None))
                if shape is not None and shape == getattr(leaf, "shape", None):
                    return sharding
            return replicated

        opt_state = jax.tree_util.tree_map_with_path(slot_sharding, self.opt_state)
        return self.replace(step=replicated, params=params_shardings, opt_state=opt_state)


def _keys(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path)


def train_step(model, state: TrainState, batch, dropout_rng, num_microbatches: int = 1):
    """One optimizer step of `model.loss_fn`; returns `(new_state, metrics)`.

    With `num_microbatches` > 1 the batch `[B, ...]` is cut into that many `[B / n, ...]` slices whose
    gradients are summed in a `lax.scan` before one update (gradient accumulation: the memory of a
    microbatch, the update of the whole batch). With the token-mean loss each microbatch's gradient
    is weighted by its share of the target tokens, so the update equals the whole batch's.
    The dropout rng is folded with the step (and microbatch), so a resumed run draws the same masks.
    """
    rng = jax.random.fold_in(dropout_rng, state.step) if dropout_rng is not None else None
    grad_fn = jax.value_and_grad(model.loss_fn, has_aux=True)
    if num_microbatches == 1:
        (_, metrics), grads = grad_fn(state.params, batch, rng)
    else:
        token_mean = getattr(model, "loss_normalizing_factor", None) == NUM_REAL_TARGET_TOKENS
        grads, metrics = _accumulate(grad_fn, state.params, batch, rng, num_microbatches, token_mean)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def _accumulate(grad_fn, params, batch, rng, n: int, token_mean: bool):
    size = next(iter(batch.values())).shape[0]
    if size % n:
        raise ValueError(f"batch size {size} is not divisible by num_microbatches={n}")
    micro = jax.tree_util.tree_map(lambda x: x.reshape((n, size // n) + x.shape[1:]), batch)
    weights = jnp.sum(jnp.asarray(micro["decoder_loss_weights"], jnp.float32),
                      axis=tuple(range(1, micro["decoder_loss_weights"].ndim)))
    shares = weights / jnp.maximum(jnp.sum(weights), 1.0) if token_mean else jnp.ones(n)

    def body(total, inputs):
        index, piece, share = inputs
        piece_rng = jax.random.fold_in(rng, index) if rng is not None else None
        (_, metrics), grads = grad_fn(params, piece, piece_rng)
        total = jax.tree_util.tree_map(lambda t, g: t + share * g, total, grads)
        return total, metrics

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    grads, metrics = jax.lax.scan(body, zeros, (jnp.arange(n), micro, shares))
    # Each metric is an Average over its microbatch; merging them is summing their totals and counts.
    return grads, jax.tree_util.tree_map(lambda m: jnp.sum(m, axis=0), metrics)
