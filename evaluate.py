"""Evaluate a model folder (docs/evaluation.md):

    python3 evaluate.py humaneval --model PATH [options]   HumanEval pass@k, candidates run in a sandbox
    python3 evaluate.py held-out --model PATH [options]    held-out loss and parse rate of completions (docs/demo.md)
    python3 evaluate.py [--model PATH] [options]           no command: held-out, as before evaluate.py had commands

`python3 evaluate.py COMMAND --help` lists a command's options. Without --model: the embedded demo model.
"""

import os
import signal
import sys

from replit_tools.commands import held_out_arguments, humaneval_arguments


def humaneval(argv: list[str]) -> int:
    args = humaneval_arguments(argv)  # --help and a bad command line answer before torch loads
    from replit_tools.humaneval import run_command

    return run_command(args)


def held_out(argv: list[str]) -> int:
    args = held_out_arguments(argv)
    from replit_tools.evaluation import run_command

    return run_command(args)


COMMANDS = {"humaneval": humaneval, "held-out": held_out}
TERMINATING = (signal.SIGTERM, signal.SIGHUP)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised as Ctrl+C's KeyboardInterrupt is, so that the same cleanup runs: the sandbox's
    processes are killed and its directories removed, where the signal's default action left them behind."""


def terminate(signum, _frame):
    for other in TERMINATING:  # a second one (systemd sends SIGHUP after SIGTERM) must not cut the cleanup short
        signal.signal(other, signal.SIG_IGN)
    raise Terminated(signum)


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        print(f"error: unknown command {argv[0]!r}: use {' or '.join(COMMANDS)} (see --help)", file=sys.stderr)
        return 2
    command, argv = (COMMANDS[argv[0]], argv[1:]) if argv and argv[0] in COMMANDS else (COMMANDS["held-out"], argv)
    previous = {signum: signal.signal(signum, terminate) for signum in TERMINATING}
    try:
        return command(argv)
    except KeyboardInterrupt as interrupt:
        signum = interrupt.args[0] if isinstance(interrupt, Terminated) else signal.SIGINT
        print(f"error: {'interrupted' if signum == signal.SIGINT else signal.Signals(signum).name}", file=sys.stderr)
        return 128 + signum
    except BrokenPipeError:  # the reader left (`| head`): no error, and nothing more to write at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a shell reports a process ended by SIGPIPE
    finally:
        for signum, handler in previous.items():  # main() may be called in a process that has its own
            signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
