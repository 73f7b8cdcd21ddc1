"""Test-suite set-up: 8 host CPU devices (for the sharding tests) before jax is imported anywhere."""
import os

# The suite is compile-bound (hundreds of tiny programs, each run a few times): LLVM's optimisation
# level 0 compiles XLA:CPU programs faster (13 compile-heavy tests: 141 s -> 114 s). Test-suite
# settings only, like the device count; the package never sets them.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Identical programs compiled by several runs (the train tests resume the same model, in this process
# and in subprocesses) are compiled once per session, however short their compile.
# One directory per pytest-xdist worker (its subprocesses inherit it): jax writes an entry in place,
# not atomically, so two workers compiling the same program could read each other's half-written file.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.environ.get("TMPDIR", "/tmp"),
    f"mmt_jax_test_jit_cache_{os.getuid()}_{os.environ.get('PYTEST_XDIST_WORKER', 'main')}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


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


# pytest-xdist hands out whole files (--dist loadfile): a worker takes the next file when it is
# done. Its default order, most tests first, left the one-test matching run (80 s) for last, one
# core idle meanwhile. Longest first instead (pytest.ini turns the default off); seconds per file
# on 2 idle cores, fresh clone (2026-11-29); files not named here take under 30 s and go last.
SECONDS_PER_FILE = {
    "test_train.py": 285, "test_main.py": 234, "test_moemoe.py": 175, "test_moe.py": 98,
    "test_mmt4.py": 96, "test_layer_stack.py": 93, "test_matching_run.py": 45,
    "test_image_features.py": 70, "test_decoding.py": 66, "test_own_catalog.py": 66,
    "test_multihost.py": 63, "test_chunked_loss.py": 58, "test_contrastive.py": 55,
    "test_model_protocol.py": 47, "test_layers.py": 44, "test_serve.py": 37, "test_tasks.py": 31,
    "test_value_trie.py": 30}


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: -SECONDS_PER_FILE.get(item.path.name, 0))  # stable within a file
