"""The code sandbox: every hostile program scores a non-"ok" Result and leaves nothing behind.

Runs under the isolation this process gets (``sandbox.isolation()``; root in CI containers gives
"namespaces"); tests of guarantees that only "namespaces" gives are skipped otherwise. The "basic"
tier's own guarantees are tested by forcing it (M1JAX_SANDBOX=basic) for the programs that are safe
to run without a process limit.
"""

import os
import socket
import tempfile
import threading

import pytest

from m1jax.envs import sandbox
from m1jax.envs.sandbox import Limits, run_python

FAST = Limits(cpu_s=1, wall_s=3.0, memory_mb=256, output_bytes=4096, processes=8)
NAMESPACES = sandbox.isolation() == "namespaces"
needs_ns = pytest.mark.skipif(not NAMESPACES, reason="needs the 'namespaces' isolation (root)")


def _sandbox_dirs():
    return {n for n in os.listdir(tempfile.gettempdir()) if n.startswith("m1jax-sandbox-")}


def _session_pids_and_sandbox_uids():
    """Processes of the sandbox uids, and processes (other than us) in sessions we did not start."""
    uids = set(range(64000, 64032))
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if int(fields["Uid"].split()[0]) in uids or "m1jax-sandbox" in open(f"/proc/{pid}/cmdline").read():
            found.append((pid, fields["Name"].strip(), fields["State"].strip()))
    return found


@pytest.fixture(autouse=True)
def nothing_left_behind():
    before = _sandbox_dirs()
    yield
    assert _sandbox_dirs() - before == set(), "a sandbox directory was not deleted"
    assert _session_pids_and_sandbox_uids() == [], "a sandboxed process survived"


def test_ok_program_reads_stdin_in_its_own_directory():
    r = run_python("import os\nprint(input()[::-1], sorted(os.listdir('.')), os.environ.get('HOME') == os.getcwd())",
                   "abc", FAST)
    assert (r.status, r.returncode) == ("ok", 0)
    assert r.stdout == "cba ['main.py', 'stdin.txt'] True\n"


def test_crash_is_an_error_with_its_traceback():
    r = run_python("1 / 0", "", FAST)
    assert r.status == "error" and r.returncode != 0 and "ZeroDivisionError" in r.stderr
    r = run_python("import os; os.abort()", "", FAST)  # a hard crash (SIGABRT)
    assert r.status == "error" and r.returncode in (-6, 128 + 6)


def test_cpu_and_wall_timeouts():
    r = run_python("while True: pass", "", FAST)
    assert r.status == "timeout" and r.wall_s < FAST.wall_s + 2
    r = run_python("import time; time.sleep(60)", "", FAST)  # no CPU used: the wall clock stops it
    assert r.status == "timeout" and FAST.wall_s <= r.wall_s < FAST.wall_s + 2


def test_infinite_output_is_cut():
    r = run_python("while True: print('x' * 1000)", "", FAST)
    assert r.status == "output_limit" and len(r.stdout) == FAST.output_bytes


def test_memory_hog_fails_inside_its_limit():
    r = run_python("x = bytearray(1 << 30)", "", FAST)  # 1 GiB > 256 MiB address space
    assert r.status == "error" and "MemoryError" in r.stderr


def test_network_attempt_reaches_nothing():
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    port = server.getsockname()[1]
    accepted = []

    def accept():
        try:
            accepted.append(server.accept())
        except OSError:
            pass

    code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'leak')"
    r = run_python(code, "", FAST)
    accept()
    server.close()
    assert r.status == "error" and r.returncode != 0 and "OSError" in r.stderr and not accepted
    if NAMESPACES:  # a real network namespace: even the C-level socket module reaches nothing
        r = run_python(f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))", "", FAST)
        assert r.status == "error" and "Network is unreachable" in r.stderr


@needs_ns
def test_fork_bomb_is_capped_and_killed():
    r = run_python("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass", "", FAST)
    assert r.status == "timeout"  # the bomb hit the process limit, kept trying, and was killed at wall_s
    # the autouse fixture checks that not one of its processes is left


