"""The names t5x reads from `jestimator.amos` (t5x/optimizers.py)."""
from typing import NamedTuple


class ScaleByAmosState(NamedTuple):
    """Only a key in t5x's optimizer-state partition rules; never constructed."""


def amos(*args, **kwargs):
    raise NotImplementedError(
        "t5x's Amos optimizer needs jestimator; this is the stand-in installed by mmt_jax's "
        "tools/t5x/install.sh. Install jestimator from its source to use Amos.")
