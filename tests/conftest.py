"""Shared test set-up: the repository root on sys.path, the model files importable as the package `replit_lm`, and
the native kernels built for other CPUs (AVX2, AVX512 without VNNI, neither)."""

import os
import sys
import sysconfig
from pathlib import Path

import pytest
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
# What the tests' small SentencePiece vocabularies are trained on (about 10,000 lines): standard-library modules whose
# text changes rarely between Python releases. Not this repository's files: then every commit moved the vocabulary,
# and with it the tiny models' completions, and a test that needed one to write text failed after an unrelated change.
VOCABULARY_MODULES = "argparse functools textwrap shlex heapq dataclasses pprint csv configparser tokenize".split()
VOCABULARY_SOURCES = tuple(Path(sysconfig.get_paths()["stdlib"]) / f"{module}.py" for module in VOCABULARY_MODULES)


def native_kernels_built_with(flags: str):
    """The native library built here with $REPLIT_LM_NATIVE_FLAGS=`flags` added, under the flags' own key; skips
    where there is no compiler."""
    from replit_lm import quantization

    here = quantization.native_kernels()
    if here is None:
        pytest.skip("no C compiler here")
    before = os.environ.get(quantization.NATIVE_FLAGS_ENV)
    os.environ[quantization.NATIVE_FLAGS_ENV] = flags
    quantization.native_kernels.cache_clear()
    try:
        built = quantization.native_kernels()
    finally:
        if before is None:
            del os.environ[quantization.NATIVE_FLAGS_ENV]
        else:
            os.environ[quantization.NATIVE_FLAGS_ENV] = before
        quantization.native_kernels.cache_clear()
    assert built is not None and built._name != here._name  # another library, under the flags' own key
    return built


@pytest.fixture(scope="session")
def avx2_native_kernels():
    """The native library built with AVX512 turned off: AVX2 variants where the CPU has AVX2 with FMA, as most
    laptop CPUs run them, else plain C."""
    return native_kernels_built_with("-mno-avx512f")


@pytest.fixture(scope="session")
def no_vnni_native_kernels():
    """The native library built without AVX512-VNNI, as for an AVX512 CPU that lacks it (Skylake-SP): the AVX2
    integer tiles beside the AVX512 float kernels."""
    return native_kernels_built_with("-mno-avx512vnni")


@pytest.fixture(scope="session")
def plain_c_native_kernels():
    """The native library built with neither AVX512 nor AVX2: the plain C loops (and whatever the compiler makes of
    them with SSE), as on a CPU of neither."""
    return native_kernels_built_with("-mno-avx512f -mno-avx2")
