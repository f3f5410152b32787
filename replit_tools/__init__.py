"""Tools around the replit-code-v1-3b model files at the repository root: code completion (library, command line,
server), the card's post-processing, evaluation, and the demo model's recipe.

The model files at the root stay flat because transformers copies them next to the weights and loads them as a
package, with relative imports (`from .attention import ...`). Importing this package registers the root as that
package, `replit_lm`, so that tools, tests and benchmarks import the model as `replit_lm.modeling_replit_lm` etc.
"""

import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = ROOT / "demo"

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
