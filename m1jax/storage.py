"""Run directories that are local paths or ``gs://bucket/path`` URLs.

Files go through ``etils.epath`` (gcsfs for gs://), arrays through orbax/tensorstore, so a workdir
on Cloud Storage behaves like a local one. Two differences are handled here:

* Cloud Storage has no directories and no appending. ``open_append`` keeps a remote file's content
  in memory and rewrites the whole object at every ``flush`` (run logs are small: one line a step).
* A missing bucket would otherwise surface deep inside tensorstore; ``prepare_dir`` checks it first
  and says what to do.

For tests and emulators, gcsfs reads ``STORAGE_EMULATOR_HOST`` and tensorstore reads
``TENSORSTORE_GCS_HTTP_URL`` (tests/gcs_fixture.py).
"""

from __future__ import annotations

import io
import json
import logging
import os

from etils import epath

logging.getLogger("gcsfs").setLevel(logging.ERROR)  # "Could not determine bucket type" noise


class StorageError(FileNotFoundError):
    """A bucket or run directory that does not exist: names it and the fix."""


def is_remote(path: str) -> bool:
    return "://" in str(path)


def bucket_of(path: str) -> str:
    """'gs://bkt/run/x' -> 'gs://bkt'."""
    scheme, rest = str(path).split("://", 1)
    return f"{scheme}://{rest.split('/', 1)[0]}"


def check_bucket(path: str) -> None:
    """Raise StorageError when ``path`` is remote and its bucket does not exist (or is not visible
    with the current credentials)."""
    if is_remote(path) and not epath.Path(bucket_of(path)).exists():
        raise StorageError(
            f"bucket {bucket_of(path)} of {path} does not exist or is not accessible with the current "
            f"credentials; create it (gcloud storage buckets create {bucket_of(path)}) or fix the path.")


def prepare_dir(path: str) -> str:
    """The canonical form of an output directory (absolute if local), created if local; for gs://
    the bucket must exist (directories need no creating there)."""
    if is_remote(path):
        check_bucket(path)
        return str(path).rstrip("/")
    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    return path


def join(path: str, *parts: str) -> str:
    return "/".join([str(path).rstrip("/"), *parts]) if is_remote(path) else os.path.join(path, *parts)


class _RemoteAppend:
    """Append-mode file on an object store: the object is rewritten with everything at each flush."""

    def __init__(self, path: str, binary: bool):
        self._path = epath.Path(path)
        self._binary = binary
        self._buf = io.BytesIO()
        if self._path.exists():
            self._buf.write(self._path.read_bytes())

    def write(self, data) -> int:
        return self._buf.write(data if self._binary else data.encode())

    def flush(self) -> None:
        self._path.write_bytes(self._buf.getvalue())

    def close(self) -> None:
        self.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_append(path: str, binary: bool = False):
    """A file opened for appending (text, or bytes with ``binary``) that works on gs:// as well;
    what is written is durable after ``flush()``."""
    if is_remote(path):
        return _RemoteAppend(path, binary)
    return open(path, "ab" if binary else "a")


def write_text(path: str, text: str) -> None:
    epath.Path(path).write_text(text)


def read_text(path: str) -> str:
    return epath.Path(path).read_text()


def exists(path: str) -> bool:
    return epath.Path(path).exists()


def jsonl_lines(path: str, what: str = "JSONL file") -> list[tuple[int, str]]:
    """(line number from 1, text) of every non-blank line of a JSONL file, local or gs://; a missing
    file raises FileNotFoundError naming ``what`` it is. Lines end at "\n" only (JSON strings may hold
    U+2028, which str.splitlines would also split at)."""
    if not exists(path):
        raise FileNotFoundError(f"{what} {path}: no such file.")
    return [(n, line) for n, line in enumerate(read_text(path).split("\n"), 1) if line.strip()]


def read_jsonl(path: str, what: str = "JSONL file") -> list[dict]:
    """The JSON object of every non-blank line; a missing file, or a line that is not a JSON object,
    raises naming the file and the line."""
    rows = []
    for n, line in jsonl_lines(path, what):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {n}: not JSON ({e}).") from e
        if not isinstance(row, dict):
            raise ValueError(f"{path} line {n}: not a JSON object ({line.strip()[:80]!r}).")
        rows.append(row)
    return rows


def save_figure(fig, path: str, **kw) -> None:
    """matplotlib ``fig.savefig`` to a local or remote path (format from the extension)."""
    buf = io.BytesIO()
    fig.savefig(buf, format=os.path.splitext(path)[1].lstrip(".") or "png", **kw)
    epath.Path(path).write_bytes(buf.getvalue())
