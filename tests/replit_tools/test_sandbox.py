"""replit_tools/sandbox.py: each program in a process of its own, with limits. A runaway (endless loop, huge
allocation), a shell command, a subprocess or a network connection is contained and reported as a failure with
its reason, and the test process goes on."""

import os
import resource
import shutil
import socket
import subprocess
import sys
import time

import pytest
from conftest import ROOT

from replit_tools import sandbox
from replit_tools.sandbox import Limits, run_program, run_programs

FAST = Limits(timeout=1.5, memory_mb=256)


def test_a_program_that_runs_to_its_end_passes_and_an_exception_fails_with_its_message():
    assert run_program("assert sum([1, 2]) == 3\nprint('output is swallowed')", FAST) == sandbox.Outcome(True, "passed")
    outcome = run_program("def f():\n    return None\nassert f() == 1, 'wrong answer'", FAST)
    assert not outcome.passed and outcome.result == "failed: AssertionError: wrong answer"
    outcome = run_program("def f(:\n    pass", FAST)
    assert not outcome.passed and outcome.result.startswith("failed: SyntaxError")


def test_an_endless_loop_is_stopped_at_the_time_limit():
    started = time.perf_counter()
    outcome = run_program("while True:\n    pass", Limits(timeout=1.0))
    assert not outcome.passed and outcome.result.startswith("timed out")
    assert time.perf_counter() - started < 5


def test_a_sleeping_program_is_stopped_by_the_wall_clock_and_its_children_with_it():
    outcome = run_program("import time\ntime.sleep(60)", Limits(timeout=1.0))
    assert outcome == sandbox.Outcome(False, "timed out (wall clock, 1 s)")


def test_a_huge_allocation_is_a_memory_error_and_the_test_process_survives():
    outcome = run_program("x = bytearray(64 * 2**30)", FAST)
    assert outcome == sandbox.Outcome(False, "failed: memory limit: MemoryError")
    outcome = run_program("x = []\nwhile True:\n    x.append(' ' * 2**20)", FAST)  # grows until the limit
    assert outcome == sandbox.Outcome(False, "failed: memory limit: MemoryError")
    assert run_program("x = bytearray(64 * 2**20)", FAST).passed  # 64 MB fits under 256 MB


@pytest.mark.parametrize(
    "code, blocked",
    [
        ("import os\nos.system('touch {marker}')", "os.system"),
        ("import subprocess\nsubprocess.run(['touch', '{marker}'])", "subprocess.run"),
        ("import subprocess\nsubprocess.Popen(['touch', '{marker}']).wait()", "subprocess.Popen"),
        ("import os\nos.execv('/usr/bin/touch', ['touch', '{marker}'])", "os.execv"),
        ("import os\nif os.fork() == 0:\n    open('{marker}', 'w').close()", "os.fork"),
        # os's functions are posix's: the originals stay reachable there unless guarded too.
        ("import posix\nposix.system('touch {marker}')", "posix.system"),
        ("import posix\nif posix.fork() == 0:\n    open('{marker}', 'w').close()", "posix.fork"),
        ("import os\nos.posix_spawn('/usr/bin/touch', ['touch', '{marker}'], {{}})", "os.posix_spawn"),
        # An `except Exception:` in the candidate does not hide the block.
        ("import os\ntry:\n    os.system('touch {marker}')\nexcept Exception:\n    pass", "os.system"),
    ],
)
def test_shell_commands_and_subprocesses_are_blocked(tmp_path, code, blocked):
    marker = tmp_path / "created-by-the-candidate"
    outcome = run_program(code.format(marker=marker), FAST)
    assert outcome == sandbox.Outcome(False, f"failed: blocked: {blocked} is disabled in the sandbox")
    assert not marker.exists()


@pytest.fixture
def listening_server():
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.5)
    yield server
    server.close()


def assert_no_connection_arrived(server):
    with pytest.raises(socket.timeout):
        server.accept()


def test_a_network_connection_to_localhost_is_blocked(listening_server):
    port = listening_server.getsockname()[1]
    code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'x')"
    outcome = run_program(code, FAST)
    assert outcome == sandbox.Outcome(False, "failed: blocked: network access is disabled in the sandbox")
    code = f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=1)"
    assert run_program(code, FAST).result == "failed: blocked: network access is disabled in the sandbox"
    assert_no_connection_arrived(listening_server)


def test_without_the_socket_guard_the_network_namespace_still_has_no_network(listening_server):
    """The guard can be undone (the original socket type is in the replacement's MRO); the network namespace,
    where this system allows one, cannot be left."""
    if "--net" not in sandbox.namespaces():
        pytest.skip("unshare --net is not available here: the socket guard is the only network protection")
    port = listening_server.getsockname()[1]
    code = (f"import socket\nraw = socket.socket.__mro__[2](socket.AF_INET, socket.SOCK_STREAM)\nraw.settimeout(1)\n"
            f"raw.connect(('127.0.0.1', {port}))\nraw.sendall(b'x')")  # fmt: skip
    outcome = run_program(code, FAST)
    assert not outcome.passed and outcome.result.startswith("failed: OSError"), outcome
    assert_no_connection_arrived(listening_server)


def test_each_program_runs_in_a_fresh_temporary_directory_that_is_removed(tmp_path):
    code = ("import os\nassert os.listdir('.') == [], os.listdir('.')\nopen('left-behind', 'w').write('x')\n"
            "os.mkdir('sub')\nraise RuntimeError(os.getcwd())")  # fmt: skip
    first, second = run_program(code, FAST), run_program(code, FAST)
    directories = [outcome.result.removeprefix("failed: RuntimeError: ") for outcome in (first, second)]
    assert directories[0] != directories[1]
    for directory in directories:
        assert os.path.basename(directory).startswith("replit-sandbox-") and not os.path.exists(directory)
    assert os.getcwd() not in directories


