"""2 processes x 4 CPU devices (jax.distributed on localhost, gloo collectives) train like 1 x 8."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

WORKER = os.path.join(os.path.dirname(__file__), "multiprocess_worker.py")


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _losses(out: str):
    line = [l for l in out.splitlines() if l.startswith("LOSSES ")][-1]
    return json.loads(line[len("LOSSES "):])


def test_two_processes_match_one():
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    single = subprocess.run([sys.executable, WORKER, "1", "0", "8"], capture_output=True, text=True, env=env,
                            timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, WORKER, "2", str(i), "4", port], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, e[-3000:]
    ref = _losses(single.stdout)
    assert ref["devices"] == 8 and ref["processes"] == 1
    for o, _ in outs:
        got = _losses(o)
        assert got["processes"] == 2 and got["devices"] == 8
        np.testing.assert_allclose(got["losses"], ref["losses"], rtol=1e-5)
    assert ref["losses"][-1] < ref["losses"][0]  # it trains
