"""Sparse mixture-of-experts feed-forward block (MoEMoE sec. 4.4 and appendix F).

The gate is the paper's `w(x) = softmax(top_k(W x + noise))`: router logits in float32, Gaussian noise
(standard deviation `router_noise`) added in training only, from the `router_noise` rng stream, and a
softmax over the k largest logits; every other expert gets weight 0. The block's output for a token is
`sum_i w_i(x) f_i(x)` over its k experts `f_i`, each a T5 MLP (`MlpBlock`).

Tokens are routed in groups of at most `group_size` consecutive tokens of one sequence (the largest
such group that tiles the sequence; a group never spans two sequences), so the dispatch tensors grow
with the group, not the batch. Each expert takes at most
`capacity` tokens per group:

    capacity = min(group, max(min_capacity, ceil(k * group * capacity_factor / num_experts)))

k enters the formula (each token makes k choices, so a balanced router sends `k * group / n` tokens
to each expert); `min_capacity` keeps short groups (one-token decode steps) from dropping, and no
expert needs more than `group` slots since a token picks an expert at most once, so
`eval_dropless=True` (capacity = group outside training) never drops at inference. Slots are filled by priority: every token's first choice before any
token's second choice, each in token order; a choice that finds its expert full is dropped (its weight
lost; the residual connection around the block still carries the token).

Two dispatch implementations with the same result (tested equal): "einsum" builds one-hot dispatch and
combine tensors `[G, S, E, C]` and contracts them; "gather" (the default) indexes the tokens into
their slots and back, without the one-hot contractions. Either way GSPMD turns the change of sharding
between the group-major and the expert-major tensors into an all-to-all. Measured on this 2-core CPU
(bench/moe_bench.py: 8 experts, top-2, d_model 512, d_ff 2048, 8 x 256 tokens, forward + backward,
over a dense FFN of the same active FLOPs): einsum 1.20x with groups of 256 or 64, gather 1.18x
with groups of 256 and 1.03x with groups of 64, hence the defaults.

Load balancing (the paper's Eq. in sec. 4.4): `L_aux = n * sum_i f_i P_i`, f_i the fraction of tokens
whose highest-ranked expert is i, P_i the mean gate weight `w_i(x)` of expert i, over the tokens of a
group, averaged over groups; 1 when routing is uniform. The router z-loss (ST-MoE) is the mean squared
logsumexp of the router logits. Both are sown into `intermediates`, with `fraction_tokens_left_behind`,
`expert_usage` (fraction of slots filled) and `router_confidence` (mean summed gate weight of the kept
choices): the names t5x's MoE models read.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import partitioning

from mmt_jax.layers.dense import DenseGeneral, default_kernel_init
from mmt_jax.layers.mlp import MlpBlock

DISPATCH = ("einsum", "gather")
# Expert-major tensors [experts, groups, capacity, embed]: experts over the `expert` mesh axis.
EXPERT_MAJOR = ("expert", "expert_replicas", "unmodeled", "embed")


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    """num_experts n; num_selected k; capacity factors for training and evaluation; see the module
    docstring for the rest. aux_loss_weight is the paper's lambda (0.1 was its best, Table 5);
    eval_dropless keeps every token outside training (capacity = group)."""
    num_experts: int = 8
    num_selected: int = 2
    group_size: int = 64
    train_capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    min_capacity: int = 4
    router_noise: float = 1.0
    aux_loss_weight: float = 0.1
    z_loss_weight: float = 0.0
    dispatch: str = "gather"
    eval_dropless: bool = False

    def __post_init__(self):
        if not 1 <= self.num_selected <= self.num_experts:
            raise ValueError(f"num_selected={self.num_selected} must be in 1..num_experts="
                             f"{self.num_experts}")
        if self.dispatch not in DISPATCH:
            raise ValueError(f"dispatch={self.dispatch!r}; choose from {DISPATCH}")


def capacity(config: MoeConfig, group: int, capacity_factor: float, dropless: bool) -> int:
    if dropless:
        return group
    wanted = math.ceil(config.num_selected * group * capacity_factor / config.num_experts)
    return min(group, max(config.min_capacity, wanted))


def route(logits: jax.Array, num_selected: int, expert_capacity: int):
    """Top-k routing with priority dropping. logits `[G, S, E]` float32 ->

    experts `[G, S, k]` (chosen expert ids, best first), weights `[G, S, k]` (softmax over the k
    logits), slot `[G, S, k]` (position in the expert's buffer), kept `[G, S, k]` (bool: slot <
    capacity).
    """
    top_logits, experts = jax.lax.top_k(logits, num_selected)
    weights = jax.nn.softmax(top_logits, axis=-1)
    num_experts = logits.shape[-1]
    # Choice-major order: all first choices (in token order), then all second choices, ...
    choice_major = jax.nn.one_hot(jnp.swapaxes(experts, 1, 2), num_experts, dtype=jnp.int32)
    g, k, s, e = choice_major.shape
    flat = choice_major.reshape(g, k * s, e)
    position = jnp.cumsum(flat, axis=1) - 1  # [G, k*S, E]: rank of each choice within its expert
    slot = jnp.sum(position * flat, axis=-1).reshape(g, k, s)
    slot = jnp.swapaxes(slot, 1, 2)
    return experts, weights, slot, slot < expert_capacity


def load_balancing_loss(logits_top1: jax.Array, gate_weights: jax.Array) -> jax.Array:
    """`n * sum_i f_i P_i` (MoEMoE sec. 4.4), averaged over groups.

    logits_top1: `[G, S]` int, each token's highest-ranked expert; gate_weights: `[G, S, E]`, the
    dense gate `w(x)` (zero outside the token's k experts).
    """
    num_experts = gate_weights.shape[-1]
    fraction = jnp.mean(jax.nn.one_hot(logits_top1, num_experts), axis=1)  # f_i  [G, E]
    weight = jnp.mean(gate_weights, axis=1)                               # P_i  [G, E]
    return jnp.mean(num_experts * jnp.sum(fraction * weight, axis=-1))


class MoeBlock(nn.Module):
    """`[B, L, embed]` -> `[B, L, embed]`: the MoE replacement of `MlpBlock` (same `mlp_dim` per
    expert). Experts live under `expert/` with the `expert` axis first; the router under `router/`."""

    config: MoeConfig
    intermediate_dim: int
    activations: tuple[str, ...] = ("gelu", "linear")
    dropout_rate: float = 0.0
    dtype: jnp.dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = default_kernel_init

    @nn.compact
    def __call__(self, inputs, *, enable_dropout: bool = False):
        cfg = self.config
        batch, length, embed = inputs.shape
        # The largest group of at most group_size tokens that tiles the sequence.
        group = max(d for d in range(1, min(cfg.group_size, length) + 1) if length % d == 0)
        x = inputs.reshape(batch * length // group, group, embed)  # [G, S, D]
        x = partitioning.with_sharding_constraint(x, ("batch", "length", "embed"))

        logits = DenseGeneral(cfg.num_experts, kernel_axes=("embed", "unmodeled"), dtype=jnp.float32,
                              kernel_init=nn.initializers.normal(0.02), name="router")(x)  # [G, S, E]
        if enable_dropout and cfg.router_noise > 0:
            logits = logits + cfg.router_noise * jax.random.normal(
                self.make_rng("router_noise"), logits.shape, jnp.float32)
        factor = cfg.train_capacity_factor if enable_dropout else cfg.eval_capacity_factor
        slots = capacity(cfg, group, factor, cfg.eval_dropless and not enable_dropout)
        experts, weights, slot, kept = route(logits, cfg.num_selected, slots)

        expert_mlp = partitioning.vmap_with_axes(
            MlpBlock, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
            in_axes=(0, None), out_axes=0, axis_size=cfg.num_experts,
            partitioning_axis_names={"params": "expert"}, spmd_axis_name="expert")(
                self.intermediate_dim, tuple(self.activations), self.dropout_rate, self.dtype,
                kernel_init=self.kernel_init, activation_axes=("expert_replicas", "unmodeled"),
                name="expert")
        def run_experts(expert_inputs):  # [E, G, C, D] -> [E, G, C, D], sharded over `expert`
            expert_inputs = partitioning.with_sharding_constraint(expert_inputs, EXPERT_MAJOR)
            return partitioning.with_sharding_constraint(
                expert_mlp(expert_inputs, enable_dropout), EXPERT_MAJOR)

        dispatch = self._einsum_dispatch if cfg.dispatch == "einsum" else self._gather_dispatch
        output = dispatch(x, run_experts, experts, weights, slot, kept, slots)
        output = partitioning.with_sharding_constraint(output, ("batch", "length", "embed"))

        gate = jnp.sum(jax.nn.one_hot(experts, cfg.num_experts) * weights[..., None], axis=2)
        self.sow("intermediates", "auxiliary_loss", load_balancing_loss(experts[..., 0], gate))
        self.sow("intermediates", "router_z_loss",
                 jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1))))
        self.sow("intermediates", "fraction_tokens_left_behind",
                 1.0 - jnp.mean(jnp.any(kept, axis=-1).astype(jnp.float32)))
        self.sow("intermediates", "expert_usage",
                 jnp.sum(kept) / (x.shape[0] * cfg.num_experts * slots))
        self.sow("intermediates", "router_confidence",
                 jnp.mean(jnp.sum(weights * kept, axis=-1)))
        return output.reshape(batch, length, embed).astype(inputs.dtype)

    def _einsum_dispatch(self, x, run_experts, experts, weights, slot, kept, slots):
        num_experts = self.config.num_experts
        # [G, S, k, E] x [G, S, k, C] -> [G, S, E, C]
        which = jax.nn.one_hot(experts, num_experts, dtype=x.dtype)
        where = jax.nn.one_hot(jnp.where(kept, slot, slots), slots, dtype=x.dtype)  # dropped: zeros
        dispatch = jnp.einsum("gske,gskc->gsec", which, where)
        combine = jnp.einsum("gske,gskc,gsk->gsec", which, where, weights.astype(x.dtype))
        expert_outputs = run_experts(jnp.einsum("gsec,gsd->egcd", dispatch, x))
        return jnp.einsum("gsec,egcd->gsd", combine, expert_outputs)

    def _gather_dispatch(self, x, run_experts, experts, weights, slot, kept, slots):
        num_experts = self.config.num_experts
        g, s, k = experts.shape
        # Which token fills each (expert, slot): scatter the kept choices' token index; empty slots
        # point at an extra zero row.
        token = jnp.broadcast_to(jnp.arange(s)[None, :, None], (g, s, k))
        flat_slot = jnp.where(kept, experts * slots + slot, num_experts * slots)  # dropped -> bin
        source = jnp.full((g, num_experts * slots + 1), s, jnp.int32)
        source = jax.vmap(lambda src, idx, tok: src.at[idx.reshape(-1)].set(tok.reshape(-1)))(
            source, flat_slot, token)[:, :-1]
        padded = jnp.concatenate([x, jnp.zeros_like(x[:, :1])], axis=1)  # [G, S + 1, D]
        expert_inputs = jnp.take_along_axis(padded, source[..., None], axis=1)  # [G, E*C, D]
        expert_outputs = run_experts(
            expert_inputs.reshape(g, num_experts, slots, -1).transpose(1, 0, 2, 3))
        flat_outputs = expert_outputs.transpose(1, 0, 2, 3).reshape(g, num_experts * slots, -1)
        flat_outputs = jnp.concatenate([flat_outputs, jnp.zeros_like(flat_outputs[:, :1])], axis=1)
        picked = jnp.take_along_axis(flat_outputs, flat_slot.reshape(g, s * k)[..., None], axis=1)
        picked = picked.reshape(g, s, k, -1)
        return jnp.einsum("gskd,gsk->gsd", picked, (weights * kept).astype(x.dtype))
