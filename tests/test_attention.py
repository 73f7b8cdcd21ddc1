"""The one attention core (`layers.attention.dot_product_attention`) against a NumPy reference: bias,
mask, scale, dropout, mixed precision, the choice of kernel, and T5's and ViT's layers on top of it."""
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from mmt_jax.layers import attention
from mmt_jax.layers.attention import MultiHeadAttention, dot_product_attention, make_attention_mask

B, LQ, LK, H, D = 2, 4, 6, 3, 8


def _inputs(dtype=jnp.float32, lq=LQ, lk=LK, d=D):
    rng = np.random.default_rng(0)
    q = rng.normal(size=(B, lq, H, d))
    k, v = rng.normal(size=(B, lk, H, d)), rng.normal(size=(B, lk, H, d))
    bias = rng.normal(size=(1, H, lq, lk))
    mask = np.ones((B, 1, lq, lk), bool)
    mask[1, :, :, lk - 2:] = False  # the second example's last two keys are padding
    mask[0, :, 1, :] = False  # a query row with no key at all
    return [jnp.asarray(x, dtype) for x in (q, k, v)], jnp.asarray(bias, jnp.float32), jnp.asarray(mask)


def _reference(q, k, v, bias, mask, scale, keep=None, rate=0.0):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    logits = scale * np.einsum("bqhd,bkhd->bhqk", q, k)
    if bias is not None:
        logits = logits + np.asarray(bias, np.float64)
    if mask is not None:
        logits = np.where(np.asarray(mask), logits, -1e10)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    if keep is not None:
        weights = weights * np.asarray(keep) / (1.0 - rate)
    return np.einsum("bhqk,bkhd->bqhd", weights, v)


@pytest.mark.parametrize("implementation", ["auto", "xla"])
@pytest.mark.parametrize("scale", [1.0, D ** -0.5])
def test_core_matches_the_reference(implementation, scale):
    (q, k, v), bias, mask = _inputs()
    for b, m in ((bias, mask), (bias, None), (None, mask), (None, None)):
        got = dot_product_attention(q, k, v, b, m, scale=scale, implementation=implementation)
        np.testing.assert_allclose(got, _reference(q, k, v, b, m, scale), atol=2e-5, rtol=2e-5)
    # A query row with every key masked attends uniformly (the same on every path).
    got = dot_product_attention(q, k, v, bias, mask)
    np.testing.assert_allclose(got[0, 1], np.asarray(v[0]).mean(0), atol=1e-5)


def test_the_fused_call_is_used_unless_attention_dropout_is_on():
    (q, k, v), bias, mask = _inputs()
    calls = []
    real = jax.nn.dot_product_attention
    with mock.patch.object(jax.nn, "dot_product_attention",
                           lambda *a, **kw: calls.append(kw["implementation"]) or real(*a, **kw)):
        dot_product_attention(q, k, v, bias, mask)
        dot_product_attention(q, k, v, bias, mask, dropout_rate=0.5)  # no rng: inference
        dot_product_attention(q, k, v, bias, mask, dropout_rng=jax.random.PRNGKey(0))  # rate 0
        assert calls == ["xla"] * 3  # on CPU "auto" is XLA's
        dot_product_attention(q, k, v, bias, mask, dropout_rate=0.5, dropout_rng=jax.random.PRNGKey(0))
        assert len(calls) == 3


def test_dropout_drops_attention_probabilities():
    (q, k, v), bias, mask = _inputs()
    rng, rate = jax.random.PRNGKey(7), 0.4
    got = dot_product_attention(q, k, v, bias, mask, dropout_rate=rate, dropout_rng=rng)
    keep = jax.random.bernoulli(rng, 1.0 - rate, (B, H, LQ, LK))
    np.testing.assert_allclose(got, _reference(q, k, v, bias, mask, 1.0, keep, rate), atol=2e-5,
                               rtol=2e-5)


def test_mixed_precision_keeps_float32_logits_and_softmax():
    (q, k, v), bias, mask = _inputs(jnp.bfloat16)
    # A bias that only float32 resolves: bf16 steps by 4 near 1000, the bias varies by about +-2.
    bias = bias + 1000.0
    expected = _reference(q, k, v, bias, mask, 1.0)
    for rng in (None, jax.random.PRNGKey(0)):  # fused, and the explicit path with dropout rate 0+
        got = dot_product_attention(q, k, v, bias, mask, dropout_rate=1e-9, dropout_rng=rng)
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(got, np.float32), expected, atol=0.05, rtol=0.02)


