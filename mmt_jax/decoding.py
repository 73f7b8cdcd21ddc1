"""Autoregressive decoding over a Flax decode cache: greedy, temperature/top-k sampling and beam search.

`tokens_to_logits(tokens [N, 1], cache) -> (logits [N, vocab], new_cache)` runs one decoder step; every
cache leaf with a leading batch axis has `N` rows (scalar leaves such as `cache_index` are shared).
A scanned layer stack (layers/layer_stack.py) stacks its layers' caches under the subtree `SCANNED`:
there the batch axis is the second, after the layer axis, and `[layers]` leaves are the shared ones.
Decoding starts from token 0 (T5's BOS) and writes `max_decode_length` tokens; after a row emits `eos_id`
it is padded with 0. Every decode function takes the same keywords (`batch_size, max_decode_length, eos_id, rng,
num_decodes`) and repeats each cache row `num_decodes` times (beams or samples), so the caller expands
whatever its `tokens_to_logits` closes over the same way (`expand_batch`).
Results are `(tokens [B, num_decodes, L], scores [B, num_decodes])`, sorted by
ascending score as in t5x, so `[:, -1]` is the best. Scores are log-probabilities under the model
(beam search: divided by the length penalty).

Every decode function also takes `constraint`, a `value_trie.ValueConstraint`: closed-set decoding,
each example choosing only among its value set's continuations, so that every answer is a known
value. The scores stay the model's own log-probabilities (not renormalised over the set), so
`exp(score)` is still the probability the model gives the answer, open or closed.
"""
from typing import Callable

import jax
import jax.numpy as jnp

from mmt_jax.layers.layer_stack import SCANNED
from mmt_jax.value_trie import ValueConstraint

TokensToLogits = Callable[[jax.Array, dict], tuple[jax.Array, dict]]
NEG_INF = -1.0e7
# Cache leaves equal across the beams of one example (cross-attention projections of the encoder
# output): reordering beams never changes them, so beam search skips gathering them.
BEAM_INVARIANT_CACHE = ("cached_encoder_key", "cached_encoder_value")


def _leaf_name(path) -> str:
    last = path[-1]
    return str(getattr(last, "key", getattr(last, "name", last)))


def _batch_axis(path) -> int:
    """0, or 1 for a leaf of a scanned stack's cache (`[layers, batch, ...]`)."""
    return int(any(getattr(key, "key", None) == SCANNED for key in path))


def expand_batch(tree, times: int):
    """Repeats every leaf with a batch axis `times` times along it: `[B, ...]` -> `[B*times, ...]`."""
    def expand(path, x):
        axis = _batch_axis(path)
        return x if jnp.ndim(x) <= axis else jnp.repeat(x, times, axis=axis)

    return jax.tree_util.tree_map_with_path(expand, tree)


def greedy(cache, tokens_to_logits: TokensToLogits, *, batch_size: int, max_decode_length: int,
           eos_id: int = 1, rng: jax.Array | None = None, num_decodes: int = 1,
           constraint: ValueConstraint | None = None):
    """Argmax decoding; `(tokens [B, 1, L], scores [B, 1])`."""
    del rng
    if num_decodes != 1:
        raise ValueError(f"greedy decoding gives one sequence per example, not {num_decodes}")
    return temperature_sample(cache, tokens_to_logits, batch_size=batch_size,
                              max_decode_length=max_decode_length, eos_id=eos_id,
                              rng=jax.random.PRNGKey(0), temperature=0.0, constraint=constraint)


