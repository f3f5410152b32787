"""Evaluate a model folder (docs/evaluation.md):

    python3 evaluate.py humaneval --model PATH [options]   HumanEval pass@k, candidates run in a sandbox
    python3 evaluate.py held-out --model PATH [options]    held-out loss and parse rate of completions (docs/demo.md)
    python3 evaluate.py [--model PATH] [options]           no command: held-out, as before evaluate.py had commands

`python3 evaluate.py COMMAND --help` lists a command's options. Without --model: the embedded demo model.
"""

import sys

try:  # torch and transformers take seconds to import: Ctrl-C then is no error either
    from replit_tools import evaluation, humaneval
except KeyboardInterrupt:
    sys.exit(130)

COMMANDS = {"humaneval": humaneval.main, "held-out": evaluation.main}


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        print(f"error: unknown command {argv[0]!r}: use {' or '.join(COMMANDS)} (see --help)", file=sys.stderr)
        return 2
    command, argv = (COMMANDS[argv[0]], argv[1:]) if argv and argv[0] in COMMANDS else (evaluation.main, argv)
    try:
        return command(argv)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
