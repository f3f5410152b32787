"""Complete code with replit-code-v1-3b: `python3 generate.py "def fibonacci(n):"` (see --help, docs/completion.md)."""

import sys

from replit_tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
