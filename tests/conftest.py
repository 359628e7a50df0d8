"""Test settings: 8 simulated CPU devices, set before JAX initialises its backends."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The CLI tests start many short training processes that compile the same programs: a
# persistent compilation cache (inherited by those processes) halves their start-up.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "parallel_gpt_test_jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")

import jax  # noqa: E402
import pytest  # noqa: E402



@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
    assert jax.device_count() == 8, "tests expect 8 simulated CPU devices (XLA_FLAGS set too late?)"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One token cache for the whole session; PARALLEL_GPT_CACHE points subprocesses at it."""
    path = tmp_path_factory.mktemp("cache")
    os.environ["PARALLEL_GPT_CACHE"] = str(path)
    return path
