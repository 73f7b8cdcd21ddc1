"""Closed-set decoding: a prefix trie of the token sequences each prompt may answer.

A catalog attribute takes known values ("red", "navy blue", ...). `ValueTrie.build` puts every
value set (`{set name: [token ids of each value, EOS included]}`) into one trie, one root per set, as
two arrays that a jitted decoder indexes:

    tokens   [nodes, width] int32   the tokens allowed after each node (-1: none)
    children [nodes, width] int32   the node each of them leads to

`ValueConstraint(tokens, children, start)` is what the decoders (`decoding.py`) take: `start [B]` is
each example's root (`ValueTrie.roots[name]`), or `UNCONSTRAINED` (-1) for an example decoded openly.
At each step a row may choose only the tokens its node allows (`allowed`), then moves to the child
(`advance`); so every finished answer is one of its set's values. A token the node does not allow
(only ever chosen by a beam whose score is already -inf) leads to the trie's dead node, which allows
nothing.
"""
from typing import Iterable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

UNCONSTRAINED = -1


class ValueConstraint(NamedTuple):
    """The arrays a decoder needs (a pytree, so it passes through jit and `jax.device_put`): the
    trie's `tokens` and `children` `[nodes, width]`, and `start [B]`, each example's root or
    `UNCONSTRAINED`."""
    tokens: jax.Array
    children: jax.Array
    start: jax.Array

    def repeat(self, times: int) -> "ValueConstraint":
        """As JAX arrays, `start` for `[B * times]` rows, each example's repeated `times` times
        (beams, samples): what the decoders index."""
        return ValueConstraint(jnp.asarray(self.tokens), jnp.asarray(self.children),
                               jnp.repeat(jnp.asarray(self.start), times, axis=0))

    def allowed(self, nodes: jax.Array, vocab_size: int) -> jax.Array:
        """`[N, vocab]` bool: the tokens each row at `nodes [N]` may choose (every token for an
        unconstrained row)."""
        options = self.tokens[jnp.maximum(nodes, 0)]
        rows = jnp.arange(nodes.shape[0])[:, None]
        mask = jnp.zeros((nodes.shape[0], vocab_size), bool).at[
            rows, jnp.where(options >= 0, options, vocab_size)].set(True, mode="drop")
        return mask | (nodes < 0)[:, None]

    def advance(self, nodes: jax.Array, chosen: jax.Array) -> jax.Array:
        """The nodes `[N]` after each row chose `chosen [N]` (unconstrained rows stay so; a token
        the node does not allow leads to the dead node)."""
        options = self.tokens[jnp.maximum(nodes, 0)]
        hit = options == chosen[:, None]
        child = jnp.take_along_axis(self.children[jnp.maximum(nodes, 0)],
                                    jnp.argmax(hit, axis=1)[:, None], axis=1)[:, 0]
        dead = self.tokens.shape[0] - 1
        return jnp.where(nodes < 0, nodes, jnp.where(jnp.any(hit, axis=1), child, dead))


class ValueTrie(NamedTuple):
    """Value sets as one trie (module docstring); `roots[name]` is the root of set `name`."""
    tokens: np.ndarray
    children: np.ndarray
    roots: dict[str, int]

    @classmethod
    def build(cls, value_sets: Mapping[str, Iterable[Sequence[int]]]) -> "ValueTrie":
        """`{set name: token sequences}`; each sequence should end with EOS, so that a value is
        finished only where it ends. An empty set, or an empty sequence, is a ValueError."""
        edges: list[dict[int, int]] = []
        roots = {}
        for name, sequences in value_sets.items():
            roots[name] = len(edges)
            edges.append({})
            count = 0
            for sequence in sequences:
                if not len(sequence):
                    raise ValueError(f"value set {name!r} has an empty token sequence")
                node = roots[name]
                for token in map(int, sequence):
                    if token not in edges[node]:
                        edges[node][token] = len(edges)
                        edges.append({})
                    node = edges[node][token]
                count += 1
            if not count:
                raise ValueError(f"value set {name!r} has no values")
        edges.append({})  # the dead node
        width = max(1, max(len(e) for e in edges))
        tokens = np.full((len(edges), width), -1, np.int32)
        children = np.zeros((len(edges), width), np.int32)
        for node, options in enumerate(edges):
            for j, (token, child) in enumerate(sorted(options.items())):
                tokens[node, j], children[node, j] = token, child
        return cls(tokens, children, roots)

    def constraint(self, names: Sequence[str | None]) -> ValueConstraint:
        """The constraint for a batch whose example i answers from set `names[i]` (None: open),
        as host arrays: the jitted decoder, or `jax.device_put` with shardings, places them."""
        start = np.array([UNCONSTRAINED if n is None else self.roots[n] for n in names], np.int32)
        return ValueConstraint(self.tokens, self.children, start)
