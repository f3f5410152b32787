"""Evaluate a model folder on code it never saw: `python3 evaluate.py --model PATH` (see docs/demo.md)."""

from replit_tools.evaluation import main

if __name__ == "__main__":
    main()
