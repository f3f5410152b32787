"""Shared test set-up.

The model's modules are flat files with relative imports (transformers copies them next to the weights), so the
repository root is registered here as the package `replit_lm` for tests that import them directly.
"""

import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "replit-code-v1-3b"

if "replit_lm" not in sys.modules:
    package = types.ModuleType("replit_lm")
    package.__path__ = [str(ROOT)]
    sys.modules["replit_lm"] = package

MODEL_CODE_FILES = ("configuration_replit_lm.py", "modeling_replit_lm.py", "attention.py", "triton_flash_attn.py")