def temperature_sample(cache, tokens_to_logits: TokensToLogits, *, batch_size: int,
                       max_decode_length: int, rng: jax.Array | None = None, eos_id: int = 1,
                       temperature: float = 1.0, topk: int = 0, num_decodes: int = 1,
                       constraint: ValueConstraint | None = None):
    """Samples from `softmax(logits / temperature)` restricted to the `topk` best tokens (0: all).

    `temperature=0` is greedy. Returns `(tokens [B, num_decodes, L], scores [B, num_decodes])`, where
    scores are the untempered log-likelihoods of the sampled sequences.
    """
    n = batch_size * num_decodes
    rng = jax.random.PRNGKey(0) if rng is None else rng
    cache = expand_batch(cache, num_decodes) if num_decodes > 1 else cache
    constraint = None if constraint is None else constraint.repeat(num_decodes)

    def choose(logits, key):
        if temperature == 0.0:
            return jnp.argmax(logits, axis=-1)
        scaled = logits / temperature
        if topk:
            kth = jax.lax.top_k(scaled, topk)[0][:, -1:]
            scaled = jnp.where(scaled < kth, NEG_INF, scaled)
        return jax.random.categorical(key, scaled, axis=-1)

    def body(state):
        i, token, sequences, cache, ended, score, key, nodes = state
        key, step_key = jax.random.split(key)
        logits, cache = tokens_to_logits(token[:, None], cache)
        logits = logits.astype(jnp.float32)
        allowed = (logits if constraint is None else
                   jnp.where(constraint.allowed(nodes, logits.shape[-1]), logits, NEG_INF))
        next_token = jnp.where(ended, 0, choose(allowed, step_key)).astype(jnp.int32)
        log_probs = jax.nn.log_softmax(logits)
        token_score = jnp.take_along_axis(log_probs, next_token[:, None], axis=-1)[:, 0]
        score = score + jnp.where(ended, 0.0, token_score)
        sequences = jax.lax.dynamic_update_slice_in_dim(sequences, next_token[:, None], i, axis=1)
        if constraint is not None:
            nodes = jnp.where(ended, nodes, constraint.advance(nodes, next_token))
        ended = ended | (next_token == eos_id)
        return i + 1, next_token, sequences, cache, ended, score, key, nodes

    def cond(state):
        i, _, _, _, ended, _, _, _ = state
        return (i < max_decode_length) & ~jnp.all(ended)

    nodes = jnp.zeros((n,), jnp.int32) if constraint is None else constraint.start
    state = (jnp.array(0), jnp.zeros((n,), jnp.int32), jnp.zeros((n, max_decode_length), jnp.int32),
             cache, jnp.zeros((n,), bool), jnp.zeros((n,), jnp.float32), rng, nodes)
    _, _, sequences, _, _, scores, _, _ = jax.lax.while_loop(cond, body, state)
    sequences = sequences.reshape(batch_size, num_decodes, max_decode_length)
    scores = scores.reshape(batch_size, num_decodes)
    order = jnp.argsort(scores, axis=1)
    return (jnp.take_along_axis(sequences, order[:, :, None], axis=1),
            jnp.take_along_axis(scores, order, axis=1))