@needs_ns
def test_escaped_grandchild_dies_with_the_run():
    code = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nprint('parent done')"
    r = run_python(code, "", FAST)
    assert r.status == "ok" and r.stdout == "parent done\n"


@needs_ns
def test_writes_outside_its_directory_are_blocked_or_undone(tmp_path):
    repo = os.getcwd()  # the trainer's working directory: hidden (an empty read-only tmpfs)
    scratch = os.path.join(tempfile.gettempdir(), f"m1jax-test-escape-{os.getpid()}")
    code = f"""
import os
print(os.listdir({repo!r}))
for path in ({os.path.join(repo, 'escape.txt')!r}, {str(tmp_path / 'escape.txt')!r}, '/etc/escape.txt'):
    try:
        open(path, 'w').write('x')
        print('wrote', path)
    except OSError as e:
        print('blocked', type(e).__name__)
open({scratch!r}, 'w').write('x')  # world-writable /tmp: a private tmpfs, gone after the run
print('tmp ok')
"""
    r = run_python(code, "", FAST)
    assert r.status == "ok", r.stderr
    # repo: read-only tmpfs (EROFS); tmp_path: under the host's /tmp, which the run cannot see; /etc: not its uid's
    assert r.stdout.splitlines() == ["[]", "blocked OSError", "blocked FileNotFoundError", "blocked PermissionError",
                                     "tmp ok"]
    assert not os.path.exists(os.path.join(repo, "escape.txt"))
    assert not (tmp_path / "escape.txt").exists() and not os.path.exists("/etc/escape.txt")
    assert not os.path.exists(scratch)


@needs_ns
def test_a_project_and_venv_under_tmp_are_hidden_too():
    """A clone under /tmp with its venv there too: the fresh /tmp of the run must still show the project
    as an empty read-only directory (not a missing one) and keep the run's own directory."""
    import json
    import site
    import subprocess
    import sys

    base = tempfile.mkdtemp()  # mode 700, like any mktemp -d clone
    try:
        project = os.path.join(base, "clone")
        os.makedirs(project)
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", os.path.join(base, "venv")], check=True)
        code = (f"import os\nprint(os.listdir({project!r}))\n"
                f"try:\n    open({os.path.join(project, 'escape.txt')!r}, 'w')\n"
                "except OSError as e:\n    print(type(e).__name__, e.errno)\n")
        driver = ("import json, sys\nfrom m1jax.envs.sandbox import Limits, run_python\n"
                  f"r = run_python({code!r}, '', Limits(wall_s=10))\nprint(json.dumps([r.status, r.stdout, r.stderr]))")
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {"PATH": os.environ["PATH"], "PYTHONPATH": os.pathsep.join([repo, *site.getsitepackages()])}
        res = subprocess.run([os.path.join(base, "venv", "bin", "python"), "-c", driver], cwd=project, env=env,
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        status, out, err = json.loads(res.stdout.splitlines()[-1])
        assert (status, out) == ("ok", "[]\nOSError 30\n"), err  # EROFS: hidden, read-only
        assert not os.path.exists(os.path.join(project, "escape.txt"))
    finally:
        import shutil

        shutil.rmtree(base)


def test_concurrent_runs_are_independent():
    results = [None] * 6

    def one(i):
        results[i] = run_python(f"print({i} * 7)", "", FAST)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.stdout for r in results] == [f"{i * 7}\n" for i in range(6)]


def test_basic_isolation_still_limits_and_cleans_up(monkeypatch):
    monkeypatch.setenv("M1JAX_SANDBOX", "basic")
    assert sandbox.isolation() == "basic"
    assert run_python("print(input())", "hi", FAST).stdout == "hi\n"
    assert run_python("while True: pass", "", FAST).status == "timeout"
    assert run_python("x = bytearray(1 << 30)", "", FAST).status == "error"
    r = run_python("import socket\nsocket.create_connection(('127.0.0.1', 9))", "", FAST)
    assert r.status == "error" and "network access is disabled" in r.stderr


def test_bad_limits_are_refused():
    with pytest.raises(ValueError, match="cpu_s"):
        Limits(cpu_s=0)
