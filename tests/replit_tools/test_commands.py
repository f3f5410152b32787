"""The command lines of the entry points (replit_tools/commands.py, options.py): read before torch loads."""

import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.parametrize("command", [["serve.py"], ["export.py"], ["evaluate.py"], ["evaluate.py", "humaneval"],
                                     ["evaluate.py", "held-out"], ["generate.py"]])  # fmt: skip
def test_every_entry_point_answers_help_before_torch_loads(command):
    """`--help` (and so a bad command line, read by the same parser first) answers without importing torch, which
    takes seconds: the parsers live in replit_tools/commands.py and options.py."""
    script = (
        "import runpy, sys\n"
        f"sys.argv = {command + ['--help']!r}\n"
        "try:\n"
        f"    runpy.run_path({command[0]!r}, run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    assert exit.code in (0, None), exit.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "usage" in done.stdout.lower() or "evaluate.py" in done.stdout
