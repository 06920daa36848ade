import os

import pytest

# 8 fake CPU devices for mesh tests; must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session, its xdist workers and the train.py / rollout.py
# subprocesses the tests launch: many of them compile the same tiny job's programs, which a later
# process then loads instead of compiling again (a cached program is the same binary, so results are
# bit for bit those of a fresh compile). Under .pytest_cache: a fresh clone starts empty.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "jax"))


@pytest.fixture(autouse=True)
def _restore_environment():
    """Each test starts from the session's environment: a variable set inside one (say libtpu's, by an
    in-process m1jax.plan) must not reach the subprocesses a later test launches."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
