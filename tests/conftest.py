"""Test settings: 8 simulated CPU devices and strict JAX, set before JAX initialises its
backends, and a sandbox: HOME, the caches and the token cache point into the session's
temporary directory, and the session fails if a test wrote into the checkout or the real home.

The environment variables reach the training processes that the CLI tests start, too."""

import hashlib
import os
import shutil
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

# The sandbox, made before anything reads HOME. Tests write only under it and their tmp_path.
REPO = Path(__file__).resolve().parent.parent
_REAL_HOME = Path(os.environ.get("HOME", "/"))
SANDBOX = Path(tempfile.mkdtemp(prefix="parallel_gpt_tests_"))
for _var, _sub in (("HOME", "home"), ("XDG_CACHE_HOME", "home/.cache"), ("PARALLEL_GPT_CACHE", "token_cache")):
    os.environ[_var] = str(SANDBOX / _sub)
    (SANDBOX / _sub).mkdir(parents=True, exist_ok=True)

import jax  # noqa: E402
import pytest  # noqa: E402


def _outside_files() -> set[str]:
    """Files a test could write by mistake: in the checkout (but for the virtual
    environment, git's and Python's caches) and in the real home's cache directory."""
    skip = {".venv", ".git", "__pycache__", ".pytest_cache"}
    found = set()
    for root in (REPO, _REAL_HOME / ".cache" / "parallel_gpt"):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d not in skip and not d.endswith(".egg-info")]
            found.update(os.path.join(dirpath, f) for f in filenames)
    return found


_BEFORE = _outside_files()


def pytest_sessionfinish(session, exitstatus):
    """Fail the session when a test left files outside its temporary directories."""
    new = sorted(_outside_files() - _BEFORE)
    shutil.rmtree(SANDBOX, ignore_errors=True)
    if new:
        print(f"\nerror: tests wrote outside their temporary directories: {', '.join(new[:5])}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session", autouse=True)
def _strict_jax():
    assert jax.device_count() == 8, "tests expect 8 simulated CPU devices (XLA_FLAGS set too late?)"
    assert jax.config.jax_numpy_rank_promotion == "raise"


@pytest.fixture(scope="session")
def cache_dir():
    """The session's token cache (PARALLEL_GPT_CACHE, set for every test and subprocess)."""
    return Path(os.environ["PARALLEL_GPT_CACHE"])


def _snapshot(folder) -> dict[str, str]:
    """{relative path: SHA-256} of every file under `folder`."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def snapshot():
    """A function: folder -> {relative path: SHA-256} of its files, to show that nothing changed."""
    return _snapshot
