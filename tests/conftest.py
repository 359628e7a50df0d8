"""Test settings: 8 simulated CPU devices, set before JAX initialises its backends."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
