"""Serve replit-code-v1-3b over an OpenAI-compatible HTTP API: `python3 serve.py --port 8000` (see docs/serving.md)."""

import sys

try:  # torch and transformers take seconds to import: Ctrl-C then is no error either
    from replit_tools.server import main
except KeyboardInterrupt:
    sys.exit(130)

if __name__ == "__main__":
    sys.exit(main())
