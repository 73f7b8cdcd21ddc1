"""Segment-wise relative position bias (MMT4 Eq. 3) against hand-computed matrices, one per option
for the image-text cross block."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmt_jax.layers.relative_position import RelativePositionBias, segment_positions

# One head, 8 buckets (bidirectional: 4 per direction, distances 0 and 1 exact, max distance 8), so
# bucket(r) for r = key - query is: 0->0, -1->1, -2->2, -3->2, -4->3, 1->5, 2->6, 3->6, 4->7
# (log buckets: 2 + int(log(|r|/2) / log(4) * 2)). The table holds 10 + bucket.
TABLE = np.array([[10.0 + b for b in range(8)]])
CROSS = np.array([[100.0, 101.0, 102.0, 103.0]])  # index = query_type * 2 + key_type
TYPES = np.array([[0, 0, 1, 1, 1]])  # two image vectors, then three text tokens

WITHIN = np.array([  # in-segment bias, positions (0, 1 | 0, 1, 2)
    [10, 15, 0, 0, 0],
    [11, 10, 0, 0, 0],
    [0, 0, 10, 15, 16],
    [0, 0, 11, 10, 15],
    [0, 0, 12, 11, 10]], np.float32)
IS_CROSS = TYPES[0][:, None] != TYPES[0][None, :]
EXPECTED = {
    "bucket": np.where(IS_CROSS, np.where(TYPES[0][:, None] == 0, 101.0, 102.0), WITHIN),
    "zero": np.where(IS_CROSS, 0.0, WITHIN),
    # global positions 0..4: bucket of key - query over the whole sequence
    "global": np.array([[10, 15, 16, 16, 17],
                        [11, 10, 15, 16, 16],
                        [12, 11, 10, 15, 16],
                        [12, 12, 11, 10, 15],
                        [13, 12, 12, 11, 10]], np.float32),
}


def test_segment_positions_restart_per_type():
    np.testing.assert_array_equal(segment_positions(TYPES), [[0, 1, 0, 1, 2]])
    np.testing.assert_array_equal(segment_positions(np.array([[1, 1, 1], [0, 1, 1]])),
                                  [[0, 1, 2], [0, 0, 1]])


@pytest.mark.parametrize("option", ["bucket", "zero", "global"])
def test_bias_matrix_by_hand(option):
    module = RelativePositionBias(num_heads=1, bidirectional=True, num_buckets=8, max_distance=8,
                                  num_segments=2, cross_segment=option)
    positions = jnp.arange(5)[None] if option == "global" else segment_positions(TYPES)
    params = {"rel_embedding": TABLE}
    if option == "bucket":
        params["cross_segment_embedding"] = CROSS
    bias = module.apply({"params": params}, positions, positions, TYPES, TYPES)
    np.testing.assert_allclose(np.asarray(bias)[0, 0], EXPECTED[option])


def test_only_the_bucket_option_has_extra_parameters():
    positions = segment_positions(TYPES)
    for option, names in (("bucket", {"rel_embedding", "cross_segment_embedding"}),
                          ("zero", {"rel_embedding"}), ("global", {"rel_embedding"})):
        module = RelativePositionBias(1, True, 8, 8, num_segments=2, cross_segment=option)
        params = module.init(jax.random.PRNGKey(0), positions, positions, TYPES, TYPES)["params"]
        assert set(params) == names, option
    with pytest.raises(ValueError, match="cross_segment='diagonal'"):
        RelativePositionBias(1, True, num_segments=2, cross_segment="diagonal").init(
            jax.random.PRNGKey(0), positions, positions, TYPES, TYPES)


def test_grid_bias_by_hand():
    """2x2 image grid + one text token: image pairs get row + column buckets, the rest as before."""
    types = np.array([[0, 0, 0, 0, 1]])
    grid = np.array([[[0, 0], [0, 1], [1, 0], [1, 1], [0, 0]]])
    module = RelativePositionBias(num_heads=1, bidirectional=True, num_buckets=8, max_distance=8,
                                  num_segments=2, cross_segment="zero", grid_segment=0)
    params = {"rel_embedding": TABLE, "grid_row_embedding": 20.0 + np.arange(8)[None],
              "grid_col_embedding": 40.0 + np.arange(8)[None]}
    positions = segment_positions(types)
    bias = module.apply({"params": params}, positions, positions, types, types, grid, grid)
    expected = np.array([  # R[bucket(d_row)] + C[bucket(d_col)]: bucket 0->0, +1->5, -1->1
        [60, 65, 65, 70, 0],
        [61, 60, 66, 65, 0],
        [61, 66, 60, 65, 0],
        [62, 61, 61, 60, 0],
        [0, 0, 0, 0, 10]], np.float32)
    np.testing.assert_allclose(np.asarray(bias)[0, 0], expected)
