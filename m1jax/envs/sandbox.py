"""Run untrusted Python (a completion's program) in a separate, limited, throwaway process.

``run_python(code, stdin, limits)`` never raises for anything the program does: a crash, a timeout,
a memory hog, a fork bomb, endless output, writes outside its directory or network use end in a
``Result`` whose status is not "ok", and the run leaves no process and no file behind.

What is guaranteed depends on the privileges of the trainer (``isolation()`` says which applies):

Always (any user):
  * a fresh process (a launcher that sets the limits, then execs the program with ``python -I -S``:
    no site-packages, no PYTHON* variables), in its own session; no inherited file descriptors; a
    minimal environment (PATH, HOME and TMPDIR = its directory, LANG);
  * limits: CPU seconds (RLIMIT_CPU), wall seconds (killed), address space (RLIMIT_AS), bytes of
    stdout/stderr read (killed beyond), largest file written (RLIMIT_FSIZE), open files, processes;
  * a new temporary working directory, deleted afterwards, with the program and its stdin in it.

"namespaces" (the trainer runs as root, e.g. in a container):
  * the program runs as a dedicated unprivileged uid (one per concurrent run): RLIMIT_NPROC is
    enforced (a fork bomb stops at ``limits.processes``); files of other users that are not
    world-writable cannot be written; afterwards every process of that uid is killed;
  * a new PID namespace (the program is its init: when it dies all its descendants die, even ones
    that left its session), a new network namespace (no interfaces but a down loopback: no network),
    a new mount namespace with fresh tmpfs over /tmp, /var/tmp, /dev/shm (writes there vanish with
    the run) and an empty read-only tmpfs over ``limits.hide`` (default: the trainer's working
    directory, so the repository, checkpoints and data under it are not reachable; a hidden path
    under /tmp is made again in the fresh /tmp, so it reads the same wherever the clone lives).
  Reads of world-readable system files (e.g. /usr) remain possible.

"basic" (not root): network is refused by a Python-level guard (socket creation raises) that a
determined program can bypass (e.g. ctypes); file writes outside the directory are NOT blocked; the
process limit counts the trainer's own processes plus ``limits.processes``; cleanup kills the
run's process group and any process still in its session (one that calls setsid() itself can escape).
Run untrusted code as root-in-a-container (or in a VM) to get the first set of guarantees.
"""

from __future__ import annotations

import dataclasses
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

# The program's interpreter: readable by an unprivileged uid (not a venv under /root), stdlib only.
SANDBOX_PYTHON = os.environ.get("M1JAX_SANDBOX_PYTHON") or next(
    (p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.access(p, os.X_OK)), sys.executable)
EXIT_SETUP_FAILED = 97


@dataclasses.dataclass(frozen=True)
class Limits:
    cpu_s: int = 2  # CPU seconds (SIGXCPU, then SIGKILL one second later)
    wall_s: float = 5.0  # wall-clock seconds before the run is killed
    memory_mb: int = 256  # address space of each process
    output_bytes: int = 1 << 16  # stdout and stderr each; more kills the run
    file_bytes: int = 1 << 20  # largest file it may write
    open_files: int = 64
    processes: int = 16  # processes/threads it may run at once
    hide: tuple[str, ...] | None = None  # paths to cover ("namespaces" only); None: the trainer's cwd

    def __post_init__(self):
        for k in ("cpu_s", "wall_s", "memory_mb", "output_bytes", "file_bytes", "open_files", "processes"):
            if getattr(self, k) <= 0:
                raise ValueError(f"sandbox Limits.{k} must be > 0, got {getattr(self, k)}.")


@dataclasses.dataclass(frozen=True)
class Result:
    status: str  # "ok" | "error" (non-zero exit, crash) | "timeout" | "output_limit"
    returncode: int | None  # the exit code; killed by signal n: -n ("basic") or 128 + n ("namespaces")
    stdout: str
    stderr: str
    wall_s: float


def isolation() -> str:
    """"namespaces" when running as root (see the module docstring), else "basic". The environment
    variable M1JAX_SANDBOX=basic forces "basic" (to test it)."""
    return "namespaces" if os.geteuid() == 0 and os.environ.get("M1JAX_SANDBOX") != "basic" else "basic"


