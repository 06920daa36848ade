import os

import pytest

# 8 fake CPU devices for mesh tests; must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(autouse=True)
def _restore_environment():
    """Each test starts from the session's environment: a variable set inside one (say libtpu's, by an
    in-process m1jax.plan) must not reach the subprocesses a later test launches."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
