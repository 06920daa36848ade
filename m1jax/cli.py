"""What the entry points (train.py, rollout.py, python -m m1jax.plan) share on the command line.

A user's mistake (an unknown or wrong-typed ``--config.x.y`` override, a missing file, a bad mesh)
ends in one line naming the problem and the fix, exit code 2, and no traceback, before anything is
compiled or written. ``--print_config`` prints the resolved config and exits.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import sys

import ml_collections

USAGE_ERROR = 2  # the exit code of a bad command line, as argparse uses


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every leaf key of a config, dotted: ``rl.steps``, ``model.hidden_size``, ..."""
    keys = []
    for k, v in config.items():
        if isinstance(v, ml_collections.ConfigDict):
            keys += flat_keys(v, f"{prefix}{k}.")
        else:
            keys.append(prefix + k)
    return keys


def nearest(key: str, keys: list[str]) -> str | None:
    """The valid key closest to a mistyped one: the same section first, then anywhere."""
    section, _, leaf = key.rpartition(".")
    same = [k for k in keys if k.rpartition(".")[0] == section]
    by_leaf = difflib.get_close_matches(leaf, [k.rpartition(".")[2] for k in same], n=1, cutoff=0.6)
    if by_leaf:
        return f"{section}.{by_leaf[0]}" if section else by_leaf[0]
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    return close[0] if close else None


def _config_file(argv: list[str], flag: str, default: str) -> tuple[str, str | None]:
    path = default
    for i, a in enumerate(argv):
        if a.startswith(f"--{flag}="):
            path = a.split("=", 1)[1]
        elif a == f"--{flag}" and i + 1 < len(argv):
            path = argv[i + 1]
    path, _, arg = path.partition(":")
    return path, arg or None


def unknown_override(argv: list[str], flag: str, default: str) -> str | None:
    """The first ``--{flag}.a.b=v`` of argv whose key the config file lacks, as an error line naming
    the nearest valid key; None if every override names a key (or the file cannot be loaded)."""
    from m1jax.configs import load_config_file

    path, arg = _config_file(argv, flag, default)
    try:
        config = load_config_file(path, arg)
    except Exception:  # noqa: BLE001 -- absl's own message about the file is the better one
        return None
    keys = flat_keys(config)
    sections = {k.rpartition(".")[0] for k in keys}
    for a in argv:
        if not a.startswith(f"--{flag}."):
            continue
        key = a[len(flag) + 3:].split("=", 1)[0]
        if key in keys or key in sections:
            continue
        hint = nearest(key, keys)
        fix = f"did you mean --{flag}.{hint}?" if hint else "--print_config lists every key."
        return f"--{flag}.{key}: no such key in {path}; {fix}"
    return None


def fail(prog: str, message: str):
    """One line on stderr and exit code 2."""
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(USAGE_ERROR)


def define_config(prog: str, name: str, default: str, help_: str):
    """``config_flags.DEFINE_config_file`` whose mistakes are one line and exit code 2: ml_collections
    reads the ``--{name}.*`` overrides of sys.argv when the flag is defined (at import), and raises
    there for a key the config lacks."""
    from ml_collections import config_flags

    argv = sys.argv[1:]
    path, _ = _config_file(argv, name, default)
    if any(a == f"--{name}" or a.startswith((f"--{name}=", f"--{name}.")) for a in argv) and not os.path.exists(path):
        fail(prog, f"--{name}={path}: no such config file; the configs/ directory holds the available ones.")
    try:
        return config_flags.DEFINE_config_file(name, default, help_)
    except (AttributeError, KeyError) as e:
        line = unknown_override(argv, name, default)
        fail(prog, line or f"a --{name}.* override names no key of the config ({e}).")


def flags_parser(prog: str, config_flag: str = "config", config_default: str = "configs/arith_cispo.py"):
    """An ``app.run(..., flags_parser=)`` that turns flag errors into one line and exit code 2."""
    from absl import flags

    def parse(argv):
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            fail(prog, f"{e}. See --helpshort.")
        except (AttributeError, KeyError, TypeError, ValueError) as e:  # an override the config cannot take
            line = unknown_override(argv[1:], config_flag, config_default)
            fail(prog, line or f"{type(e).__name__}: {e}")

    return parse


@contextlib.contextmanager
def user_errors(prog: str, *extra: type[BaseException]):
    """Inside: a ValueError (config and mesh checks), a missing file or a storage error is the user's
    to fix: one line, exit code 2."""
    from m1jax.storage import StorageError

    try:
        yield
    except (ValueError, FileNotFoundError, NotADirectoryError, StorageError, *extra) as e:
        fail(prog, " ".join(line.strip() for line in str(e).strip().splitlines()) or type(e).__name__)


def print_config(config: ml_collections.ConfigDict):
    """The resolved config (file + overrides), as the YAML-like text ml_collections prints."""
    print(config, end="" if str(config).endswith("\n") else "\n", flush=True)
