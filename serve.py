"""Serve replit-code-v1-3b over an OpenAI-compatible HTTP API: `python3 serve.py --port 8000` (see docs/serving.md)."""

import sys

from replit_tools.commands import server_arguments

if __name__ == "__main__":
    args = server_arguments()  # --help and a bad command line answer before torch loads
    try:  # torch and transformers take seconds to import: Ctrl-C then is no error either
        from replit_tools.server import run
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(run(args))
