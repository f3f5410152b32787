"""Shared test set-up: the repository root on sys.path, and the model files importable as the package `replit_lm`."""

import os
import sys
from pathlib import Path

import torch

# Without a GPU, Triton kernels run in its interpreter. It is chosen when a kernel is defined, i.e. when
# triton_flash_attn is first imported (through the model), so it is set before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# CPU kernel routes are measured per process (quantization.RouteChooser), never stored in the user's cache.
os.environ.setdefault("REPLIT_LM_ROUTE_CACHE", "off")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "replit-code-v1-3b"
sys.path.insert(0, str(ROOT))

import replit_tools  # noqa: E402  (also registers the model files as the package `replit_lm`)

MODEL_CODE_FILES = replit_tools.CODE_FILES
