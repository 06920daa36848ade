"""The plain install (``pip install -e .``, no extras) holds everything the library imports.

train.py's and rollout.py's runs in tests/test_train.py and tests/test_rollout_cli.py also run in
this environment (tests/lean.py), so the main job and sampling are exercised without the extras.
"""

import os
import subprocess
import sys

from tests.lean import EXTRAS, lean_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

IMPORT_ALL = """
import importlib, pkgutil, sys
import m1jax, kernels_pallas
names = [m.name for pkg in (m1jax, kernels_pallas) for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")
         if not m.name.endswith(".__main__")]  # python -m entry points run their command when imported
for name in names:
    importlib.import_module(name)
try:
    import torch  # noqa: F401
except ModuleNotFoundError:
    print("blocked ok")
print(len(names), "modules")
"""


def test_every_module_imports_without_the_extras():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    res = subprocess.run([sys.executable, "-c", IMPORT_ALL], cwd=ROOT, env=lean_env(env), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "blocked ok" in res.stdout  # the blocker works: a library import of an extra would have failed
    assert int(res.stdout.split()[-2]) > 40, res.stdout


def test_demo_runs_on_the_plain_install():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    res = subprocess.run([sys.executable, "-m", "m1jax.demo", "--config=configs/tiny.py"], cwd=ROOT,
                         env=lean_env(env), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


def test_the_extras_list_matches_pyproject():
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    extras = {d.split("==")[0].split(">=")[0].split("[")[0].strip().lower().replace("-", "_")
              for group in project["optional-dependencies"].values() for d in group}
    base = {d.split("==")[0].split(">=")[0].strip().lower().replace("-", "_") for d in project["dependencies"]}
    names = {"pytest_xdist": "xdist"}  # distribution name -> module name, where they differ
    missing = {names.get(e, e) for e in extras - base} - set(EXTRAS)
    assert not missing, f"extras not blocked in tests/lean.py: {missing}"