def test_a_program_that_ends_its_process_early_does_not_pass():
    assert run_program("import os\nos._exit(0)", FAST) == sandbox.Outcome(
        False, "failed: the program ended the process without a result"
    )
    assert run_program("import sys\nsys.exit(0)", FAST) == sandbox.Outcome(False, "failed: SystemExit: 0")


def test_programs_run_in_parallel_and_come_back_in_order():
    programs = [f"import time\ntime.sleep(1)\nassert {i} % 2 == 0" for i in range(4)]
    started = time.perf_counter()
    outcomes = run_programs(programs, FAST, workers=4)
    assert [outcome.passed for outcome in outcomes] == [True, False, True, False]
    assert time.perf_counter() - started < 3.5  # not one after the other (4 s at least)


def test_a_folder_tree_too_deep_for_rmtree_is_removed_and_the_outcome_kept():
    """shutil.rmtree recurses once per level: 3000 levels made it raise RecursionError, which ended the evaluation."""
    code = ("import os\nfd = os.open('.', os.O_RDONLY)\nfor _ in range(3000):\n    os.mkdir('d', dir_fd=fd)\n"
            "    fd = os.open('d', os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)\nraise RuntimeError(os.getcwd())")
    outcome = run_program(code, FAST)
    assert outcome.result.startswith("failed: RuntimeError: ")
    assert not os.path.exists(outcome.result.removeprefix("failed: RuntimeError: "))


def test_a_program_that_floods_the_result_pipe_fails_without_the_parent_holding_it_all():
    """The parent read the whole pipe into memory: gigabytes from a program that found the result fd."""
    code = ("import os\nchunk = b'x' * 2**20\nfor fd in range(3, 10):\n    try:\n        for _ in range(256):\n"
            "            os.write(fd, chunk)\n    except OSError:\n        pass")  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    outcome = run_program(code, FAST)
    assert outcome == sandbox.Outcome(False, "failed: the program wrote more than 64 KiB on the result pipe")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 * 1024


def test_a_process_that_leaves_the_group_does_not_hold_the_evaluation_past_the_timeout():
    """A grandchild in a session of its own escapes the process group's kill and holds the result pipe open: the
    parent waited for it to close."""
    code = ("import ctypes, time\nlibc = ctypes.CDLL(None)\nif libc.fork() == 0:\n    libc.setsid()\n"
            "time.sleep(30)")  # fmt: skip
    started = time.perf_counter()
    outcome = run_program(code, Limits(timeout=1.0))
    assert outcome == sandbox.Outcome(False, "timed out (wall clock, 1 s)")
    assert time.perf_counter() - started < 3


def test_in_a_pid_namespace_a_process_that_left_the_group_dies_with_the_program(tmp_path):
    """Killing the process group misses a grandchild that called setsid; the PID namespace's end does not."""
    if "--pid" not in sandbox.namespaces():
        pytest.skip("unshare --pid is not available here: such a process outlives the program")
    marker = tmp_path / "written-by-the-grandchild"
    code = (f"import ctypes, time\nlibc = ctypes.CDLL(None)\nif libc.fork() == 0:\n    libc.setsid()\n"
            f"    time.sleep(1.5)\n    open({str(marker)!r}, 'w').close()\ntime.sleep(30)")  # fmt: skip
    assert run_program(code, Limits(timeout=0.5)).result == "timed out (wall clock, 0.5 s)"
    time.sleep(2)
    assert not marker.exists()


def under_hard_limits(script: str, **hard_limits: int) -> str:
    """What `script` prints, run (with the sandbox imported) in a process whose hard limits were lowered as a
    shell's `ulimit -H` lowers them: RLIMIT_AS=bytes, RLIMIT_CPU=seconds."""
    lower = "".join(f"resource.setrlimit(resource.{name}, ({value}, {value}))\n" for name, value in hard_limits.items())
    code = f"import resource\nfrom replit_tools.sandbox import *\n{lower}{script}"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    return done.stdout + done.stderr


def test_limits_above_the_evaluator_s_hard_limits_are_lowered_to_them():
    """setrlimit cannot raise a hard limit: under `ulimit -Hv 512M` or `ulimit -Ht 5` every program failed, the
    canonical solutions too."""
    script = ("limits = Limits(timeout=10, memory_mb=1024)\nprint(run_program('pass', limits))\n"
              "print(run_program('x = bytearray(600 * 2**20)', limits))")  # fmt: skip
    output = under_hard_limits(script, RLIMIT_AS=512 * 2**20, RLIMIT_CPU=5)
    assert output.splitlines() == [repr(sandbox.Outcome(True, "passed")),
                                   repr(sandbox.Outcome(False, "failed: memory limit: MemoryError"))], output


def test_a_sandbox_that_cannot_run_programs_is_an_error_not_failed_programs(monkeypatch):
    with pytest.raises(sandbox.SandboxError, match="the sandbox could not set its limits: OverflowError"):
        run_program("pass", Limits(memory_mb=2**44))  # 2**64 bytes: more than setrlimit takes
    with pytest.raises(sandbox.SandboxError, match="the sandbox could not set its limits"):
        sandbox.check(Limits(memory_mb=2**44))
    sandbox.check(FAST)
    # An interpreter that runs nothing. (Not a tiny inherited RLIMIT_AS: the evaluator itself then failed to
    # allocate, at a point that depended on its memory, before the child could.)
    monkeypatch.setattr(sys, "executable", shutil.which("false"))
    with pytest.raises(sandbox.SandboxError, match="the sandbox cannot run even an empty program here: failed: "):
        sandbox.check(FAST)