def length_penalty(length, alpha: float):
    """GNMT's brevity penalty `((5 + length) / 6) ** alpha` (Wu et al. 2016, Eq. 14)."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def _gather_beams(tree, beam_indices, batch_size: int, beam_size: int):
    """Reorders batch-leading leaves `[B*K, ...]` by `beam_indices [B, K]` (indices into the old K)."""
    flat_indices = (beam_indices + jnp.arange(batch_size)[:, None] * beam_size).reshape(-1)

    def gather(path, x):
        axis = _batch_axis(path)
        if jnp.ndim(x) <= axis or _leaf_name(path) in BEAM_INVARIANT_CACHE:
            return x
        return jnp.take(x, flat_indices, axis=axis)

    return jax.tree_util.tree_map_with_path(gather, tree)


def beam_search(cache, tokens_to_logits: TokensToLogits, *, batch_size: int, max_decode_length: int,
                num_decodes: int = 4, alpha: float = 0.6, eos_id: int = 1,
                rng: jax.Array | None = None, constraint: ValueConstraint | None = None):
    """Beam search with `K = num_decodes` beams and GNMT length penalty `alpha`;
    `(tokens [B, K, L], scores [B, K])`, best last.

    Keeps `K` live hypotheses and the `K` best finished ones; a hypothesis finishes when it emits
    `eos_id` or reaches `max_decode_length`. Stops early once no live hypothesis can beat the worst
    finished one (exact for `alpha >= 0`, since log-probabilities only fall as sequences grow).
    """
    del rng
    b, k, length = batch_size, num_decodes, max_decode_length
    cache = expand_batch(cache, k)
    alive_scores = jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1), jnp.float32), (b, 1))
    constraint = None if constraint is None else constraint.repeat(k)
    state = dict(
        i=jnp.array(0), cache=cache,
        alive_nodes=(jnp.zeros((b * k,), jnp.int32) if constraint is None
                     else constraint.start).reshape(b, k),
        alive_seqs=jnp.zeros((b, k, length), jnp.int32), alive_log_probs=alive_scores,
        finished_seqs=jnp.zeros((b, k, length), jnp.int32),
        finished_scores=jnp.full((b, k), NEG_INF, jnp.float32))

    def body(s):
        i = s["i"]
        last = jnp.where(i == 0, 0, jax.lax.dynamic_index_in_dim(
            s["alive_seqs"], jnp.maximum(i - 1, 0), axis=2, keepdims=False))
        logits, cache = tokens_to_logits(last.reshape(b * k, 1), s["cache"])
        vocab = logits.shape[-1]
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
        if constraint is not None:  # a token outside the value set: never a candidate
            log_probs = jnp.where(constraint.allowed(s["alive_nodes"].reshape(-1), vocab),
                                  log_probs, NEG_INF)
        log_probs = log_probs.reshape(b, k, vocab)
        candidates = (s["alive_log_probs"][:, :, None] + log_probs).reshape(b, k * vocab)
        top_log_probs, top_ids = jax.lax.top_k(candidates, 2 * k)  # 2K: at least K continue
        top_beams, top_tokens = top_ids // vocab, (top_ids % vocab).astype(jnp.int32)
        top_seqs = jnp.take_along_axis(s["alive_seqs"], top_beams[:, :, None], axis=1)
        top_seqs = jax.lax.dynamic_update_slice_in_dim(top_seqs, top_tokens[:, :, None], i, axis=2)
        is_eos = top_tokens == eos_id
        last_step = i == length - 1

        # Live set: the K best candidates that did not just end.
        live_scores = jnp.where(is_eos, NEG_INF, top_log_probs)
        live_scores, live_pos = jax.lax.top_k(live_scores, k)
        alive_seqs = jnp.take_along_axis(top_seqs, live_pos[:, :, None], axis=1)
        live_beams = jnp.take_along_axis(top_beams, live_pos, axis=1)
        cache = _gather_beams(cache, live_beams, b, k)
        alive_nodes = s["alive_nodes"]
        if constraint is not None:
            parents = jnp.take_along_axis(alive_nodes, live_beams, axis=1).reshape(-1)
            chosen = jnp.take_along_axis(top_tokens, live_pos, axis=1).reshape(-1)
            alive_nodes = constraint.advance(parents, chosen).reshape(b, k)

        # Finished set: previous finished plus candidates ending now (all of them at the last step).
        ends = is_eos | last_step
        new_scores = jnp.where(ends, top_log_probs / length_penalty(i + 1, alpha), NEG_INF)
        new_scores = jnp.where(top_log_probs <= NEG_INF / 2, NEG_INF, new_scores)
        pool_scores = jnp.concatenate([s["finished_scores"], new_scores], axis=1)
        pool_seqs = jnp.concatenate([s["finished_seqs"], top_seqs], axis=1)
        finished_scores, keep = jax.lax.top_k(pool_scores, k)
        finished_seqs = jnp.take_along_axis(pool_seqs, keep[:, :, None], axis=1)
        return dict(i=i + 1, cache=cache, alive_nodes=alive_nodes, alive_seqs=alive_seqs,
                    alive_log_probs=live_scores, finished_seqs=finished_seqs,
                    finished_scores=finished_scores)

    def cond(s):
        # The best a live beam can still reach: its log-probability (it only falls) under the most
        # lenient penalty (full length).
        best_alive = s["alive_log_probs"][:, 0] / length_penalty(length, alpha)
        worst_finished = s["finished_scores"][:, -1]
        done = jnp.all(worst_finished > best_alive)
        return (s["i"] < length) & ~done

    s = jax.lax.while_loop(cond, body, state)
    return s["finished_seqs"][:, ::-1], s["finished_scores"][:, ::-1]
