"""The flat model files of this repository, importable as the package `replit_lm`.

The model files import each other relatively (`from .attention import ...`) because transformers copies them next
to the weights and loads them as a package. Scripts and tests of this repository import them the same way, as
`replit_lm.modeling_replit_lm` etc., once this module has been imported.
"""

import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent

if "replit_lm" not in sys.modules:
    _package = types.ModuleType("replit_lm")
    _package.__path__ = [str(ROOT)]
    sys.modules["replit_lm"] = _package

# The files a model repository needs beside its weights (transformers copies them into its module cache).
CODE_FILES = (
    "configuration_replit_lm.py",
    "modeling_replit_lm.py",
    "attention.py",
    "triton_flash_attn.py",
    "quantization.py",
    "replit_lm_tokenizer.py",
)
