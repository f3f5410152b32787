"""Serve replit-code-v1-3b over an OpenAI-compatible HTTP API: `python3 serve.py --port 8000` (see docs/serving.md)."""

import sys

from replit_tools.server import main

if __name__ == "__main__":
    sys.exit(main())
