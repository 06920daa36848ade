"""On PYTHONPATH, makes the packages named in M1JAX_BLOCK_IMPORTS (comma-separated) unimportable, as
on a plain ``pip install -e .`` that lacks the test extras: a run that needs one fails loudly."""

import importlib.abc
import os
import sys

_BLOCKED = {m for m in os.environ.get("M1JAX_BLOCK_IMPORTS", "").split(",") if m}


class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in _BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: not in the plain install)", name=name)
        return None


if _BLOCKED:
    sys.meta_path.insert(0, _Block())
