"""Test-suite set-up: 8 host CPU devices (for the sharding tests) before jax is imported anywhere."""
import os

# XLA:CPU ends the whole process (abort, no Python error) when a collective's participants do not all
# arrive within 40 s. Eight simulated devices share 2 cores here, beside tf.data and the test's
# compiles. Two loaded fresh-clone suite runs aborted with no Python error inside the contrastive
# matching test (which gathers the batch across devices); this timeout is the suspected cause.
# A collective that is really stuck still ends the run, after 10 minutes.
# The suite is compile-bound (hundreds of tiny programs, each run a few times): LLVM's optimisation
# level 0 compiles XLA:CPU programs faster (13 compile-heavy tests: 141 s -> 114 s). Test-suite
# settings only, like the device count; the package never sets them.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_cpu_collective_call_terminate_timeout_seconds=600"
                           " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Identical programs compiled by several in-process runs (the train tests resume the same model) are
# compiled once per session.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.environ.get("TMPDIR", "/tmp"), f"mmt_jax_test_jit_cache_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A TFDS data_dir with the embedded catalog `embedded-n96-s0-px32` (81/7/8 products, two files
    per split so two processes can each read their own), shared by the binaries' tests."""
    from mmt_jax import main
    out = str(tmp_path_factory.mktemp("tfds"))
    assert main.run(["data", "generate", "--out", out, "--num-products", "96", "--image-size", "32",
                     "--num-shards", "2"]) == 0
    return out