# The launcher runs as a separate process (no fork-with-threads hazards in the trainer): it enters
# the namespaces, sets the limits, drops to the run's uid and execs the program.
_LAUNCHER = r"""
import ctypes, json, os, resource, signal, sys
cfg = json.loads(sys.argv[1])
def fail(msg):
    os.write(2, ("sandbox setup failed: " + msg + "\n").encode()); os._exit(%d)
if cfg["uid"] is not None:
    libc = ctypes.CDLL(None, use_errno=True)
    NEWNS, NEWNET, NEWPID = 0x00020000, 0x40000000, 0x20000000
    if libc.unshare(NEWNS | NEWNET | NEWPID) != 0:
        fail("unshare: errno %%d" %% ctypes.get_errno())
    def mount(src, dst, fstype, flags, data):
        if libc.mount(src.encode(), dst.encode(), fstype and fstype.encode(), flags, data and data.encode()) != 0:
            fail("mount %%s: errno %%d" %% (dst, ctypes.get_errno()))
    mount("none", "/", None, 0x4000 | 0x40000, None)  # MS_REC | MS_PRIVATE: nothing propagates out
    here, workdir = os.open(".", os.O_RDONLY | os.O_DIRECTORY), os.getcwd()
    for d in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(d):
            mount("tmpfs", d, "tmpfs", 0x2 | 0x4, "size=16m,mode=1777")  # nosuid, nodev
    os.makedirs(workdir, exist_ok=True)  # the run's directory, bound back at its path in the new /tmp
    mount("/proc/self/fd/%%d" %% here, workdir, None, 0x1000, None)  # MS_BIND
    os.close(here)
    for d in cfg["hide"]:
        if not os.path.isdir(d):  # it was under /tmp (now a fresh tmpfs): make it there, then cover it
            try:
                os.makedirs(d)
            except OSError:
                continue  # under a directory hidden already
        mount("tmpfs", d, "tmpfs", 0x1 | 0x2 | 0x4, "size=4k,mode=755")  # read-only, empty
    def relay(pid):  # wait for pid and exit as it did (killed by signal n: exit code 128 + n)
        _, status = os.waitpid(pid, 0)
        os._exit(128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))
    if os.fork():  # the launcher relays; its child is pid 1 of the new PID namespace
        relay(-1)
    os.chdir(workdir)
    child = os.fork()  # pid 1 only reaps: signals to the program keep their usual effect
    if child:
        relay(child)
for name, value in cfg["rlimits"].items():
    resource.setrlimit(getattr(resource, name), tuple(value))
if cfg["uid"] is not None:
    os.setgroups([]); os.setgid(cfg["uid"]); os.setuid(cfg["uid"])
os.execve(cfg["argv"][0], cfg["argv"], cfg["env"])
""" % EXIT_SETUP_FAILED

# "basic" only: refuse sockets before running the program (bypassable, see the module docstring).
_NO_SOCKETS = r"""
import runpy, socket, sys
def _refused(*a, **k):
    raise OSError("network access is disabled in the sandbox")
for _n in ("socket", "create_connection", "socketpair", "fromfd", "create_server", "getaddrinfo"):
    setattr(socket, _n, _refused)
sys.argv = ["main.py"]
runpy.run_path("main.py", run_name="__main__")
"""


class _UidPool:
    """Dedicated uids for concurrent runs (64000 + slot, a range unused by system accounts)."""

    def __init__(self, base: int = 64000, size: int = 32):
        self._free = list(range(base, base + size))
        self._cv = threading.Condition()

    def acquire(self) -> int:
        with self._cv:
            self._cv.wait_for(lambda: self._free)
            return self._free.pop()

    def release(self, uid: int):
        with self._cv:
            self._free.append(uid)
            self._cv.notify()


_UIDS = _UidPool()


def _tasks_of(uid: int) -> int:
    """Processes + threads owned by ``uid`` (what RLIMIT_NPROC counts)."""
    n = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            if int(fields["Uid"].split()[0]) == uid:
                n += int(fields["Threads"])
        except (OSError, KeyError, ValueError):
            continue
    return n


def _pids_in_session(sid: int) -> list[int]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getsid(int(pid)) == sid:
                out.append(int(pid))
        except OSError:
            continue
    return out


def _kill_uid(uid: int):
    """SIGKILL every process of ``uid``: kill(-1) from a helper running as that uid is atomic with
    respect to fork (no new process of the uid can appear while it runs)."""
    subprocess.run([sys.executable, "-I", "-S", "-c",
                    f"import os\nos.setgroups([]); os.setgid({uid}); os.setuid({uid})\n"
                    "try:\n    os.kill(-1, 9)\nexcept ProcessLookupError:\n    pass"],
                   check=True, close_fds=True, env={}, timeout=30)