def test_cudnn_is_asked_for_only_where_it_fits():
    (q, k, v), bias, mask = _inputs(jnp.bfloat16, lq=8, lk=8, d=64)
    fits = attention._cudnn_fits
    assert not fits(q, k, bias, mask)  # this host has no CUDA backend
    with mock.patch.object(attention, "_cuda_backend", lambda: True):
        assert fits(q, k, bias, mask) and fits(q, k, None, None)
        assert not fits(q.astype(jnp.float32), k, None, None)  # cuDNN takes bf16/fp16 only
        assert not fits(q[..., :60], k[..., :60], None, None)  # head dim not a multiple of 8
        assert not fits(q[:, :1], k, bias[:, :, :1], mask[:, :, :1])  # a decode step, with a bias
        assert fits(q[:, :1], k, None, None)
        assert not fits(q, k, bias[:, :, :1], None)  # a bias broadcast over queries
        # Asked for on a host where cuDNN turns out to be missing: "auto" falls back to XLA.
        got = dot_product_attention(q, k, v, bias, mask)
        np.testing.assert_array_equal(got, dot_product_attention(q, k, v, bias, mask,
                                                                 implementation="xla"))
    with pytest.raises(RuntimeError, match="cuDNN"):
        dot_product_attention(q, k, v, bias, mask, implementation="cudnn")
    with pytest.raises(ValueError, match="implementation"):
        dot_product_attention(q, k, v, implementation="flash")


@pytest.mark.skipif(not attention._cuda_backend(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("bias_mask, length", [(False, 50), (True, 64)])  # ViT-B/32; T5
def test_cudnn_agrees_with_xla_on_gpu(bias_mask, length):
    (q, k, v), bias, mask = _inputs(jnp.bfloat16, lq=length, lk=length, d=64)
    bias, mask = (bias, mask) if bias_mask else (None, None)
    assert attention._cudnn_fits(q, k, bias, mask)

    def loss(q, k, v, bias, implementation):
        out = dot_product_attention(q, k, v, bias, mask, implementation=implementation)
        return jnp.sum(out.astype(jnp.float32) ** 2), out

    argnums = (0, 1, 2, 3) if bias_mask else (0, 1, 2)
    runs = [jax.jit(jax.grad(loss, argnums, has_aux=True), static_argnums=4)(q, k, v, bias, impl)
            for impl in ("cudnn", "xla")]
    assert "cudnn" in jax.jit(loss, static_argnums=4).lower(q, k, v, bias, "auto").as_text().lower()
    for a, b in zip(jax.tree_util.tree_leaves(runs[0]), jax.tree_util.tree_leaves(runs[1])):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   atol=0.05, rtol=0.05)


def test_t5_and_vit_layers_share_the_core():
    """T5's flavour (no biases, unscaled) and ViT's (biases, 1/sqrt(head_dim)) both equal the
    reference computed from their own projections."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(B, LK, 12)), jnp.float32)
    mask = make_attention_mask(jnp.ones((B, LK)), jnp.asarray([[1] * LK, [1] * (LK - 1) + [0]]))
    for flavour in (dict(), dict(use_bias=True, scale_logits=True)):
        layer = MultiHeadAttention(H, D, **flavour)
        params = nn.unbox(layer.init(jax.random.PRNGKey(0), x, x, mask)["params"])
        if flavour:
            params = jax.tree_util.tree_map(lambda p: p + 0.1, params)  # non-zero biases
        got = layer.apply({"params": params}, x, x, mask)

        def project(name, y):
            out = np.asarray(y) @ np.asarray(params[name]["kernel"])
            if flavour:
                out = out + np.asarray(params[name]["bias"])
            return out

        q, k, v = (project(n, x).reshape(B, LK, H, D) for n in ("query", "key", "value"))
        attended = _reference(q, k, v, None, mask, D ** -0.5 if flavour else 1.0)
        expected = project("out", attended.reshape(B, LK, H * D))
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
        assert set(params) == {"query", "key", "value", "out"}
        assert all(set(p) == ({"kernel", "bias"} if flavour else {"kernel"}) for p in params.values())
