"""Shared test set-up: the repository root on sys.path, and the model files importable as the package `replit_lm`."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "replit-code-v1-3b"
sys.path.insert(0, str(ROOT))

import replit_lm_package  # noqa: E402  (also registers the package `replit_lm`)

MODEL_CODE_FILES = replit_lm_package.CODE_FILES