def run_python(code: str, stdin: str = "", limits: Limits = Limits()) -> Result:
    """Run ``code`` as ``main.py`` with ``stdin`` on its standard input. Never raises for what the
    program does; raises RuntimeError only if the sandbox itself cannot be set up."""
    ns = isolation() == "namespaces"
    uid = _UIDS.acquire() if ns else None
    workdir = tempfile.mkdtemp(prefix="m1jax-sandbox-")
    try:
        with open(os.path.join(workdir, "main.py"), "w") as f:
            f.write(code)
        with open(os.path.join(workdir, "stdin.txt"), "w") as f:
            f.write(stdin)
        if ns:
            for p in (workdir, *(os.path.join(workdir, n) for n in ("main.py", "stdin.txt"))):
                os.chown(p, uid, uid)
        hide = [os.path.realpath(p) for p in (limits.hide if limits.hide is not None else (os.getcwd(),))]
        if "/" in hide:
            raise ValueError("sandbox Limits.hide covers '/': run the trainer from its own directory or pass "
                             "Limits(hide=(...)) naming the directories to cover.")
        hide = [d for d in hide if os.path.isdir(d)]
        if ns and any(os.path.commonpath([d, os.path.realpath(workdir)]) == d for d in hide):
            raise ValueError(f"sandbox: the run's directory {workdir} is inside a hidden path ({hide}); set TMPDIR "
                             "to a directory outside the trainer's working directory.")
        nproc = limits.processes if ns else _tasks_of(os.getuid()) + limits.processes
        mem = limits.memory_mb << 20
        cfg = {
            "uid": uid,
            "hide": hide,
            "rlimits": {"RLIMIT_CPU": [limits.cpu_s, limits.cpu_s + 1], "RLIMIT_AS": [mem, mem],
                        "RLIMIT_FSIZE": [limits.file_bytes] * 2, "RLIMIT_NOFILE": [limits.open_files] * 2,
                        "RLIMIT_NPROC": [nproc, nproc], "RLIMIT_CORE": [0, 0]},
            "argv": [SANDBOX_PYTHON, "-I", "-S", "-B"] + (["main.py"] if ns else ["-c", _NO_SOCKETS]),
            "env": {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"},
        }
        with open(os.path.join(workdir, "stdin.txt"), "rb") as stdin_f:
            return _supervise([sys.executable, "-I", "-S", "-c", _LAUNCHER, json.dumps(cfg)], workdir, stdin_f,
                              limits, uid)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if uid is not None:
            _UIDS.release(uid)


def _supervise(argv, workdir, stdin_f, limits: Limits, uid) -> Result:
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=workdir, stdin=stdin_f, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, close_fds=True, env={})
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    bufs = {out_fd: bytearray(), err_fd: bytearray()}
    open_fds = set(bufs)
    status = None
    try:
        while open_fds:
            left = limits.wall_s - (time.perf_counter() - t0)
            if left <= 0:
                status = "timeout"
                break
            ready, _, _ = select.select(list(open_fds), [], [], min(left, 0.05))
            for fd in ready:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    open_fds.discard(fd)
                bufs[fd] += chunk
                if len(bufs[fd]) > limits.output_bytes:
                    status = "output_limit"
            if status:
                break
            if not ready and proc.poll() is not None:
                break  # exited; a leftover child may hold the pipes open: not our business
    finally:
        if uid is not None:
            _kill_uid(uid)  # the program (pid-namespace init) and everything of its uid
            try:
                proc.wait(timeout=5)  # the launcher exits once the namespace's processes are gone
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the session's process group
        except ProcessLookupError:
            pass
        for pid in ([] if uid is not None else _pids_in_session(proc.pid)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    rc = proc.returncode
    if rc == EXIT_SETUP_FAILED and b"sandbox setup failed" in bufs[err_fd]:
        raise RuntimeError(bufs[err_fd].decode(errors="replace").strip())
    if status is None:
        status = "ok" if rc == 0 else ("timeout" if rc in (-signal.SIGXCPU, 128 + signal.SIGXCPU) else "error")
    cap = limits.output_bytes
    out, err = (bytes(bufs[fd][:cap]).decode(errors="replace") for fd in (out_fd, err_fd))
    return Result(status, rc, out, err, time.perf_counter() - t0)
