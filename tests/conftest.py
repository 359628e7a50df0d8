"""Test settings: 8 simulated CPU devices and strict JAX, set before JAX initialises its backends.

The environment variables reach the training processes that the CLI tests start, too."""

import hashlib
import os
import tempfile
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Implicit rank promotion ((B, T, C) + (C,)) raises: every broadcast in the package is written out.
os.environ["JAX_NUMPY_RANK_PROMOTION"] = "raise"
# The CLI tests start many short training processes that compile the same programs: a
# persistent compilation cache (inherited by those processes) halves their start-up.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "parallel_gpt_test_jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _strict_jax():
    assert jax.device_count() == 8, "tests expect 8 simulated CPU devices (XLA_FLAGS set too late?)"
    assert jax.config.jax_numpy_rank_promotion == "raise"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One token cache for the whole session; PARALLEL_GPT_CACHE points subprocesses at it."""
    path = tmp_path_factory.mktemp("cache")
    os.environ["PARALLEL_GPT_CACHE"] = str(path)
    return path


def _snapshot(folder) -> dict[str, str]:
    """{relative path: SHA-256} of every file under `folder`."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def snapshot():
    """A function: folder -> {relative path: SHA-256} of its files, to show that nothing changed."""
    return _snapshot
