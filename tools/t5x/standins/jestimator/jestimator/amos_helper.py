"""`jestimator.amos_helper.state_partition_rule`, read by t5x only for Amos's optimizer state."""


def state_partition_rule(*args, **kwargs):
    raise NotImplementedError("Amos's optimizer state: see jestimator/amos.py")
