"""CPU kernels for ReplitLM's Linear layers: each product goes through the route measured fastest on the machine at
hand, and the weights can be quantized to int8 or int4.

Decoding a token reads every weight once, so its speed is bytes per weight over memory bandwidth, unless the kernel
cannot keep up with the memory; which of torch's CPU kernels keeps up differs between CPUs (AMX, AVX512-VNNI,
AVX2) and with the number of rows (one per sequence when decoding, thousands in a prompt). So no route is fixed
here: `ROUTES` times the routes of a layer's shape once per number-of-rows bucket (`ROW_BUCKETS`), the plain
baseline first, each call with the layer's weights dropped from the caches (`evict_from_caches`) as a decoding step
finds them, and each layer of that shape then takes the fastest. The choices are kept per CPU model, torch
version and thread count in a small JSON file (`ROUTE_CACHE_ENV`). docs/cpu.md has the measurements.

- `RoutedLinear` (float weights): F.linear, torch.mv for one row, or W @ x^T for a few rows.
- `Int8Linear`: int8 weights with a scale per block of 32 input channels (llama.cpp's q8_0 layout) through this
  module's own kernel ("native", below) or the weight unpacked to the activations' dtype; without the native
  kernels, a scale per output channel, for oneDNN's int8 matmul (activations quantized per row on the fly) and
  torch's int8 weight-only kernel, which read no other scales.
- `Int4Linear`: int4 weights in groups of `INT4_GROUP_SIZE` input channels with a scale and a zero point per
  group; torch's int4 kernel, the native kernel, or the weight dequantized to bfloat16.

The native kernels are C (`NATIVE_SOURCE`) compiled with the machine's C compiler at first use, for its own
instruction set, and kept in ~/.cache/replit_lm/kernels: integer dot products (AVX512-VNNI where the CPU has it)
of the weights with activations quantized in blocks of 32, to int8 as llama.cpp's q8_0 does, or for int8 weights
to int16, which keeps the float product. The same library holds `decode_attention`, the one-query attention of a
decoding step that attention.py takes where it is timed faster than SDPA. Where no compiler is found or compiling
fails, their routes are not offered and the others remain. A weight unpacked for a product goes into a scratch
tensor reused by every layer (`_scratch`).

`from_pretrained(path, trust_remote_code=True, weight_quantization="int8")` (or "int4") loads the checkpoint in
bfloat16 and replaces every Linear layer, the LM head included, one layer at a time. The token embedding stays
bfloat16 (a lookup reads a few rows, not the matrix). A quantized model cannot be saved (the oneDNN weight is an
opaque tensor): save the original checkpoint and pass `weight_quantization` again when loading it.
"""

import _ctypes
import ctypes
import functools
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

INT4_GROUP_SIZE = 32
"""Input channels sharing one int4 scale and zero point: as llama.cpp's q4_0 blocks, whose top-1 agreement with
float32 larger groups do not reach."""
INT4_GROUP_SIZES = (256, 128, 64, 32)  # what the kernel accepts
INT4_INNER_K_TILES = 2  # the kernel's packing parameter; the choice made no measurable difference
QUANTIZE_ROWS = 1024
"""Output channels quantized at a time: bounds the float32 temporaries to QUANTIZE_ROWS x in_features (a multiple
of the int4 packing's row blocks, 64 with AVX512 and 32 with AVX2, so that chunks pack independently)."""
ONEDNN_INT8_CHUNK_ROWS = 256
"""Rows that go through oneDNN's int8 matmul at a time, so that the float32 output and the per-row scaling of a long
prompt stay in cache."""


ROW_BUCKETS = (1, 8, 64, 512)
"""Rows (batch x new tokens) at which routes are timed; a product of r rows takes the choice of the first bucket
of at least r rows (the last bucket's beyond it)."""
ROUTE_CACHE_ENV = "REPLIT_LM_ROUTE_CACHE"
"""The file that keeps route choices between runs (default ~/.cache/replit_lm/cpu_routes.json); "off" keeps them
in memory only."""
ROUTES_VERSION = "routes 8"
"""Part of the route cache's key, changed when the routes a layer offers or their timing change (2: int8 in blocks
of 32, the unpacking routes W @ x^T; 3: the AMX bfloat16 route of the quantized layers; 4: bfloat16's native
matrix-vector product; 5: its second loop order; 6: that product on CPUs without AVX512-BF16, and a prompt's
product in float32; 7: timed with the weights out of the caches; 8: the thread count in each ranking's key), so that
rankings stored by an older version are measured again."""
TIMING_REPEATS = 3
LONG_CALL_SECONDS = 0.05
SMALL_ROWS = 64
"""Rows up to which the W @ x^T routes are offered (some CPUs multiply a few rows faster that way)."""
WIDEN_ROWS = 8
"""Rows above which a bfloat16 or float16 layer also offers its product in float32 (the weight widened per call)."""
WEIGHT_ONLY_K_MULTIPLE = 16
"""The in_features that torch's int8 weight-only kernel is offered for must be a multiple of this."""


def row_bucket(rows: int) -> int:
    return next((bucket for bucket in ROW_BUCKETS if rows <= bucket), ROW_BUCKETS[-1])


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), which route choices are kept under; benchmarks print it."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    """The CPU's instruction-set flags (Linux: /proc/cpuinfo; x86 "flags", Arm "Features"), which the native
    kernels are built for; benchmarks print the ones that matter. Empty where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            line = next(line for line in cpuinfo if line.startswith(("flags", "Features")))
        return set(line.split(":", 1)[1].split())
    except (OSError, StopIteration):
        return set()


def time_call(fn, x: torch.Tensor, repeats: int, before=None) -> float:
    """The fastest of up to `repeats` calls of fn(x), in seconds; a call longer than LONG_CALL_SECONDS is not
    repeated (its noise is small next to it, and the measurement stays short). `before()`, where given, runs ahead
    of each call, untimed."""
    best = float("inf")
    for _ in range(repeats):
        if before is not None:
            before()
        start = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - start)
        if best > LONG_CALL_SECONDS:
            break
    return best


class RouteChooser:
    """Ranks, per layer shape, activation dtype and row bucket, the routes that compute a layer's product, fastest
    first; a product takes the first route of its bucket's ranking that the layer offers (a layer that keeps one
    weight layout offers only the routes that read it, and the baseline, which reads any).

    A layer offers `routes(rows)`: route names in order, its plain baseline first. The first time a shape is seen,
    every bucket is timed on that layer with random activations, each call with the layer's tensors dropped from
    the caches first (`evict_from_caches`): the baseline at the bucket's rows, then each other route at growing row
    counts, dropped as soon as it is slower than the baseline already (so that a route that is very slow on this
    CPU costs one short call, not a long one), else timed at the bucket's rows. A route that raises is dropped; a
    bucket where the layer offers its baseline alone is not timed (0 seconds). The baseline wins ties, so nothing
    is ever slower than it by more than the timing noise.
    """

    def __init__(self):
        self.choices: dict[str, dict[int, list]] = {}  # shape key -> bucket -> [route, seconds], fastest first
        self.timer = time_call  # tests replace it with fake timings
        self._loaded_from: Path | None = None

    @staticmethod
    def key(layer, dtype: torch.dtype) -> str:
        """What a ranking is kept under: the layer's kind and shape, the activations' dtype, and for the quantized
        layers whether the native kernels are built here. A ranking measured without them (no compiler,
        REPLIT_LM_NATIVE=off) must not stand once they are, or their routes would never be measured."""
        native = getattr(layer, "native_available", None)
        kernels = "" if native is None else " native" if native else " without native"
        shape = f"{layer.out_features}x{layer.in_features}"
        threads = torch.get_num_threads()  # here, not in the machine's name: it may change between two products
        return f"{type(layer).__name__} {shape} {str(dtype).removeprefix('torch.')}{kernels} {threads} threads"

    def plan(self, layer, dtype: torch.dtype) -> dict[int, list]:
        """The ranking of routes of each row bucket for `layer` with activations of `dtype`, measured on first use:
        [route, seconds] pairs, fastest first."""
        key = self.key(layer, dtype)
        if key not in self.choices:
            self._load()
            if key not in self.choices:
                self.choices[key] = {bucket: self.measure(layer, dtype, bucket) for bucket in ROW_BUCKETS}
                self._save()
        return self.choices[key]

    @torch.no_grad()
    def measure(self, layer, dtype: torch.dtype, bucket: int) -> list:
        generator = torch.Generator().manual_seed(0)
        inputs = {rows: torch.randn(rows, layer.in_features, generator=generator).to(dtype) for rows in ROW_BUCKETS}
        baseline, *others = layer.routes(bucket)
        if not others:  # nothing to choose between
            return [[baseline, 0.0]]
        cold = functools.partial(evict_from_caches, layer)
        limit = self.timer(layer.route_function(baseline), inputs[bucket], TIMING_REPEATS, cold)
        timed = [(limit, 0, baseline)]  # the baseline first among equal times
        for order, route in enumerate(others, 1):
            try:
                function = layer.route_function(route)  # prepares the weight layout the route reads, untimed
                for rows in (r for r in ROW_BUCKETS if r < bucket and route in layer.routes(r)):
                    if self.timer(function, inputs[rows], 1, cold) > limit:  # more rows never take less time
                        break
                else:
                    timed.append((self.timer(function, inputs[bucket], TIMING_REPEATS, cold), order, route))
            except RuntimeError:  # not available in this torch build, or not for this shape
                continue
        return [[route, seconds] for seconds, _, route in sorted(timed)]

    def _cache_file(self) -> Path | None:
        setting = os.environ.get(ROUTE_CACHE_ENV, "")
        if setting == "off":
            return None
        return Path(setting) if setting else Path.home() / ".cache" / "replit_lm" / "cpu_routes.json"

    def _machine(self) -> str:
        return f"{cpu_model()} | torch {torch.__version__} | {ROUTES_VERSION}"

    @staticmethod
    def _stored(path: Path) -> dict:
        """The cache file's rankings per machine; {} where there is no file, or one that is not ours (it is then
        measured again and overwritten)."""
        if not path.is_file():  # a named pipe would wait for a writer
            return {}
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return stored if isinstance(stored, dict) else {}

    def _load(self):
        path = self._cache_file()
        if path is None or path == self._loaded_from:
            return
        self._loaded_from = path
        stored = self._stored(path).get(self._machine())
        for key, plan in stored.items() if isinstance(stored, dict) else ():
            try:
                plan = {int(bucket): ranking for bucket, ranking in plan.items()}
            except (AttributeError, TypeError, ValueError):
                continue
            if set(plan) == set(ROW_BUCKETS) and all(map(self._is_ranking, plan.values())):
                self.choices.setdefault(key, plan)

    @staticmethod
    def _is_ranking(ranking) -> bool:
        """Whether `ranking` is a non-empty list of [route name, seconds] pairs."""
        return isinstance(ranking, list) and bool(ranking) and all(
            isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)
            and isinstance(pair[1], (int, float)) and not isinstance(pair[1], bool) for pair in ranking
        )

    def _save(self):
        path = self._cache_file()
        if path is None:
            return
        path = path.resolve()  # a symbolic link stays one: the file it points to is rewritten
        if path.exists() and not path.is_file():
            return  # a device (/dev/null) or a folder is not replaced: the choices stay in memory
        stored = self._stored(path)
        stored[self._machine()] = self.choices
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_text(json.dumps(stored, indent=1, sort_keys=True))
            temporary.replace(path)
        except OSError:
            pass  # a read-only home: the choices stay in memory
        finally:
            temporary.unlink(missing_ok=True)


ROUTES = RouteChooser()


def _routed(layer, x: torch.Tensor) -> torch.Tensor:
    """layer's product with x (..., in_features) through the route chosen for its shape and x's rows."""
    x2d = x.reshape(-1, layer.in_features)
    offered = layer.routes(x2d.shape[0])
    ranking = ROUTES.plan(layer, x.dtype)[row_bucket(x2d.shape[0])]
    route = next((route for route, _ in ranking if route in offered), offered[0])
    return layer.route_function(route)(x2d).reshape(*x.shape[:-1], layer.out_features)


DECODE_TIE = 1.1
"""Layouts whose fastest one-row (decode) routes are within this factor of each other count as equally fast for
decoding; the one with the faster 64-row (prompt) route is kept."""


def layout_to_keep(plan: dict[int, list], reads: dict[str, str], default: str) -> str:
    """The weight layout a quantized layer keeps, from its plan: decoding speed first, then a prompt's. `reads`
    maps a route to the layout it reads (a route not in it, the baseline, reads any)."""

    def fastest(bucket: int, layout: str) -> float:
        return min((seconds for route, seconds in plan[bucket] if reads.get(route, layout) == layout), default=math.inf)

    layouts = {reads[route] for route, _ in plan[ROW_BUCKETS[0]] if route in reads} or {default}
    decode = {layout: fastest(ROW_BUCKETS[0], layout) for layout in layouts}
    near = [layout for layout in sorted(layouts) if decode[layout] <= DECODE_TIE * min(decode.values())]
    return min(near, key=lambda layout: (fastest(64, layout), layout != default))


def measure_routes(model: nn.Module) -> None:
    """Choose now, instead of in the first product, the routes of every layer of `model` that chooses by measurement
    (a CPU model in bfloat16, float16 or float32, or quantized), for activations of the model's dtype (its
    embedding's): a server's first request, or a timed first completion, then does not pay for the measurement.
    Shapes already measured, in this process or in the route cache, cost nothing."""
    dtype = model.get_input_embeddings().weight.dtype
    routed_dtype = dtype in (torch.bfloat16, torch.float16, torch.float32)
    for module in model.modules():
        # Quantized layers exist on the CPU only (quantize_linear_layers refuses other devices).
        routed = isinstance(module, RoutedLinear) and routed_dtype and module.weight.device.type == "cpu"
        if routed or isinstance(module, QuantizedLinear):
            ROUTES.plan(module, dtype)


class RoutedLinear(nn.Linear):
    """nn.Linear (no bias) whose CPU inference takes the route measured fastest for its shape (see RouteChooser).
    bfloat16 and float16: F.linear, torch.mv for one row, W @ x^T for a few rows, the product in float32 for more
    than WIDEN_ROWS rows (`_widened_product`), or for one row of bfloat16 the native `matvec` (AVX512-BF16's dot
    products, else AVX512 or AVX2 multiply-adds of the weights widened to float32), reading the weight as it is, in
    either of its loop orders ("native": 4 output channels at a time with a software prefetch; "native_one_stream":
    one at a time, the hardware prefetchers alone). float32: one row (decoding) takes F.linear, torch.mv or the
    native `matvec` in float32 (F.linear's sums in another order: within float32 rounding of it, not bit for bit);
    more rows take F.linear. Training, other devices and layers with a bias use F.linear."""

    NATIVE_ONE_STREAM = {"native": 0, "native_one_stream": 1}  # route: matvec's `one_stream` argument

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.device.type != "cpu"
            or self.bias is not None
            or x.dtype != self.weight.dtype
            or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
        ):
            return F.linear(x, self.weight, self.bias)
        return _routed(self, x)

    def routes(self, rows: int) -> list[str]:
        native = (
            self.weight.dtype in NATIVE_DTYPES and self.in_features % NATIVE_BLOCK == 0 and _has_native_matvec()
        )
        one_row = ["mv"] + (list(self.NATIVE_ONE_STREAM) if native else [])
        if self.weight.dtype == torch.float32:
            return ["linear"] + (one_row if rows == 1 else [])
        prompt = ["float32"] if rows > WIDEN_ROWS else []
        return ["linear"] + (one_row if rows == 1 else []) + (["matmul_t"] if rows <= SMALL_ROWS else []) + prompt

    def route_function(self, route: str):
        if route == "float32":
            return self._widened_product
        if route == "mv":
            return lambda x: torch.mv(self.weight, x.view(-1)).view(1, -1)
        if route in self.NATIVE_ONE_STREAM:
            one_stream = self.NATIVE_ONE_STREAM[route]
            return lambda x: _native_product("matvec", (self.weight,), self.out_features, x, one_stream)
        return functools.partial(_product, weight=self.weight, transposed=route == "matmul_t")

    def _widened_product(self, x: torch.Tensor) -> torch.Tensor:
        """The product in float32, the weight widened into a scratch tensor, rounded once to x's dtype: where the
        CPU has no bfloat16 arithmetic (AVX2 laptops), torch's bfloat16 matrix product of a prompt is several times
        slower than float32's (a 512-token prompt through a 10240 x 2560 weight: 610 ms against 181)."""
        weight = _scratch(self.out_features, self.in_features, torch.float32).copy_(self.weight)
        return F.linear(x.float(), weight).to(x.dtype)


def _product(x: torch.Tensor, weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """x (rows, in) times weight (out, in) transposed: F.linear, or W @ x^T, which some CPUs do faster for a few
    rows, made row-major (SDPA's fused CPU kernel needs unit stride in q). (rows, out)"""
    return torch.mm(weight, x.t()).t().contiguous() if transposed else F.linear(x, weight)


_SCRATCH = threading.local()


def _scratch(n: int, k: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """An (n, k) tensor of this thread's, one per dtype, shared by every layer: a weight unpacked or widened for one
    product. Reused because a fresh one costs more in page faults than the unpacking itself (a 10240 x 2560 int8
    weight: 20 ms into a new tensor, 3 ms into this one, on a 2-core Xeon). It grows to the largest weight
    unpacked (the LM head: 168 MB in bfloat16 at the real width)."""
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    buffer = buffers.get(dtype)
    if buffer is None or buffer.numel() < n * k:
        buffer = buffers[dtype] = None  # the smaller one freed before the larger one is made
        # A normal tensor even under torch.inference_mode: an inference tensor could not be written outside it
        # (a later pass under no_grad would fail).
        with torch.inference_mode(False):
            buffer = buffers[dtype] = torch.empty(n * k, dtype=dtype)
    return buffer[: n * k].view(n, k)


def _has_onednn_int8() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")


NATIVE_ENV = "REPLIT_LM_NATIVE"
""""off" keeps the native kernels out (their routes are not offered); anything else, or unset, compiles them."""
NATIVE_FLAGS_ENV = "REPLIT_LM_NATIVE_FLAGS"
"""Compiler flags added to NATIVE_FLAGS, e.g. "-mno-avx512f" to build the AVX2 kernels on an AVX512 machine (as
benchmarks emulate a laptop CPU); part of the built library's key."""
NATIVE_BLOCK = 32  # input channels per activation block and per int4 group in the native kernels
NATIVE_ROWS = 16  # output channels the native layouts interleave


@functools.cache
def native_kernels() -> ctypes.CDLL | None:
    """The native kernels, compiled from NATIVE_SOURCE at first use with the C compiler ($CC, else cc or gcc) for
    this CPU (-march=native, plus $REPLIT_LM_NATIVE_FLAGS) and kept under ~/.cache/replit_lm/kernels, one file per
    source, compiler, flags and CPU (about a second the first time, nothing later; where that folder cannot be
    written, or others could write to it, built per process in a private one). None, with a warning, where
    there is no compiler or it fails; None without one where REPLIT_LM_NATIVE=off."""
    if os.environ.get(NATIVE_ENV) == "off":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler or not shutil.which(compiler):
        warnings.warn(f"no C compiler found ({compiler or 'cc'}): the native int8/int4 kernels are not used")
        return None
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
        machine = f"{cpu_model()} {' '.join(sorted(cpu_flags()))}"
        flags = (*NATIVE_FLAGS, *shlex.split(os.environ.get(NATIVE_FLAGS_ENV, "")))
        key = hashlib.sha256("\n".join([NATIVE_SOURCE, compiler, version, machine, *flags]).encode()).hexdigest()[:16]
        name = f"replit_lm_kernels_{key}.so"
        cached = _load_cached_native(Path.home() / ".cache" / "replit_lm" / "kernels", name, compiler, flags)
        if cached is not None:
            return cached
        # No usable cache folder (a read-only or shared home): build in a folder of this process's own, load, and
        # remove it, since a library kept in a folder that others can write to would run their code here.
        with tempfile.TemporaryDirectory(prefix="replit_lm_kernels_") as private:
            library = Path(private) / name
            if _compile_native(compiler, Path(private), library, flags):
                return _load_native(library, raising=True)
    except (OSError, AttributeError, subprocess.SubprocessError) as error:  # AttributeError: a kernel is missing
        warnings.warn(f"the native int8/int4 kernels could not be built ({error}): they are not used")
        return None
    warnings.warn(f"{compiler} could not compile the native int8/int4 kernels: they are not used")
    return None


def _load_cached_native(directory: Path, name: str, compiler: str, flags) -> ctypes.CDLL | None:
    """The library `name` kept in `directory` (a folder under the home folder), built there first if missing, or
    rebuilt where the one there does not load or lacks a kernel (a file left by another version, or damaged); None
    where the file, `directory` or a folder between it and the home folder could be written by anyone but this user
    (they would choose the code run here), or where nothing could be built."""
    library = directory / name
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError:
        return None
    between = [directory, *directory.parents[: len(directory.relative_to(Path.home()).parts) - 1]]
    if not all(map(_ours_alone, between)):
        return None
    if library.exists():
        loaded = _load_native(library)
        if loaded is not None:
            return loaded
    if not _compile_native(compiler, directory, library, flags):
        return None
    return _load_native(library, raising=True)


def _load_native(library: Path, raising: bool = False) -> ctypes.CDLL | None:
    """The bound library at `library` if only this user could have written it, else None; one that does not load
    or lacks a kernel raises where `raising`, else is unloaded again (so that a rebuilt file under the same name is
    loaded, not the handle of this one) and gives None."""
    if not _ours_alone(library, regular_file=True):
        return None
    loaded = None
    try:
        loaded = ctypes.CDLL(str(library))
        return _bind_native(loaded)
    except (OSError, AttributeError):
        if loaded is not None:
            _ctypes.dlclose(loaded._handle)
        if raising:
            raise
        return None


def _ours_alone(path: Path, regular_file: bool = False) -> bool:
    """Whether only this user can change `path`: owned by them, not writable by group or others (a symbolic link is
    judged by what it points to in a folder, refused as the library itself)."""
    try:
        info = path.lstat() if regular_file else path.stat()
    except OSError:
        return False
    if regular_file and not stat.S_ISREG(info.st_mode):
        return False
    return info.st_uid == os.getuid() and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


NATIVE_FLAGS = ("-O3", "-march=native", "-shared", "-fPIC")


def _compile_native(compiler: str, directory: Path, library: Path, flags=NATIVE_FLAGS) -> bool:
    """Compile into `library` through a temporary file, so that a concurrent or interrupted build never leaves a
    half-written library under the final name. OpenMP where the compiler has it (the library then shares torch's
    already loaded libgomp), else one thread."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        source = directory / f"{library.stem}.{os.getpid()}.c"
        source.write_text(NATIVE_SOURCE)
    except OSError:
        return False
    temporary = library.with_suffix(f".{os.getpid()}.tmp")
    try:
        for openmp in (["-fopenmp"], []):
            command = [compiler, *flags, *openmp, str(source), "-o", str(temporary)]
            if subprocess.run(command, capture_output=True, timeout=300).returncode == 0:
                temporary.replace(library)
                return True
        return False
    finally:
        source.unlink(missing_ok=True)
        temporary.unlink(missing_ok=True)


def _bind_native(library: ctypes.CDLL) -> ctypes.CDLL:
    pointer, size, integer = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    strides = ctypes.POINTER(ctypes.c_int64)
    signatures = {  # name: (arguments, result)
        "int8_matmul": ([pointer, pointer, size, size, pointer, size, pointer, integer, integer, integer], integer),
        "amx_matmul": ([pointer, pointer, size, size, pointer, size, pointer, integer, integer, integer], integer),
        "amx_available": ([], integer),
        "int8_vectors_available": ([], integer),
        "amx_bf16_matmul": ([pointer, pointer, size, size, pointer, size, pointer, integer, integer, integer], integer),
        "amx_bf16_available": ([], integer),
        "matvec": ([pointer, size, size, pointer, size, pointer, integer, integer, integer], integer),
        "matvec_available": ([], integer),
        "decode_attention": ([pointer, strides, pointer, pointer, strides, pointer, strides, pointer, strides,
                              size, size, size, size, ctypes.c_float, integer, integer], integer),
        "decode_attention_available": ([], integer),
        "int4_matmul": ([pointer, pointer, size, size, pointer, size, pointer, integer, integer], integer),
        "int8_dequantize": ([pointer, pointer, size, size, pointer, integer], None),
        "int4_dequantize": ([pointer, pointer, size, size, pointer, integer], None),
        "evict_from_caches": ([pointer, size], integer),
    }  # fmt: skip
    for name, (arguments, result) in signatures.items():
        function = getattr(library, name)
        function.argtypes, function.restype = arguments, result
    return library


def evict_from_caches(layer) -> bool:
    """Drop every tensor `layer` holds (its weights, in whichever layouts it keeps) from the CPU's caches, so that
    its next product reads them from memory, as each product of a model larger than the caches does. Timed with its
    weight in cache, a route is measured on another machine: on a Xeon whose 2 cores share a 480 MB L3, routes
    timed warm ranked a one-row product that reads 20 GB/s from memory above two that read 25-29. False where
    nothing was dropped (no native kernels, or a CPU without the instruction): timings then see warm caches."""
    library = native_kernels()
    if library is None:
        return False
    held = (*layer.__dict__.get("_parameters", {}).values(), *layer.__dict__.get("_buffers", {}).values(),
            *vars(layer).values())  # fmt: skip
    dropped = True
    for tensor in held:
        if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu" and tensor.layout == torch.strided:
            storage = tensor.untyped_storage()
            dropped = bool(library.evict_from_caches(storage.data_ptr(), storage.nbytes())) and dropped
    return dropped


NATIVE_DTYPES = (torch.bfloat16, torch.float32)  # what the native kernels read and write; others go as float32


def _native_product(kernel: str, weights: tuple, n: int, x: torch.Tensor, *options: int) -> torch.Tensor:
    """x (rows, k) times the n (padded) output channels held in `weights` (the tensors of the kernel's weight
    arguments, in order) through the native `kernel`, in x's dtype; `options`: the kernel's integer arguments
    between the dtype flag and the thread count. The kernel quantizes the activations itself. One call: each torch
    call around a product costs more than its own work here, the caches being cold after the weights streamed
    through. (rows, n)"""
    dtype = x.dtype
    x = (x if dtype in NATIVE_DTYPES else x.to(torch.float32)).contiguous()
    out = torch.empty(x.shape[0], n, dtype=x.dtype)
    done = getattr(native_kernels(), kernel)(
        *(t.data_ptr() for t in weights), n, x.shape[1], x.data_ptr(), x.shape[0], out.data_ptr(),
        int(x.dtype == torch.bfloat16), *options, torch.get_num_threads(),
    )  # fmt: skip
    if not done:
        raise MemoryError(f"{kernel}: no memory for the quantized activations of {tuple(x.shape)}")
    return out if out.dtype == dtype else out.to(dtype)  # even a no-op .to costs tens of microseconds here


@functools.cache
def _has_amx() -> bool:
    """Whether the native int8 kernel for AMX runs here (built for it, and the tile registers granted)."""
    return native_kernels() is not None and bool(native_kernels().amx_available())


def _has_native_int8() -> bool:
    """Whether the native int8 and int4 products run on vector instructions here (AVX512-VNNI, or AVX2 with FMA).
    Without them their plain C loops lose to torch's kernels, and int8 keeps a scale per output channel for torch's."""
    return native_kernels() is not None and bool(native_kernels().int8_vectors_available())


@functools.cache
def _has_native_matvec() -> bool:
    """Whether the native matrix-vector kernel runs here (built with AVX512 or AVX2)."""
    return native_kernels() is not None and bool(native_kernels().matvec_available())


@functools.cache
def _has_amx_bf16() -> bool:
    """Whether the native kernel for AMX's bfloat16 products runs here."""
    return native_kernels() is not None and bool(native_kernels().amx_bf16_available())


def _amx_bf16_route(rows: int) -> list[str]:
    """The unpacked weight multiplied on AMX tiles, for a prompt's rows (more than 8: the unpacking, the same work
    whatever the rows, outweighs the products below that)."""
    return ["native_amx_bf16"] if rows > 8 and _has_amx_bf16() else []


def _without_padding(out: torch.Tensor, out_features: int) -> torch.Tensor:
    """out (rows, padded out) cut to (rows, out_features), contiguous (SDPA's fused kernel needs unit stride)."""
    return out if out.shape[1] == out_features else out[:, :out_features].contiguous()


def refuse_moving_quantized(fn):
    """Raise where `fn`, the tensor function of a Module._apply (to, cuda, to_empty, ...), would put tensors off the
    CPU: the int8 and int4 layers' kernels read their weights from CPU memory (a GPU pointer would crash them)."""
    device = fn(torch.empty(0)).device
    if device.type != "cpu":
        raise ValueError(
            f"a model with int8/int4 weights (weight_quantization) runs on the CPU only and cannot move to {device}: "
            "load it without weight_quantization to run it there"
        )


def _padded_rows(n: int) -> int:
    return -(-n // NATIVE_ROWS) * NATIVE_ROWS


class QuantizedLinear(nn.Module):
    """Base of the quantized replacements of nn.Linear (no bias: ReplitLM has none)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self._planned_dtypes = set()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"

    def _apply(self, fn, recurse=True):
        """Module.to(dtype), .float() and .bfloat16() convert every floating-point buffer; these buffers are a
        storage format (bfloat16 or float32 scales whatever the activations, whose raw memory the native kernels
        read), so they move with the module but keep their dtype: a float32 copy of bfloat16 scales would be read as
        other numbers. The originals are kept, not converted back, so that no round trip can round them. A move
        off the CPU is refused (see `refuse_moving_quantized`)."""
        refuse_moving_quantized(fn)
        originals = {name: buffer for name, buffer in self._buffers.items() if buffer is not None}
        super()._apply(fn, recurse)
        for name, original in originals.items():
            if self._buffers[name].dtype != original.dtype:
                self._buffers[name] = original.to(device=self._buffers[name].device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """Refused: the quantized weights are buffers in layouts chosen on this machine, outside the state dict, so
        a state dict without them would load "successfully" into another model and leave its weights as they were
        (the same reason save_pretrained refuses)."""
        raise NotImplementedError(
            f"{prefix.rstrip('.') or type(self).__name__} holds quantized weights, which a state dict cannot carry: "
            "take the state dict of the model loaded without weight_quantization"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in self._planned_dtypes:  # choose the routes, then keep the one layout they need
            self._planned_dtypes.add(x.dtype)
            # Only among the routes this layer can take here, at any row count: a stored plan may rank one that is
            # not available in this process (the native kernels turned off or not built, no oneDNN, no AMX).
            offered = {route for bucket in ROW_BUCKETS for route in self.routes(bucket)}
            plan = ROUTES.plan(self, x.dtype)
            self._keep_layouts_of({bucket: [p for p in ranking if p[0] in offered] for bucket, ranking in plan.items()})
            _return_freed_heap()
        # After the layouts are settled, so that the first call takes the route every later call of its size takes
        # (a route whose layout was dropped would round otherwise).
        if torch.is_grad_enabled() and x.requires_grad:
            return _QuantizedProduct.apply(x, self)
        return _routed(self, x.contiguous())

    def _keep_layouts_of(self, plan: dict[int, list]):
        raise NotImplementedError

    def dequantized_weight(self) -> torch.Tensor:
        """The weight as the kernel sees it, (out_features, in_features) float32: for tests and error analysis."""
        raise NotImplementedError

    NATIVE_KERNELS: dict[str, tuple] = {}
    """The routes that read the native layout: route -> (native kernel, its integer options)."""

    def _native_weights(self) -> tuple:
        """The tensors of the native kernels' weight arguments, in order."""
        raise NotImplementedError

    def _native_product(self, x: torch.Tensor, route: str) -> torch.Tensor:
        kernel, *options = self.NATIVE_KERNELS[route]
        out = _native_product(kernel, self._native_weights(), self.native.shape[0] * NATIVE_ROWS, x, *options)
        return _without_padding(out, self.out_features)


class _QuantizedProduct(torch.autograd.Function):
    """A quantized layer's product where x needs a gradient (any forward pass outside no_grad: the embedding's weight
    requires one): the routed product, and in backward the gradient of x @ W^T for the weight as quantized. The
    routes themselves are no autograd graph: the native ones return a tensor cut off from it (a residual's gradient
    then silently left the layer out), the unpacking ones would save the per-thread scratch weight that the next
    layer overwrites before backward reads it, and torch's int4 and weight-only kernels have no derivative. The
    weights themselves get none: they are a storage format, not parameters."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "QuantizedLinear") -> torch.Tensor:
        ctx.layer = layer
        return _routed(layer, x.contiguous())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Unpacked afresh (not into the scratch tensor), in the gradient's dtype: a step of backward, not of decoding.
        return grad @ ctx.layer.dequantized_weight().to(grad.dtype), None


class Int8Linear(QuantizedLinear):
    """int8 weights, symmetric: weight ~= q * scale with q in [-127, 127] and a scale per block of `block_size`
    input channels: blocks of 32 with bfloat16 scales (llama.cpp's q8_0 layout) where the native kernels were
    built with AVX512-VNNI or AVX2, else (or `per_channel`) one float32 scale per output channel, the only scales
    torch's int8 kernels read.

    In blocks of 32, the weights are held in the native kernel's layout only, and the routes are "dequantize" (the
    weight unpacked to the activations' dtype, then F.linear: the baseline), "native" (the activations quantized to
    int16 per block, which leaves the product the float one to about 1e-5) and, for 9 to 64 rows (a short prompt),
    "native_int8" (the activations quantized to int8 per block of 32, as in llama.cpp's q8_0 products: about twice
    as fast with AVX512-VNNI, with q8_0's rounding error) and where the CPU has AMX "native_amx" (the same
    products on AMX tiles, bit for bit); above 8 rows, where AMX multiplies bfloat16, "native_amx_bf16" (the
    "dequantize" product, the weights unpacked 16 output channels at a time into AMX tiles). Per output channel:
    "dequantize", "weight_only" (torch's int8 weight-only kernel) and, where torch has oneDNN's int8 matmul,
    "onednn" (activations quantized to int8 per row); each reads a layout of its own, the plain int8 matrix or
    oneDNN's blocked copy, and once its routes are chosen a layer keeps only the layout its decode route reads.
    """

    NATIVE_KERNELS = {"native": ("int8_matmul", 1), "native_int8": ("int8_matmul", 0), "native_amx": ("amx_matmul", 0),
                      "native_amx_bf16": ("amx_bf16_matmul", 0)}  # fmt: skip
    """int8_matmul's option: int16 activations; amx_matmul's and amx_bf16_matmul's: int4 weights."""

    def __init__(self, weight: torch.Tensor, per_channel: bool = False):
        super().__init__(weight.shape[1], weight.shape[0])
        self.onednn_available = _has_onednn_int8()
        self.native_available = not per_channel and self.in_features % NATIVE_BLOCK == 0 and _has_native_int8()
        self.block_size = NATIVE_BLOCK if self.native_available else self.in_features
        blocks = self.in_features // self.block_size
        scale = torch.empty(self.out_features, blocks)
        q = torch.empty(self.out_features, self.in_features, dtype=torch.int8)
        for rows in _row_chunks(self.out_features):
            w = weight[rows].detach().to(torch.float32, copy=True).view(-1, blocks, self.block_size)
            s = (w.abs().amax(dim=2) / 127).clamp(min=torch.finfo(torch.float32).tiny)  # (chunk, blocks); > 0
            if self.native_available:  # rounded to bfloat16 before the weights are quantized against it
                s = s.to(torch.bfloat16).float()
            scale[rows] = s
            q[rows] = w.div_(s[..., None]).round_().clamp_(-127, 127).view(-1, self.in_features)
        self.register_buffer("scale", scale, persistent=False)  # (out, blocks); None in the native layout
        self.register_buffer("qweight", q, persistent=False)  # (out, in); None once no chosen route reads it
        self.packed = None  # oneDNN's blocked layout of qweight, made when that route is first used
        # The native kernels' layout (see _make_native_layout), buffers as Int4Linear's, so that whatever counts a
        # model's tensors (its size, the bytes a decode step reads) counts these.
        self.register_buffer("native", None, persistent=False)
        self.register_buffer("_native_scale", None, persistent=False)
        self._scale_cache = {}  # the weight-only kernel wants the scales in the activations' dtype
        if self.native_available:  # the scales live on in the native layout's bfloat16 copy
            self._make_native_layout()
            self.qweight = self.scale = None
            self.layouts = {"native"}
        else:
            self.layouts = {"plain", "packed"}  # the layouts this layer may use; one once routes are chosen

    def routes(self, rows: int) -> list[str]:
        routes = ["dequantize"] + (["dequantize_t"] if rows <= SMALL_ROWS else [])  # these read any layout
        if "native" in self.layouts:
            # int8 activations (q8_0's rounding) only for short prompts, where they are much faster; from 512 rows
            # the unpacked weight is, with the float product's precision.
            prompt = ["native_int8"] + (["native_amx"] if _has_amx() else [])
            return routes + ["native"] + (prompt if 8 < rows <= SMALL_ROWS else []) + _amx_bf16_route(rows)
        # torch's int8 weight-only kernel (2.13, bfloat16, 2 rows or more) reads past the weight where in_features is
        # not a multiple of 16 and kills the process; the real model's widths are.
        weight_only = "plain" in self.layouts and self.in_features % WEIGHT_ONLY_K_MULTIPLE == 0
        routes += ["weight_only"] if weight_only else []
        return routes + (["onednn"] if self.onednn_available and "packed" in self.layouts else [])

    def route_function(self, route: str):
        """The product through `route`, with the weight layout it reads made first (so that timing leaves it out)."""
        if route in self.NATIVE_KERNELS:
            return functools.partial(self._native_product, route=route)
        if route == "onednn":
            self._packed()
            return self._onednn_in_chunks
        if route == "weight_only":
            plain = self._plain()
            return lambda x: torch.ops.aten._weight_int8pack_mm(x, plain, self._scales_as(x.dtype))
        return functools.partial(self._dequantized_product, transposed=route == "dequantize_t")

    def _keep_layouts_of(self, plan: dict[int, list]):
        """Keep one weight layout (see layout_to_keep): holding two would double the int8 weights. Buckets whose
        fastest route reads another layout take the fastest that reads this one. In blocks, the native layout is
        the only one."""
        if "native" in self.layouts:
            return
        kept = layout_to_keep(plan, {"weight_only": "plain", "onednn": "packed"}, "plain")
        getattr(self, f"_{kept}")()
        self.qweight = self.qweight if kept == "plain" else None
        self.packed = self.packed if kept == "packed" else None
        self.layouts = {kept}

    def _int8_matrix(self) -> torch.Tensor:
        """The int8 weights (out, in) from whichever layout is held."""
        if self.qweight is not None:
            return self.qweight
        if self.packed is not None:
            return self.packed.to_dense().t().contiguous()
        n, k = self.native.shape[0] * NATIVE_ROWS, self.in_features
        offset = self.native.permute(0, 2, 1, 3).reshape(n, k)[: self.out_features]
        return (offset ^ 128).view(torch.int8)  # q + 128 and back are the sign bit flipped

    def _plain(self) -> torch.Tensor:
        if self.qweight is None:
            self.qweight = self._int8_matrix()
        return self.qweight

    def _packed(self) -> torch.Tensor:
        if self.packed is None:
            # Reordered into oneDNN's blocked layout once (an opaque MKLDNN tensor); the hint is the decode shape.
            self.packed = torch.ops.onednn.qlinear_prepack(self._int8_matrix(), [1, self.in_features])
            self._zero_points = torch.zeros(self.out_features, dtype=torch.int64)
            self._one, self._zero = torch.tensor(1.0), torch.tensor(0)
            if "plain" not in self.layouts:  # a copy's plain matrix (see __getstate__), brought for this only
                self.qweight = None
        return self.packed

    def __getstate__(self):
        """copy.deepcopy and pickle: oneDNN's blocked layout is an opaque tensor whose memory cannot be read, so the
        plain int8 matrix travels in its place, and the copy makes the blocked layout again at its first product."""
        state = self.__dict__.copy()
        if self.packed is not None:
            state["_buffers"] = dict(self._buffers, qweight=self._int8_matrix())
            state["packed"] = None
        return state

    def _make_native_layout(self):
        """`native`: (padded out / 16, in / 4, 16, 4) uint8 holding q + 128, the unsigned operand of the kernel's
        int8 dot products, 4 input channels of 16 output channels in 64 bytes; zero rows pad the output channels.
        `_native_scale` beside it: (padded out / 16, in / 32, 16) bfloat16."""
        n, k = _padded_rows(self.out_features), self.in_features
        offset = self.qweight.view(torch.uint8) ^ 128  # q + 128
        scale = self.scale.to(torch.bfloat16)
        if n > self.out_features:
            offset = F.pad(offset, (0, 0, 0, n - self.out_features), value=128)
            scale = F.pad(scale, (0, 0, 0, n - self.out_features))
        self.native = offset.view(n // NATIVE_ROWS, NATIVE_ROWS, k // 4, 4).permute(0, 2, 1, 3).contiguous()
        self._native_scale = scale.view(n // NATIVE_ROWS, NATIVE_ROWS, -1).transpose(1, 2).contiguous()

    def _dequantized_product(self, x: torch.Tensor, transposed: bool) -> torch.Tensor:
        if self.native is None:  # a scale per output channel commutes with the product
            if x.dtype == torch.float16:
                # In float32, rounded once: float16's range (65504) cannot hold the integer weights' product (up to
                # 127 times the float one), which overflowed to inf for activations of a few hundred.
                product = _product(x.float(), self._int8_matrix().float(), transposed)
                return (product * self._scales_as(torch.float32)).half()
            return _product(x, self._int8_matrix().to(x.dtype), transposed) * self._scales_as(x.dtype)
        if x.dtype == torch.bfloat16:
            weight = _scratch(self.native.shape[0] * NATIVE_ROWS, self.in_features)
            native_kernels().int8_dequantize(self.native.data_ptr(), self._native_scale.data_ptr(), weight.shape[0],
                                             self.in_features, weight.data_ptr(), torch.get_num_threads())  # fmt: skip
            return _without_padding(_product(x, weight, transposed), self.out_features)
        return _product(x, self.dequantized_weight().to(x.dtype), transposed)

    def _native_weights(self) -> tuple:
        return self.native, self._native_scale

    def _onednn_in_chunks(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= ONEDNN_INT8_CHUNK_ROWS:
            return self._onednn(x)
        return torch.cat([self._onednn(rows) for rows in x.split(ONEDNN_INT8_CHUNK_ROWS)])

    def _onednn(self, x: torch.Tensor) -> torch.Tensor:
        packed = self._packed()
        x_scale = torch.linalg.vector_norm(x, float("inf"), dim=1, keepdim=True, dtype=torch.float32)  # (rows, 1)
        x_scale = x_scale.clamp_(min=torch.finfo(torch.float32).tiny) / 127
        xq = torch.round(x / x_scale).to(torch.int8)  # (rows, in)
        # oneDNN takes one activation scale per tensor: pass 1 and apply the per-row scales to the output.
        out = torch.ops.onednn.qlinear_pointwise.tensor(
            xq, self._one, self._zero, packed, self.scale[:, 0], self._zero_points,
            None, 1.0, 0, torch.float32, "none", [], "",
        )  # fmt: skip
        return (out * x_scale).to(x.dtype)  # (rows, out)

    def _scales_as(self, dtype: torch.dtype) -> torch.Tensor:
        """The per-output-channel scales (out,) in `dtype`."""
        if dtype not in self._scale_cache:
            self._scale_cache[dtype] = self.scale[:, 0].to(dtype)
        return self._scale_cache[dtype]

    def dequantized_weight(self) -> torch.Tensor:
        if self.native is not None:
            scale = self._native_scale.float().transpose(1, 2).reshape(self.native.shape[0] * NATIVE_ROWS, -1)
            scale = scale[: self.out_features]
        else:
            scale = self.scale
        q = self._int8_matrix().float().view(self.out_features, -1, self.block_size)
        return (q * scale[..., None]).view(self.out_features, self.in_features)


class Int4Linear(QuantizedLinear):
    """int4 weights in groups of `group_size` input channels, asymmetric: in each group,
    weight ~= (q - 8) * scale + zero with q in [0, 15], scale and zero in bfloat16, fitted to the group's weights by
    least squares (see _refit_int4; a weight beyond [zero - 8 * scale, zero + 7 * scale] takes the end). The
    output channels are padded with zero rows to a multiple of 16 (the kernels' blocks; a small vocabulary's LM
    head).

    Two weight layouts: the native kernel's (`native`, `native_scales`), made when the layer is, and torch's int4
    kernel's (`packed`, `scales_and_zeros`), made from it when that route is first used. Routes: "dequantize" (the
    weight unpacked to bfloat16, then F.linear: the baseline), "kernel" (torch's int4 kernel, which dequantizes as
    it multiplies, in bfloat16) and, for groups of 32 where the native kernels were built, "native" (activations
    quantized to int8 in blocks of 32, int8 dot products) and, for more than 8 rows where the CPU has AMX,
    "native_amx" (the same products on AMX tiles, bit for bit) and "native_amx_bf16" (the "dequantize" product,
    the weights unpacked 16 output channels at a time into AMX's bfloat16 tiles, never written out whole). Once
    its routes are chosen, a layer keeps only the layout its decode route reads.
    """

    NATIVE_KERNELS = {"native": ("int4_matmul",), "native_amx": ("amx_matmul", 1),
                      "native_amx_bf16": ("amx_bf16_matmul", 1)}  # fmt: skip

    def __init__(self, weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE):
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features)
        self.group_size = int4_group_size(in_features, group_size)
        self.padded_out = _padded_rows(out_features)
        self.native_available = self.group_size == NATIVE_BLOCK and native_kernels() is not None
        groups = in_features // self.group_size
        native, native_scales = [], []
        for rows in _row_chunks(self.padded_out):
            w = weight[rows].detach().to(torch.float32, copy=True)  # (chunk, in), modified in place below
            w = F.pad(w, (0, 0, 0, rows.stop - rows.start - w.shape[0]))  # zero rows past out_features
            w = w.view(-1, groups, self.group_size)
            low, high = w.amin(dim=2), w.amax(dim=2)  # (chunk, groups)
            scale, low = _refit_int4(w, (high - low) / 15, low)
            # Rounded to bfloat16 before the weights are quantized against them, so that q absorbs the rounding.
            scale = scale.clamp(min=1e-8).to(torch.bfloat16)
            zero = (low + 8 * scale.float()).to(torch.bfloat16)
            start = zero.float() - 8 * scale.float()  # the value of q = 0
            q = w.sub_(start[..., None]).div_(scale.float()[..., None]).round_().clamp_(0, 15)
            native.append(_int4_to_native(q.to(torch.uint8).view(-1, in_features)))
            scales = torch.stack([scale, zero]).view(2, -1, NATIVE_ROWS, groups).transpose(2, 3)
            native_scales.append(scales)  # (2, chunk / 16, groups, 16)
        self.register_buffer("native", torch.cat(native), persistent=False)  # (padded out / 16, in / 8, 16, 4)
        self.register_buffer("native_scales", torch.cat(native_scales, dim=1).contiguous(), persistent=False)
        self.packed = self.scales_and_zeros = None  # torch's layout, made when its kernel is first used
        self.layouts = {"native", "packed"}
        self.can_unpack = _int4_layout() is not None

    def routes(self, rows: int) -> list[str]:
        unpacking = ["dequantize"] + (["dequantize_t"] if rows <= SMALL_ROWS else [])
        if "native" not in self.layouts:
            return unpacking + ["kernel"] if self.can_unpack else ["kernel"]
        kernel = ["kernel"] if "packed" in self.layouts else []
        native = ["native"] + (["native_amx"] if rows > 8 and _has_amx() else []) + _amx_bf16_route(rows)
        return unpacking + kernel + (native if self.native_available else [])

    def route_function(self, route: str):
        if route in self.NATIVE_KERNELS:
            return functools.partial(self._native_product, route=route)
        if route == "kernel":
            packed = self._packed()  # made first, so that timing leaves it out
            product = lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, *packed)  # noqa: E731
        else:
            transposed = route == "dequantize_t"
            product = lambda x: _product(x, self._dequantize(torch.bfloat16, scratch=True), transposed)  # noqa: E731
        # Both are vectorised for bfloat16 only; padding rows of the weight are cut off the output.
        return lambda x: _without_padding(product(x.to(torch.bfloat16)), self.out_features).to(x.dtype)

    def _keep_layouts_of(self, plan: dict[int, list]):
        """Keep one weight layout (see layout_to_keep); the baseline reads either."""
        reads = {"kernel": "packed"} | dict.fromkeys(self.NATIVE_KERNELS, "native")
        if layout_to_keep(plan, reads, "native") == "packed":
            self._packed()
            self.native = self.native_scales = None
            self.layouts = {"packed"}
        else:
            self.packed = self.scales_and_zeros = None
            self.layouts = {"native"}

    def _packed(self) -> tuple:
        """torch's int4 layout: the arguments of `_weight_int4pack_mm_for_cpu` after the activations."""
        if self.packed is None:
            q = [_native_to_int4(self.native[rows.start // NATIVE_ROWS : rows.stop // NATIVE_ROWS])
                 for rows in _row_chunks(self.padded_out)]  # fmt: skip
            packing = torch.ops.aten._convert_weight_to_int4pack_for_cpu
            self.packed = torch.cat([packing(chunk.to(torch.int32), INT4_INNER_K_TILES) for chunk in q])
            scale, zero = self.native_scales.transpose(2, 3).reshape(2, self.padded_out, -1)  # 2 x (padded out, groups)
            self.scales_and_zeros = torch.stack([scale, zero], dim=2).transpose(0, 1).contiguous()  # (groups, out, 2)
        return self.packed, self.group_size, self.scales_and_zeros

    def _native_weights(self) -> tuple:
        return self.native, self.native_scales

    def _dequantize(self, dtype: torch.dtype, scratch: bool = False) -> torch.Tensor:
        """The weight in `dtype`, padding rows included; unpacked by the native kernel into this thread's scratch
        tensor (see `_scratch`: valid until the next product) where `scratch` and it can. (padded out, in)"""
        n, k = self.padded_out, self.in_features
        if dtype == torch.bfloat16 and self.native is not None and self.native_available:
            weight = _scratch(n, k) if scratch else torch.empty(n, k, dtype=torch.bfloat16)
            native_kernels().int4_dequantize(self.native.data_ptr(), self.native_scales.data_ptr(), n, k,
                                             weight.data_ptr(), torch.get_num_threads())  # fmt: skip
            return weight
        # In float32, rounded once to dtype: in bfloat16 the product, the offset and their sum each rounded.
        if self.native is not None:
            q = _native_to_int4(self.native)
            scale, zero = self.native_scales.float().transpose(2, 3).reshape(2, n, -1, 1)  # 2 x (n, groups, 1)
        else:
            q = _unpack_int4(self.packed, n, k, _int4_layout())
            scale, zero = self.scales_and_zeros.float().permute(2, 1, 0).unsqueeze(-1)  # 2 x (n, groups, 1)
        q = q.view(n, -1, self.group_size).float()  # (n, groups, size)
        return q.mul_(scale).add_(zero - 8 * scale).view(n, k).to(dtype)

    def dequantized_weight(self) -> torch.Tensor:
        return self._dequantize(torch.float32)[: self.out_features]


INT4_REFITS = 3
"""Least-squares refits of each group's scale and offset after the range's (see _refit_int4)."""


def _refit_int4(w: torch.Tensor, scale: torch.Tensor, low: torch.Tensor):
    """Each group's scale and value of q = 0, from its range's (the first guess), refitted INT4_REFITS times: q
    rounded against them, then the line through (q, w) of least squares. The range's choice spends levels on the
    two extreme weights; 3 refits lower the squared error of Gaussian weights by 13% (a search over 21 scales, as
    llama.cpp's k-quants make: 20%, at 10 times the cost) and took top-1 agreement with float32 on random weights
    of the real shape from 56.7% to 60.2% (llama.cpp's q4_0: 56.7%). w (rows, groups, size); scale and low (rows,
    groups)."""
    w_mean = w.mean(dim=2)
    for _ in range(INT4_REFITS):
        # One temporary the size of w (q, centred in place); the sums over a group as batched dot products, so that
        # loading a model does not hold more (the peak-memory test of loading bounds it).
        q = torch.sub(w, low[..., None]).div_(scale.clamp(min=1e-8)[..., None]).round_().clamp_(0, 15)
        q_mean = q.mean(dim=2)
        q = q.sub_(q_mean[..., None]).unsqueeze(2)  # (rows, groups, 1, size)
        spread = (q @ q.transpose(2, 3))[..., 0, 0]  # 0 where every weight of the group took one level: keep its fit
        fitted = (q @ w.unsqueeze(3))[..., 0, 0] / spread.clamp(min=1e-12)  # sum of centred q times w
        scale = torch.where(spread > 0, fitted, scale)
        low = torch.where(spread > 0, w_mean - scale * q_mean, low)
    return scale, low


def _int4_to_native(q: torch.Tensor) -> torch.Tensor:
    """(n, k) uint8 in [0, 15], n a multiple of 16 -> (n / 16, k / 8, 16, 4) uint8: per 8 input channels of 16
    output channels, 64 bytes whose byte 4c + j holds channel c's input j in its low nibble and input 4 + j in its
    high one, so that masking and shifting a 64-byte load gives the kernel two vectors of 4 inputs x 16 channels."""
    n, k = q.shape
    pairs = q.view(n // NATIVE_ROWS, NATIVE_ROWS, k // 8, 2, 4)
    return (pairs[:, :, :, 0] | pairs[:, :, :, 1] << 4).permute(0, 2, 1, 3).contiguous()


def _native_to_int4(native: torch.Tensor) -> torch.Tensor:
    """The inverse of _int4_to_native: (n / 16, k / 8, 16, 4) -> (n, k) uint8."""
    blocks, steps = native.shape[:2]
    by_channel = native.permute(0, 2, 1, 3)  # (n / 16, 16, k / 8, 4)
    return torch.stack([by_channel & 15, by_channel >> 4], dim=3).reshape(blocks * NATIVE_ROWS, steps * 8)


def _row_chunks(n: int):
    """Slices of [0, n) of QUANTIZE_ROWS rows."""
    return [slice(start, min(start + QUANTIZE_ROWS, n)) for start in range(0, n, QUANTIZE_ROWS)]


def int4_group_size(in_features: int, preferred: int = INT4_GROUP_SIZE) -> int:
    """The largest group size the kernel accepts that is at most `preferred` and divides in_features."""
    for size in INT4_GROUP_SIZES:
        if size <= preferred and in_features % size == 0:
            return size
    raise ValueError(
        f"int4 needs in_features divisible by one of the group sizes {INT4_GROUP_SIZES[::-1]}, got {in_features}"
    )


def _unpack_int4(packed: torch.Tensor, n: int, k: int, block: int) -> torch.Tensor:
    """Undo `_convert_weight_to_int4pack_for_cpu`: (n, k / 2) uint8 -> (n, k) uint8 in [0, 15].

    Rows are packed in blocks of `block` (64 with AVX512, 32 with AVX2); per block and input channel, byte j of the
    block's block / 2 bytes holds row j in its low nibble and row block / 2 + j in its high one. A last partial
    block holds rows 2i and 2i + 1 in byte i.
    """
    flat = packed.view(torch.uint8).reshape(-1)
    full = n // block * block
    body = flat[: full * k // 2].view(n // block, k, block // 2)
    rows = torch.cat([body & 15, body >> 4], dim=2)  # (blocks, k, block)
    parts = [rows.permute(0, 2, 1).reshape(full, k)]
    if full < n:
        tail = flat[full * k // 2 :].view(k, (n - full) // 2)
        parts.append(torch.stack([tail & 15, tail >> 4], dim=2).view(k, n - full).t())
    return torch.cat(parts) if len(parts) > 1 else parts[0]


@functools.cache
def _int4_layout() -> int | None:
    """The block size of this torch's int4 packing, found once by a round trip through the packing kernel (the
    layout depends on the CPU's vector width), or None if it is none that `_unpack_int4` knows."""
    n, k = 80, 64  # a full 64-row block and a partial one
    probe = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, INT4_INNER_K_TILES)
    for block in (64, 32):
        try:
            if torch.equal(_unpack_int4(packed, n, k, block).to(torch.int32), probe):
                return block
        except RuntimeError:  # sizes that do not fit this block size
            continue
    return None


QUANTIZED_LINEAR = {"int8": Int8Linear, "int4": Int4Linear}


def quantize_linear_layers(model: nn.Module, mode: str, release_mapped_pages: bool = False) -> nn.Module:
    """Replace every nn.Linear of `model` by its `mode` ("int8" or "int4") version, in place, one layer at a time
    (the float weight of a layer is freed as soon as it is replaced, unless something else holds it, like a tied
    embedding). Every layer is checked first, so that an error leaves the model as it was. Returns the model.

    release_mapped_pages: the weights were just loaded as views of a memory-mapped checkpoint that nothing else
    uses (from_pretrained): drop each one's pages once it is quantized (see `_release_file_pages`).
    """
    if mode not in QUANTIZED_LINEAR:
        raise ValueError(f"weight_quantization must be one of {sorted(QUANTIZED_LINEAR)}, got {mode!r}")
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("weight_quantization runs on the CPU only: the int8 and int4 kernels are CPU kernels")
    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for name, layer in layers:
        try:
            if layer.bias is not None:
                raise ValueError("the quantized layers have no bias (ReplitLM has none)")
            if mode == "int4":
                int4_group_size(layer.in_features)
        except ValueError as error:
            raise ValueError(f"cannot quantize {name} ({layer}) to {mode}: {error}") from None
    file_ranges = _file_mappings() if release_mapped_pages else []
    kept = {p.data_ptr() for m in model.modules() if not isinstance(m, nn.Linear) for p in m.parameters(recurse=False)}
    for name, layer in layers:
        parent, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent), attribute, QUANTIZED_LINEAR[mode](layer.weight))
        if layer.weight.data_ptr() not in kept:  # a tied LM head's weight lives on as the embedding
            _release_file_pages(layer.weight, file_ranges)
        _return_freed_heap()
    return model


def _return_freed_heap() -> None:
    """Hand the memory freed inside the C heap back to the system (glibc's malloc_trim; elsewhere nothing).

    Quantizing frees a float32 copy per chunk of rows and one weight layout per layer. After the first large free,
    glibc serves allocations up to that size from its heap instead of mapping them, and what is freed there stays
    counted to the process until trimmed: without this, loading a 411 MB checkpoint in int8 grew the process by
    1.1-1.24x its size, with it by 0.68-0.88x (int4: 0.47x; tests/test_quantization.py holds both)."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


@functools.cache
def _libc() -> ctypes.CDLL:
    """The C library this process runs on (for madvise and malloc_trim)."""
    return ctypes.CDLL(None, use_errno=True)


def _file_mappings() -> list[tuple[int, int]]:
    """The address ranges of this process that map files (Linux; elsewhere none)."""
    if not sys.platform.startswith("linux"):
        return []
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()  # address range, permissions, offset, device, inode, path
            if len(fields) >= 6 and fields[5].startswith("/"):
                start, end = (int(address, 16) for address in fields[0].split("-"))
                ranges.append((start, end))
    return ranges


def _release_file_pages(tensor: torch.Tensor, file_ranges: list[tuple[int, int]]) -> None:
    """Drop from this process the pages of a weight that was just quantized, if it is a view of a mapped file.

    from_pretrained maps a safetensors checkpoint into memory, and every page that quantizing reads stays counted
    to this process until the whole mapping is released: a peak of the full checkpoint on top of the quantized
    model (measured: 1.6x the checkpoint's size for int8, 0.64x with this). The pages of a freshly loaded
    checkpoint are unmodified copies of the file, so dropping them (madvise MADV_DONTNEED) loses nothing: read
    again, they would come from the file again. Memory that does not map a file is left alone.
    """
    page = 4096
    begin = -(-tensor.data_ptr() // page) * page
    end = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page * page
    if end <= begin or not any(start <= begin and end <= stop for start, stop in file_ranges):
        return
    _libc().madvise(ctypes.c_void_p(begin), ctypes.c_size_t(end - begin), 4)  # 4: MADV_DONTNEED


NATIVE_SOURCE = r"""// Matrix products with int8 and int4 weights for ReplitLM on the CPU, compiled at first use.
// Weights come in blocks of 16 output channels so that one 512-bit vector holds 4 input channels of each of the 16.
// Activations are quantized in blocks of 32 input channels (a scale per block, as llama.cpp's q8_0): to int8, or
// for the int8 weights' precise kernel to int16 (a rounding error 256 times smaller than bfloat16's, so that the
// product is the float one); products are summed in int32 per block, then scaled in float32. Activations and outputs
// are bfloat16 or float32 (`bf16` flags), so that no conversion runs around a product.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define VNNI512 1
#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#define AMX_INT8 1
#if defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define AMX_BF16 1
#endif
#endif
#endif

#if defined(VNNI512) && defined(__AVX512BF16__)
#define BF16_512 1
#endif

#define BLOCK 32  // input channels per activation block (and per int4 group)
// Bytes of weights requested ahead of the loads: the hardware prefetchers alone left the int4 kernel at 14 GB/s of
// memory bandwidth where int8 reached 18, on a 2-core Xeon; 2048 ahead took int4 to 17-18 GB/s (1024 and 4096
// did about as well).
#define PREFETCH_AHEAD 2048

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

// float32 rounded to the nearest bfloat16, ties to even (as torch's conversion, NaN aside).
static inline uint16_t float_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    bits += 0x7FFF + ((bits >> 16) & 1);
    return (uint16_t)(bits >> 16);
}


// Activations quantized: xq (rows, k) int8, or int16 where wide; per (row, block) the scale xs, the sum of xq and
// the sum of x.
typedef struct {
    void *xq;
    float *xs, *xsum;
    int32_t *xqsum;
} activations;

// x: (rows, k) float32, or bfloat16 where x_bf16, quantized into one allocation (free a.xq) of `padded` rows, the
// rows past `rows` zero. 0 if out of memory.
static int quantize_activations(const void *x, int x_bf16, int64_t rows, int64_t padded, int64_t k, int wide,
                                int threads, activations *a) {
    const int64_t width = wide ? 2 : 1, bytes = padded * k * width, all = padded * (k / BLOCK);
    const int64_t blocks = rows * (k / BLOCK);
    const float levels = wide ? 32767.f : 127.f;
    char *buffer = malloc(bytes + all * 12);
    if (!buffer) return 0;
    a->xq = buffer;
    a->xs = (float *)(buffer + bytes);  // padded * k is a multiple of BLOCK: aligned for floats
    a->xsum = a->xs + all;
    a->xqsum = (int32_t *)(a->xsum + all);
    float *xs = a->xs, *xsum = a->xsum;
    int32_t *xqsum = a->xqsum;
    memset(buffer + rows * k * width, 0, (padded - rows) * k * width);
    for (int64_t i = blocks; i < all; i++) xs[i] = xsum[i] = 0.f, xqsum[i] = 0;
#pragma omp parallel for num_threads(threads) schedule(static) if (blocks >= 1024)
    for (int64_t i = 0; i < blocks; i++) {
        float v[BLOCK];
        for (int j = 0; j < BLOCK; j++)
            v[j] = x_bf16 ? bf16_to_float(((const uint16_t *)x)[i * BLOCK + j]) : ((const float *)x)[i * BLOCK + j];
        float amax = 0.f, sum = 0.f;
        for (int j = 0; j < BLOCK; j++) {
            amax = fmaxf(amax, fabsf(v[j]));
            sum += v[j];
        }
        // A NaN or an infinity in the block (fmaxf skips NaNs): its scale NaN, so that the products are NaN as
        // float math's, and its integers 0 (lrintf of a NaN is undefined).
        const int finite = !isnan(sum) && !isinf(amax);
        float scale = finite ? amax / levels : NAN, inverse = finite && amax > 0.f ? levels / amax : 0.f;
        int32_t qsum = 0;
        for (int j = 0; j < BLOCK; j++) {
            int32_t q = finite ? (int32_t)lrintf(v[j] * inverse) : 0;
            if (wide)
                ((int16_t *)buffer)[i * BLOCK + j] = (int16_t)q;
            else
                ((int8_t *)buffer)[i * BLOCK + j] = (int8_t)q;
            qsum += q;
        }
        xs[i] = scale;
        xqsum[i] = qsum;
        xsum[i] = sum;
    }
    return 1;
}

// int8 weights: w[n / 16][k / 4][16][4] uint8 holding q + 128, so that the weights are the unsigned operand of the
// int8 dot product; the 128 * sum(xq) this adds is taken off per block. Scales bfloat16 per 32 input channels,
// wscales[n / 16][k / 32][16]. y[r][o] = sum_b wscale[o][b] xs[r][b] (sum_{i in b} (q[o][i] + 128) xq[r][i] -
// 128 xqsum[r][b]). With int16 activations, 4 input channels of 8 output channels are widened to 16 bits per
// 512-bit vector, two inputs per 32-bit lane, and each channel's two lanes are added per block.
// int4 weights: w[n / 16][k / 8][16][4] uint8, byte j of a channel's 4 holding q[8s + j] in its low nibble and
// q[8s + 4 + j] in its high one; q in [0, 15], weight = (q - 8) * scale + zero, scale and zero bfloat16 per 32
// input channels: scales[2][n / 16][k / 32][16], the scales then the zeros. y[r][o] = sum_g scale xs (sum q xq -
// 8 xqsum) + zero xsum.
// y: (rows, n), float32 or bfloat16 where y_bf16.

#ifdef VNNI512
static inline __m512i bf16_bits(__m512 v) {  // float_to_bf16 of 16 floats, in the low half of each 32-bit lane
    __m512i bits = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    return _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
}

static inline void store16(void *y, int64_t at, __m512 v, int y_bf16) {
    if (y_bf16)
        _mm256_storeu_si256((__m256i *)((uint16_t *)y + at), _mm512_cvtepi32_epi16(bf16_bits(v)));
    else
        _mm512_storeu_ps((float *)y + at, v);
}

static inline __m512 bf16x16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

// The dot products of one block of 32 input channels with R rows of activations, per output channel (16 lanes).
static inline __attribute__((always_inline)) void int8_block_dots(const uint8_t *wb, int64_t k, int64_t b,
        const void *xq, int R, int wide, __m512i *dot) {
    if (!wide) {
        for (int r = 0; r < R; r++) dot[r] = _mm512_setzero_si512();
        for (int j = 0; j < BLOCK / 4; j++) {
            __m512i w = _mm512_loadu_si512(wb + (b * (BLOCK / 4) + j) * 64);
            _mm_prefetch((const char *)(wb + (b * (BLOCK / 4) + j) * 64 + PREFETCH_AHEAD), _MM_HINT_T0);
            for (int r = 0; r < R; r++) {
                int32_t four;
                memcpy(&four, (const int8_t *)xq + r * k + b * BLOCK + j * 4, 4);
                dot[r] = _mm512_dpbusd_epi32(dot[r], w, _mm512_set1_epi32(four));
            }
        }
        return;
    }
    // int16: channels 0-7 in `low`, 8-15 in `high`, inputs 0-1 of the 4 in a lane, inputs 2-3 in the next.
    static const int32_t first[16] = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
    __m512i low[4], high[4];
    for (int r = 0; r < R; r++) low[r] = high[r] = _mm512_setzero_si512();
    for (int j = 0; j < BLOCK / 4; j++) {
        const uint8_t *p = wb + (b * (BLOCK / 4) + j) * 64;
        __m512i w_low = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)p));
        __m512i w_high = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(p + 32)));
        _mm_prefetch((const char *)(p + PREFETCH_AHEAD), _MM_HINT_T0);
        for (int r = 0; r < R; r++) {
            int64_t four;
            memcpy(&four, (const int16_t *)xq + r * k + b * BLOCK + j * 4, 8);
            __m512i x = _mm512_set1_epi64(four);
            low[r] = _mm512_dpwssd_epi32(low[r], w_low, x);
            high[r] = _mm512_dpwssd_epi32(high[r], w_high, x);
        }
    }
    const __m512i even = _mm512_loadu_si512(first), odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    for (int r = 0; r < R; r++)
        dot[r] = _mm512_add_epi32(_mm512_permutex2var_epi32(low[r], even, high[r]),
                                  _mm512_permutex2var_epi32(low[r], odd, high[r]));
}

static inline __attribute__((always_inline)) void int8_tile(const uint8_t *wb, const uint16_t *sb, int64_t k,
        const void *xq, const float *xs, const int32_t *xqsum, int R, int wide, void *y, int64_t n, int y_bf16) {
    __m512 acc[4];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    const int64_t blocks = k / BLOCK;
    for (int64_t b = 0; b < blocks; b++) {
        __m512i dot[4];
        int8_block_dots(wb, k, b, xq, R, wide, dot);
        __m512 scale = bf16x16(sb + b * 16);
        for (int r = 0; r < R; r++) {
            __m512i exact = _mm512_sub_epi32(dot[r], _mm512_set1_epi32(128 * xqsum[r * blocks + b]));
            __m512 both = _mm512_mul_ps(scale, _mm512_set1_ps(xs[r * blocks + b]));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact), both, acc[r]);
        }
    }
    for (int r = 0; r < R; r++) store16(y, r * n, acc[r], y_bf16);
}

static inline __attribute__((always_inline)) void int4_tile(const uint8_t *wb, const uint16_t *sb,
        const uint16_t *zb, int64_t k, const int8_t *xq, const float *xs, const int32_t *xqsum, const float *xsum,
        int R, void *y, int64_t n, int y_bf16) {
    __m512 acc[4];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    const int64_t groups = k / BLOCK;
    const __m512i low = _mm512_set1_epi8(15);
    for (int64_t g = 0; g < groups; g++) {
        __m512i dot[4];
        for (int r = 0; r < R; r++) dot[r] = _mm512_setzero_si512();
        for (int s = 0; s < BLOCK / 8; s++) {
            __m512i packed = _mm512_loadu_si512(wb + (g * (BLOCK / 8) + s) * 64);
            _mm_prefetch((const char *)(wb + (g * (BLOCK / 8) + s) * 64 + PREFETCH_AHEAD), _MM_HINT_T0);
            __m512i w0 = _mm512_and_si512(packed, low);
            __m512i w1 = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low);
            for (int r = 0; r < R; r++) {
                int32_t four0, four1;
                memcpy(&four0, xq + r * k + g * BLOCK + s * 8, 4);
                memcpy(&four1, xq + r * k + g * BLOCK + s * 8 + 4, 4);
                dot[r] = _mm512_dpbusd_epi32(dot[r], w0, _mm512_set1_epi32(four0));
                dot[r] = _mm512_dpbusd_epi32(dot[r], w1, _mm512_set1_epi32(four1));
            }
        }
        __m512 scale = bf16x16(sb + g * 16), zero = bf16x16(zb + g * 16);
        for (int r = 0; r < R; r++) {
            __m512i centred = _mm512_sub_epi32(dot[r], _mm512_set1_epi32(8 * xqsum[r * groups + g]));
            __m512 part = _mm512_mul_ps(_mm512_cvtepi32_ps(centred), _mm512_set1_ps(xs[r * groups + g]));
            acc[r] = _mm512_fmadd_ps(part, scale, acc[r]);
            acc[r] = _mm512_fmadd_ps(zero, _mm512_set1_ps(xsum[r * groups + g]), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) store16(y, r * n, acc[r], y_bf16);
}
#elif defined(__AVX2__) && defined(__FMA__)
// AVX2 (most laptop CPUs): the same tiles, each 16 output channels as two halves of 8 (one 256-bit vector holds 4
// input channels of 8), with the same integer sums and the same float steps as the AVX512 ones, so that the outputs
// are theirs bit for bit. AVX2 has no unsigned-by-signed dot product into int32: vpmaddubsw multiplies bytes into
// pairs summed in int16 (saturating), vpmaddwd adds those pairs into int32. For int8 weights, whose q + 128 times
// an int8 activation would saturate the pairs, the weights go back to q (the sign bit flipped), the unsigned
// operand is |q| and the activations take q's sign (llama.cpp's q8_0 products): no pair above 127 * 127 * 2, and no
// 128 * xqsum to take off.
#include <immintrin.h>
#define INT_AVX2 1
static inline __m256i bf16_bits8(__m256 v) {  // float_to_bf16 of 8 floats, in the low half of each 32-bit lane
    __m256i bits = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    return _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
}

static inline void store8(void *y, int64_t at, __m256 v, int y_bf16) {
    if (y_bf16) {
        __m256i bits = bf16_bits8(v);  // each at most 0xFFFF: the unsigned saturating pack keeps it
        _mm_storeu_si128((__m128i *)((uint16_t *)y + at),
                         _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1)));
    } else {
        _mm256_storeu_ps((float *)y + at, v);
    }
}

static inline __m256 bf16x8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

// int8_block_dots of int8_tile above, per half: dot[r][h] the products of channels 8h..8h+7 with row r, q . xq.
static inline __attribute__((always_inline)) void int8_block_dots8(const uint8_t *wb, int64_t k, int64_t b,
        const void *xq, int R, int wide, __m256i dot[][2]) {
    const __m256i sign = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
    if (!wide) {
        for (int r = 0; r < R; r++) dot[r][0] = dot[r][1] = _mm256_setzero_si256();
        for (int j = 0; j < BLOCK / 4; j++) {
            const uint8_t *p = wb + (b * (BLOCK / 4) + j) * 64;
            _mm_prefetch((const char *)(p + PREFETCH_AHEAD), _MM_HINT_T0);
            for (int h = 0; h < 2; h++) {
                __m256i q = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(p + 32 * h)), sign);
                __m256i magnitude = _mm256_abs_epi8(q);
                for (int r = 0; r < R; r++) {
                    int32_t four;
                    memcpy(&four, (const int8_t *)xq + r * k + b * BLOCK + j * 4, 4);
                    __m256i pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(_mm256_set1_epi32(four), q));
                    dot[r][h] = _mm256_add_epi32(dot[r][h], _mm256_madd_epi16(pairs, ones));
                }
            }
        }
        return;
    }
    // int16 activations: the weights widened to 16 bits, 4 channels per vector (a quarter of the 16), each channel's
    // inputs 0-1 in one 32-bit lane and 2-3 in the next; the lanes' pairs added at the end of the block. Sums of
    // (q + 128) xq: at most 255 * 32767 * 32 in magnitude, within int32; 128 xqsum taken off after.
    __m256i quarter[4][4];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < 4; c++) quarter[r][c] = _mm256_setzero_si256();
    for (int j = 0; j < BLOCK / 4; j++) {
        const uint8_t *p = wb + (b * (BLOCK / 4) + j) * 64;
        _mm_prefetch((const char *)(p + PREFETCH_AHEAD), _MM_HINT_T0);
        __m256i w[4];
        for (int c = 0; c < 4; c++) w[c] = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(p + 16 * c)));
        for (int r = 0; r < R; r++) {
            int64_t four;
            memcpy(&four, (const int16_t *)xq + r * k + b * BLOCK + j * 4, 8);
            __m256i x = _mm256_set1_epi64x(four);
            for (int c = 0; c < 4; c++) quarter[r][c] = _mm256_add_epi32(quarter[r][c], _mm256_madd_epi16(w[c], x));
        }
    }
    // hadd of channels 0-3 and 4-7 of a half gives 0, 1, 4, 5 | 2, 3, 6, 7; the 64-bit permutation orders them.
    for (int r = 0; r < R; r++)
        for (int h = 0; h < 2; h++)
            dot[r][h] = _mm256_permute4x64_epi64(_mm256_hadd_epi32(quarter[r][2 * h], quarter[r][2 * h + 1]), 0xD8);
}

static inline __attribute__((always_inline)) void int8_tile(const uint8_t *wb, const uint16_t *sb, int64_t k,
        const void *xq, const float *xs, const int32_t *xqsum, int R, int wide, void *y, int64_t n, int y_bf16) {
    __m256 acc[4][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    const int64_t blocks = k / BLOCK;
    for (int64_t b = 0; b < blocks; b++) {
        __m256i dot[4][2];
        int8_block_dots8(wb, k, b, xq, R, wide, dot);
        for (int h = 0; h < 2; h++) {
            __m256 scale = bf16x8(sb + b * 16 + 8 * h);
            for (int r = 0; r < R; r++) {
                __m256i exact = wide ? _mm256_sub_epi32(dot[r][h], _mm256_set1_epi32(128 * xqsum[r * blocks + b]))
                                     : dot[r][h];
                __m256 both = _mm256_mul_ps(scale, _mm256_set1_ps(xs[r * blocks + b]));
                acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(exact), both, acc[r][h]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int h = 0; h < 2; h++) store8(y, r * n + 8 * h, acc[r][h], y_bf16);
}

static inline __attribute__((always_inline)) void int4_tile(const uint8_t *wb, const uint16_t *sb,
        const uint16_t *zb, int64_t k, const int8_t *xq, const float *xs, const int32_t *xqsum, const float *xsum,
        int R, void *y, int64_t n, int y_bf16) {
    __m256 acc[4][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    const int64_t groups = k / BLOCK;
    const __m256i low = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    for (int64_t g = 0; g < groups; g++) {
        // The group's products summed in int16 before vpmaddwd: a pair at most 15 * 127 * 2, 8 pairs per lane
        // (30480), no saturation.
        __m256i pairs[4][2];
        for (int r = 0; r < R; r++) pairs[r][0] = pairs[r][1] = _mm256_setzero_si256();
        for (int s = 0; s < BLOCK / 8; s++) {
            const uint8_t *p = wb + (g * (BLOCK / 8) + s) * 64;
            _mm_prefetch((const char *)(p + PREFETCH_AHEAD), _MM_HINT_T0);
            for (int h = 0; h < 2; h++) {
                __m256i packed = _mm256_loadu_si256((const __m256i *)(p + 32 * h));
                __m256i w0 = _mm256_and_si256(packed, low);
                __m256i w1 = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low);
                for (int r = 0; r < R; r++) {
                    int32_t four0, four1;
                    memcpy(&four0, xq + r * k + g * BLOCK + s * 8, 4);
                    memcpy(&four1, xq + r * k + g * BLOCK + s * 8 + 4, 4);
                    pairs[r][h] = _mm256_add_epi16(pairs[r][h], _mm256_maddubs_epi16(w0, _mm256_set1_epi32(four0)));
                    pairs[r][h] = _mm256_add_epi16(pairs[r][h], _mm256_maddubs_epi16(w1, _mm256_set1_epi32(four1)));
                }
            }
        }
        for (int h = 0; h < 2; h++) {
            __m256 scale = bf16x8(sb + g * 16 + 8 * h), zero = bf16x8(zb + g * 16 + 8 * h);
            for (int r = 0; r < R; r++) {
                __m256i centred = _mm256_sub_epi32(_mm256_madd_epi16(pairs[r][h], ones),
                                                   _mm256_set1_epi32(8 * xqsum[r * groups + g]));
                __m256 part = _mm256_mul_ps(_mm256_cvtepi32_ps(centred), _mm256_set1_ps(xs[r * groups + g]));
                acc[r][h] = _mm256_fmadd_ps(part, scale, acc[r][h]);
                acc[r][h] = _mm256_fmadd_ps(zero, _mm256_set1_ps(xsum[r * groups + g]), acc[r][h]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int h = 0; h < 2; h++) store8(y, r * n + 8 * h, acc[r][h], y_bf16);
}
#else
static inline void store1(void *y, int64_t at, float v, int y_bf16) {
    if (y_bf16)
        ((uint16_t *)y)[at] = float_to_bf16(v);
    else
        ((float *)y)[at] = v;
}

static void int8_tile(const uint8_t *wb, const uint16_t *sb, int64_t k, const void *xq, const float *xs,
                      const int32_t *xqsum, int R, int wide, void *y, int64_t n, int y_bf16) {
    const int64_t blocks = k / BLOCK;
    for (int r = 0; r < R; r++) {
        for (int c = 0; c < 16; c++) {
            float acc = 0.f;
            for (int64_t b = 0; b < blocks; b++) {
                int32_t dot = 0;
                for (int i = 0; i < BLOCK; i++) {
                    int64_t kk = b * BLOCK + i;
                    int32_t x = wide ? ((const int16_t *)xq)[r * k + kk] : ((const int8_t *)xq)[r * k + kk];
                    dot += (int32_t)wb[(kk / 4) * 64 + c * 4 + kk % 4] * x;
                }
                float both = bf16_to_float(sb[b * 16 + c]) * xs[r * blocks + b];
                acc += (float)(dot - 128 * xqsum[r * blocks + b]) * both;
            }
            store1(y, r * n + c, acc, y_bf16);
        }
    }
}

static void int4_tile(const uint8_t *wb, const uint16_t *sb, const uint16_t *zb, int64_t k, const int8_t *xq,
                      const float *xs, const int32_t *xqsum, const float *xsum, int R, void *y, int64_t n,
                      int y_bf16) {
    const int64_t groups = k / BLOCK;
    for (int r = 0; r < R; r++) {
        for (int c = 0; c < 16; c++) {
            float acc = 0.f;
            for (int64_t g = 0; g < groups; g++) {
                int32_t dot = 0;
                for (int i = 0; i < BLOCK; i++) {
                    int64_t kk = g * BLOCK + i, s = kk / 8, j = kk % 8;
                    uint8_t byte = wb[s * 64 + c * 4 + j % 4];
                    dot += (j < 4 ? byte & 15 : byte >> 4) * xq[r * k + kk];
                }
                float part = (float)(dot - 8 * xqsum[r * groups + g]) * xs[r * groups + g];
                acc += part * bf16_to_float(sb[g * 16 + c]) + bf16_to_float(zb[g * 16 + c]) * xsum[r * groups + g];
            }
            store1(y, r * n + c, acc, y_bf16);
        }
    }
}
#endif

#define TILE 4

// y (rows, n) = x (rows, k) times the weights, x and y bfloat16 where bf16, else float32; the activations
// quantized to int16 where wide, else int8. 0 if out of memory.
int int8_matmul(const uint8_t *w, const uint16_t *wscales, int64_t n, int64_t k, const void *x, int64_t rows,
                void *y, int bf16, int wide, int threads) {
    activations a;
    if (!quantize_activations(x, bf16, rows, rows, k, wide, threads, &a)) return 0;
    const float *xs = a.xs;
    const int32_t *xqsum = a.xqsum;
    const int64_t blocks = k / BLOCK, width = wide ? 2 : 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t ob = 0; ob < n / 16; ob++) {
        const uint8_t *wb = w + ob * 16 * k;
        const uint16_t *sb = wscales + ob * 16 * blocks;
        for (int64_t r0 = 0; r0 < rows; r0 += TILE) {
            const void *xr = (const char *)a.xq + r0 * k * width;
            const float *sr = xs + r0 * blocks;
            const int32_t *qr = xqsum + r0 * blocks;
            void *yr = (char *)y + (r0 * n + ob * 16) * (bf16 ? 2 : 4);
            switch (rows - r0 < TILE ? rows - r0 : TILE) {
                case 1: int8_tile(wb, sb, k, xr, sr, qr, 1, wide, yr, n, bf16); break;
                case 2: int8_tile(wb, sb, k, xr, sr, qr, 2, wide, yr, n, bf16); break;
                case 3: int8_tile(wb, sb, k, xr, sr, qr, 3, wide, yr, n, bf16); break;
                default: int8_tile(wb, sb, k, xr, sr, qr, 4, wide, yr, n, bf16); break;
            }
        }
    }
    free(a.xq);
    return 1;
}

// 1 where int8_matmul and int4_matmul run on vector instructions (AVX512-VNNI, or AVX2 with FMA); elsewhere they
// are plain C, slower than torch's own int8 and int4 kernels (an int8 decode step 7x slower than bfloat16's).
int int8_vectors_available(void) {
#if defined(VNNI512) || defined(INT_AVX2)
    return 1;
#else
    return 0;
#endif
}

// 1 where amx_matmul runs: built for AMX, and Linux lets this process use the tile registers (a process
// asks for them once).
int amx_available(void) {
#ifdef AMX_INT8
    static int state = -1;
    if (state < 0) state = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    return state;
#else
    return 0;
#endif
}

// int8_matmul with int8 activations, or int4_matmul, on AMX: per 16 rows, 16 output channels and block of 32
// input channels, one tile product (tdpbssd), then the block's scales in AVX512 as int8_tile and int4_tile apply
// them, so that the outputs are theirs bit for bit. The weights' B tiles come from the native layouts once per 16
// output channels: int8's is AMX's layout already (4 input channels of 16 output channels per 64 bytes), made signed
// (q + 128 back to q: the sign bit flipped) so that no per-block correction is left; int4's nibbles are spread to
// one byte each, less 8, for the same reason. The activations are laid out as contiguous A tiles. 0 if out of memory
// or AMX is not available.
int amx_matmul(const uint8_t *w, const uint16_t *scales, int64_t n, int64_t k, const void *x, int64_t rows, void *y,
               int bf16, int int4, int threads) {
#ifdef AMX_INT8
    if (!amx_available()) return 0;
    activations a;
    const int64_t padded = (rows + 15) / 16 * 16, blocks = k / BLOCK;
    if (!quantize_activations(x, bf16, rows, padded, k, 0, threads, &a)) return 0;
    // The activations as A tiles, [rows / 16][blocks][16][32]: each tile 512 contiguous bytes.
    int8_t *xt = aligned_alloc(64, padded * k);
    if (!xt) {
        free(a.xq);
        return 0;
    }
    for (int64_t r = 0; r < padded; r++)
        for (int64_t b = 0; b < blocks; b++)
            memcpy(xt + ((r / 16 * blocks + b) * 16 + r % 16) * BLOCK, (const int8_t *)a.xq + r * k + b * BLOCK, BLOCK);
    const float *xs = a.xs, *xsum = a.xsum;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        struct { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } config = {0};
        config.palette = 1;
        for (int t = 0; t < 2; t++) {  // two blocks in flight, so that one's products overlap the other's scaling
            config.rows[t] = 16, config.colsb[t] = 64;  // tiles 0-1, the products: 16 rows x 16 int32
            config.rows[2 + t] = 16, config.colsb[2 + t] = BLOCK;  // tiles 2-3, activations: 16 rows x 32 int8
            config.rows[4 + t] = BLOCK / 4, config.colsb[4 + t] = 64;  // tiles 4-5, weights: 8 x (16 x 4 int8)
        }
        _tile_loadconfig(&config);
        int8_t *tiles = aligned_alloc(64, 16 * k);  // B tiles of 16 output channels, [k / 4][16][4]
        int32_t dots[2][16][16] __attribute__((aligned(64)));
        if (!tiles) failed = 1;
#pragma omp for schedule(static)
        for (int64_t ob = 0; ob < n / 16; ob++) {
            if (!tiles) continue;
            if (int4) {  // q - 8: the products come centred, as int4_tile makes them with the activations' sums
                const __m512i low = _mm512_set1_epi8(15), eight = _mm512_set1_epi8(8);
                for (int64_t step = 0; step < k / 8; step++) {
                    __m512i packed = _mm512_loadu_si512(w + ob * 8 * k + step * 64);
                    _mm512_store_si512(tiles + step * 128, _mm512_sub_epi8(_mm512_and_si512(packed, low), eight));
                    _mm512_store_si512(tiles + step * 128 + 64,
                                       _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(packed, 4), low), eight));
                }
            } else {
                const __m512i sign = _mm512_set1_epi8((char)0x80);
                for (int64_t i = 0; i < 16 * k; i += 64)
                    _mm512_store_si512(tiles + i, _mm512_xor_si512(_mm512_loadu_si512(w + ob * 16 * k + i), sign));
            }
            const uint16_t *sb = scales + ob * 16 * blocks, *zb = sb + n * blocks;  // zero points: int4's only
            for (int64_t r0 = 0; r0 < rows; r0 += 16) {
                __m512 acc[16];
                for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
                for (int64_t b = 0; b < blocks; b += 2) {
                    const int pair = b + 1 < blocks;  // tile numbers must be constants: the pair spelled out
                    _tile_zero(0);
                    _tile_loadd(2, xt + (r0 / 16 * blocks + b) * 16 * BLOCK, BLOCK);
                    _tile_loadd(4, tiles + b * (BLOCK / 4) * 64, 64);
                    _tile_dpbssd(0, 2, 4);
                    if (pair) {
                        _tile_zero(1);
                        _tile_loadd(3, xt + (r0 / 16 * blocks + b + 1) * 16 * BLOCK, BLOCK);
                        _tile_loadd(5, tiles + (b + 1) * (BLOCK / 4) * 64, 64);
                        _tile_dpbssd(1, 3, 5);
                    }
                    _tile_stored(0, dots[0], 64);
                    if (pair) _tile_stored(1, dots[1], 64);
                    for (int t = 0; t <= pair; t++) {
                        const int64_t g = b + t;
                        const __m512 scale = bf16x16(sb + g * 16);
                        if (int4) {
                            const __m512 zero = bf16x16(zb + g * 16);
                            for (int i = 0; i < 16; i++) {
                                const int64_t at = (r0 + i) * blocks + g;
                                __m512 centred = _mm512_cvtepi32_ps(_mm512_load_si512(dots[t][i]));
                                __m512 part = _mm512_mul_ps(centred, _mm512_set1_ps(xs[at]));
                                acc[i] = _mm512_fmadd_ps(part, scale, acc[i]);
                                acc[i] = _mm512_fmadd_ps(zero, _mm512_set1_ps(xsum[at]), acc[i]);
                            }
                        } else {
                            for (int i = 0; i < 16; i++) {
                                __m512 both = _mm512_mul_ps(scale, _mm512_set1_ps(xs[(r0 + i) * blocks + g]));
                                __m512 products = _mm512_cvtepi32_ps(_mm512_load_si512(dots[t][i]));
                                acc[i] = _mm512_fmadd_ps(products, both, acc[i]);
                            }
                        }
                    }
                }
                for (int i = 0; i < 16 && r0 + i < rows; i++)
                    store16((char *)y + ((r0 + i) * n + ob * 16) * (bf16 ? 2 : 4), 0, acc[i], bf16);
            }
        }
        free(tiles);
        _tile_release();
    }
    free(xt);
    free(a.xq);
    return !failed;
#else
    (void)w, (void)scales, (void)n, (void)k, (void)x, (void)rows, (void)y, (void)bf16, (void)int4, (void)threads;
    return 0;
#endif
}

// 1 where amx_bf16_matmul runs: AMX's bfloat16 products built in, and the tile registers granted.
int amx_bf16_available(void) {
#ifdef AMX_BF16
    return amx_available();
#else
    return 0;
#endif
}

#ifdef AMX_BF16
// Two rows of a bfloat16 B tile (16 output channels x 2 input channels each, [pair][16][2]) from 64 bytes of a
// native layout holding 4 input channels of each of 16 output channels ([16][4] bytes, the integers q as they are
// to be converted: signed where `is_signed`), each q unpacked to q * scale + base in float32, then rounded to
// bfloat16: the values int8_dequantize and int4_dequantize write. scale and base: per output channel, spread to
// the lanes of 8 channels x 2 inputs (channels 0-7 in [0], 8-15 in [1]).
static inline __attribute__((always_inline)) void bf16_pair_rows(__m512i four, int is_signed, const __m512 *scale,
                                                                 const __m512 *base, uint16_t *out) {
    // Channel c's inputs 2p and 2p + 1 are 16-bit word 2c + p of the 64 bytes; row p wants them at word c.
    static const uint16_t order[32] = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30,
                                       1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
    const __m512i rows = _mm512_permutexvar_epi16(_mm512_loadu_si512(order), four);
    __m512 values[4];
    for (int part = 0; part < 4; part++) {  // 16 bytes each: row 0's channels 0-7, 8-15, then row 1's
        const __m128i bytes = _mm512_extracti32x4_epi32(rows, part);
        const __m512i q = is_signed ? _mm512_cvtepi8_epi32(bytes) : _mm512_cvtepu8_epi32(bytes);
        values[part] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), scale[part & 1], base[part & 1]);
    }
    _mm512_store_si512(out, (__m512i)_mm512_cvtne2ps_pbh(values[1], values[0]));
    _mm512_store_si512(out + 32, (__m512i)_mm512_cvtne2ps_pbh(values[3], values[2]));
}

// The weights of 16 output channels as bfloat16 B tiles, [k / 32][16][16][2]: the values of int8_dequantize or
// int4_dequantize, laid out for tdpbf16ps (one tile per 32 input channels).
static void bf16_b_tiles(const uint8_t *wb, const uint16_t *sb, const uint16_t *zb, int64_t k, int int4,
                         uint16_t *tiles) {
    static const int32_t low_channels[16] = {0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7};
    const __m512i spread = _mm512_loadu_si512(low_channels), eight = _mm512_set1_epi32(8);
    const __m512i nibble = _mm512_set1_epi8(15), sign = _mm512_set1_epi8((char)0x80);
    for (int64_t b = 0; b < k / BLOCK; b++) {
        const __m512 s = bf16x16(sb + b * 16);
        // int4: q * scale + (zero - 8 scale), as int4_dequantize; int8: (q + 128 with the sign bit flipped) * scale.
        const __m512 offset = int4 ? _mm512_sub_ps(bf16x16(zb + b * 16), _mm512_mul_ps(_mm512_set1_ps(8.f), s))
                                   : _mm512_setzero_ps();
        const __m512 scale[2] = {_mm512_permutexvar_ps(spread, s),
                                 _mm512_permutexvar_ps(_mm512_add_epi32(spread, eight), s)};
        const __m512 base[2] = {_mm512_permutexvar_ps(spread, offset),
                                _mm512_permutexvar_ps(_mm512_add_epi32(spread, eight), offset)};
        uint16_t *tile = tiles + b * 16 * 32;
        if (int4) {
            for (int step = 0; step < BLOCK / 8; step++) {  // low nibbles: inputs 0-3 of the 8; high: 4-7
                const __m512i packed = _mm512_loadu_si512(wb + (b * (BLOCK / 8) + step) * 64);
                bf16_pair_rows(_mm512_and_si512(packed, nibble), 0, scale, base, tile + step * 128);
                bf16_pair_rows(_mm512_and_si512(_mm512_srli_epi16(packed, 4), nibble), 0, scale, base,
                               tile + step * 128 + 64);
            }
        } else {
            for (int step = 0; step < BLOCK / 4; step++)
                bf16_pair_rows(_mm512_xor_si512(_mm512_loadu_si512(wb + (b * (BLOCK / 4) + step) * 64), sign), 1,
                               scale, base, tile + step * 64);
        }
    }
}

// C tiles 0-3 (rows 0-15 and 16-31, times channels 0-15 and 16-31) over all of k; tile numbers must be constants,
// so each of the four cases is spelled out by the compiler from the constant flags.
static inline __attribute__((always_inline)) void amx_bf16_tiles(const uint16_t *xa, int64_t k, const uint16_t *b0,
        const uint16_t *b1, int two_rows, int two_columns, float c[4][16][16]) {
    _tile_zero(0);
    if (two_columns) _tile_zero(1);
    if (two_rows) _tile_zero(2);
    if (two_rows && two_columns) _tile_zero(3);
    for (int64_t b = 0; b < k / BLOCK; b++) {
        _tile_loadd(6, b0 + b * 512, 64);
        if (two_columns) _tile_loadd(7, b1 + b * 512, 64);
        _tile_loadd(4, xa + b * BLOCK, k * 2);
        _tile_dpbf16ps(0, 4, 6);
        if (two_columns) _tile_dpbf16ps(1, 4, 7);
        if (two_rows) {
            _tile_loadd(5, xa + 16 * k + b * BLOCK, k * 2);
            _tile_dpbf16ps(2, 5, 6);
            if (two_columns) _tile_dpbf16ps(3, 5, 7);
        }
    }
    _tile_stored(0, c[0], 64);
    if (two_columns) _tile_stored(1, c[1], 64);
    if (two_rows) _tile_stored(2, c[2], 64);
    if (two_rows && two_columns) _tile_stored(3, c[3], 64);
}
#endif

// int8_matmul or int4_matmul with the activations in bfloat16 (not quantized): per 32 output channels, the weights
// are unpacked once to bfloat16 B tiles (the values of int8_dequantize / int4_dequantize), then multiplied with
// every row on AMX (tdpbf16ps, float32 sums): the "dequantize" route's product without the bfloat16 weight ever
// written out to memory. 0 if out of memory or AMX's bfloat16 products are not available.
int amx_bf16_matmul(const uint8_t *w, const uint16_t *scales, int64_t n, int64_t k, const void *x, int64_t rows,
                    void *y, int bf16, int int4, int threads) {
#ifdef AMX_BF16
    if (!amx_available()) return 0;
    const int64_t padded = (rows + 15) / 16 * 16, blocks = k / BLOCK;
    // The activations in bfloat16, rows padded with zeros to a multiple of 16: x itself where it is so already.
    uint16_t *xa = (uint16_t *)x;
    if (!bf16 || padded != rows) {
        xa = malloc(padded * k * 2);
        if (!xa) return 0;
        if (bf16)
            memcpy(xa, x, rows * k * 2);
        else
#pragma omp parallel for num_threads(threads) schedule(static)
            for (int64_t r = 0; r < rows; r++)
                for (int64_t i = r * k; i < (r + 1) * k; i++) xa[i] = float_to_bf16(((const float *)x)[i]);
        memset(xa + rows * k, 0, (padded - rows) * k * 2);
    }
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        struct { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } config = {0};
        config.palette = 1;
        for (int t = 0; t < 8; t++) config.rows[t] = 16, config.colsb[t] = 64;  // 16 x 16 float32 or 16 x 32 bf16
        _tile_loadconfig(&config);
        uint16_t *tiles = aligned_alloc(64, 2 * 16 * k * 2);  // B tiles of 32 output channels
        float c[4][16][16] __attribute__((aligned(64)));
        if (!tiles) failed = 1;
        const int64_t bytes = int4 ? 8 * k : 16 * k;  // of the native weights per 16 output channels
#pragma omp for schedule(static)
        for (int64_t ob = 0; ob < n / 16; ob += 2) {
            if (!tiles) continue;
            const int two_columns = ob + 1 < n / 16;
            for (int t = 0; t <= two_columns; t++) {
                const uint16_t *sb = scales + (ob + t) * 16 * blocks;
                bf16_b_tiles(w + (ob + t) * bytes, sb, sb + n * blocks, k, int4, tiles + t * 16 * k);
            }
            for (int64_t r0 = 0; r0 < padded; r0 += 32) {
                const int two_rows = r0 + 16 < padded;
                const uint16_t *xr = xa + r0 * k, *b1 = tiles + 16 * k;
                if (two_rows && two_columns) amx_bf16_tiles(xr, k, tiles, b1, 1, 1, c);
                else if (two_rows) amx_bf16_tiles(xr, k, tiles, b1, 1, 0, c);
                else if (two_columns) amx_bf16_tiles(xr, k, tiles, b1, 0, 1, c);
                else amx_bf16_tiles(xr, k, tiles, b1, 0, 0, c);
                for (int part = 0; part < 4; part++) {
                    const int64_t row = r0 + (part >> 1) * 16, column = (ob + (part & 1)) * 16;
                    if ((part & 1) > 0 && !two_columns) continue;
                    for (int i = 0; i < 16 && row + i < rows; i++)
                        store16(y, (row + i) * n + column, _mm512_load_ps(c[part][i]), bf16);
                }
            }
        }
        free(tiles);
        _tile_release();
    }
    if (xa != x) free(xa);
    return !failed;
#else
    (void)w, (void)scales, (void)n, (void)k, (void)x, (void)rows, (void)y, (void)bf16, (void)int4, (void)threads;
    return 0;
#endif
}

int int4_matmul(const uint8_t *w, const uint16_t *scales, int64_t n, int64_t k,
                const void *x, int64_t rows, void *y, int bf16, int threads) {
    activations a;
    if (!quantize_activations(x, bf16, rows, rows, k, 0, threads, &a)) return 0;
    const int8_t *xq = a.xq;
    const float *xs = a.xs, *xsum = a.xsum;
    const int32_t *xqsum = a.xqsum;
    const int64_t groups = k / BLOCK;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t ob = 0; ob < n / 16; ob++) {
        const uint8_t *wb = w + ob * 8 * k;
        const uint16_t *sb = scales + ob * 16 * groups, *zb = sb + n * groups;
        for (int64_t r0 = 0; r0 < rows; r0 += TILE) {
            const int8_t *xr = xq + r0 * k;
            const float *sr = xs + r0 * groups, *ur = xsum + r0 * groups;
            const int32_t *qr = xqsum + r0 * groups;
            void *yr = (char *)y + (r0 * n + ob * 16) * (bf16 ? 2 : 4);
            switch (rows - r0 < TILE ? rows - r0 : TILE) {
                case 1: int4_tile(wb, sb, zb, k, xr, sr, qr, ur, 1, yr, n, bf16); break;
                case 2: int4_tile(wb, sb, zb, k, xr, sr, qr, ur, 2, yr, n, bf16); break;
                case 3: int4_tile(wb, sb, zb, k, xr, sr, qr, ur, 3, yr, n, bf16); break;
                default: int4_tile(wb, sb, zb, k, xr, sr, qr, ur, 4, yr, n, bf16); break;
            }
        }
    }
    free(a.xq);
    return 1;
}

// ----- A vector of VECTOR_LANES floats: AVX512 (16) or AVX2 with FMA (8) -----
// The kernels below written once over it: decode_attention, and matvec (bfloat16 too where the CPU has no AVX512-BF16).
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define VECTOR_LANES 16
typedef __m512 vfloat;
#define vzero _mm512_setzero_ps
#define vset1 _mm512_set1_ps
#define vadd _mm512_add_ps
#define vsub _mm512_sub_ps
#define vmul _mm512_mul_ps
#define vmax _mm512_max_ps
#define vfmadd _mm512_fmadd_ps
#define vloadu _mm512_loadu_ps
#define vstoreu _mm512_storeu_ps
#define vsum _mm512_reduce_add_ps
#define vround(x) _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define vtoint _mm512_cvtps_epi32
#define vbits _mm512_castsi512_ps
#define ishl _mm512_slli_epi32
#define iadd _mm512_add_epi32
#define iset1 _mm512_set1_epi32
// The count < 16 values at `at` of a row, bfloat16 or float32, as float32 (the other lanes zero), reading no further.
static inline vfloat vload_part(const void *row, int64_t at, int count, int bf16) {
    const __mmask16 lanes = (__mmask16)((1u << count) - 1);
    if (!bf16) return _mm512_maskz_loadu_ps(lanes, (const float *)row + at);
    return vbits(ishl(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, (const uint16_t *)row + at)), 16));
}
static inline __attribute__((always_inline)) vfloat vload(const void *row, int64_t at, int bf16) {
    if (!bf16) return _mm512_loadu_ps((const float *)row + at);
    return vbits(ishl(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)row + at))), 16));
}
static inline vfloat vzero_below(vfloat x, vfloat limit, vfloat value) {  // value where x > limit, else 0
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, limit, _CMP_GT_OQ), value);
}
// 2 * VECTOR_LANES bfloat16 values as float32: the even-indexed ones (the low halves of the 32-bit lanes) and the
// odd-indexed ones, a shift and a mask with no shuffle.
static inline __attribute__((always_inline)) void vload_pairs(const uint16_t *p, vfloat *even, vfloat *odd) {
    const __m512i v = _mm512_loadu_si512(p);
    *even = vbits(ishl(v, 16));
    *odd = vbits(_mm512_and_si512(v, iset1((int)0xFFFF0000)));
}
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define VECTOR_LANES 8
typedef __m256 vfloat;
#define vzero _mm256_setzero_ps
#define vset1 _mm256_set1_ps
#define vadd _mm256_add_ps
#define vsub _mm256_sub_ps
#define vmul _mm256_mul_ps
#define vmax _mm256_max_ps
#define vfmadd _mm256_fmadd_ps
#define vloadu _mm256_loadu_ps
#define vstoreu _mm256_storeu_ps
#define vround(x) _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define vtoint _mm256_cvtps_epi32
#define vbits _mm256_castsi256_ps
#define ishl _mm256_slli_epi32
#define iadd _mm256_add_epi32
#define iset1 _mm256_set1_epi32
static inline float vsum(vfloat x) {
    __m128 half = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    half = _mm_add_ps(half, _mm_movehl_ps(half, half));
    return _mm_cvtss_f32(_mm_add_ss(half, _mm_movehdup_ps(half)));
}
static inline vfloat vload_part(const void *row, int64_t at, int count, int bf16) {
    float values[8] = {0};
    for (int i = 0; i < count; i++)
        values[i] = bf16 ? bf16_to_float(((const uint16_t *)row)[at + i]) : ((const float *)row)[at + i];
    return _mm256_loadu_ps(values);
}
static inline __attribute__((always_inline)) vfloat vload(const void *row, int64_t at, int bf16) {
    if (!bf16) return _mm256_loadu_ps((const float *)row + at);
    return vbits(ishl(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + at))), 16));
}
static inline vfloat vzero_below(vfloat x, vfloat limit, vfloat value) {
    return _mm256_and_ps(_mm256_cmp_ps(x, limit, _CMP_GT_OQ), value);
}
static inline __attribute__((always_inline)) void vload_pairs(const uint16_t *p, vfloat *even, vfloat *odd) {
    const __m256i v = _mm256_loadu_si256((const __m256i *)p);
    *even = vbits(ishl(v, 16));
    *odd = vbits(_mm256_and_si256(v, iset1((int)0xFFFF0000)));
}
#endif


// 1 where matvec runs: built with AVX512 or AVX2 (bfloat16 through AVX512-BF16's dot products where built with it).
int matvec_available(void) {
#if defined(BF16_512) || defined(VECTOR_LANES)
    return 1;
#else
    return 0;
#endif
}

#ifdef VECTOR_LANES
// matvec's float32 loops: the same two loop orders as bfloat16's below, float32 multiply-adds.
static void f32_matvec(const float *w, int64_t n, int64_t k, const float *x, float *y, int one_stream, int threads) {
    if (one_stream) {
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t o = 0; o < n; o++) {
            const float *row = w + o * k;
            vfloat acc[4] = {vzero(), vzero(), vzero(), vzero()};
            int64_t i = 0;
            for (; i + 4 * VECTOR_LANES <= k; i += 4 * VECTOR_LANES)
                for (int a = 0; a < 4; a++)
                    acc[a] = vfmadd(vloadu(row + i + a * VECTOR_LANES), vloadu(x + i + a * VECTOR_LANES), acc[a]);
            for (int a = 0; i < k; i += VECTOR_LANES, a++)  // k % 32 == 0: at most two vectors left
                acc[a] = vfmadd(vloadu(row + i), vloadu(x + i), acc[a]);
            y[o] = vsum(vadd(vadd(acc[0], acc[1]), vadd(acc[2], acc[3])));
        }
        return;
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o0 = 0; o0 < n; o0 += 4) {
        const int channels = n - o0 < 4 ? (int)(n - o0) : 4;
        vfloat acc[4] = {vzero(), vzero(), vzero(), vzero()};
        for (int64_t i = 0; i < k; i += VECTOR_LANES) {
            const vfloat xv = vloadu(x + i);
            for (int c = 0; c < channels; c++) {
                const float *row = w + (o0 + c) * k + i;
                _mm_prefetch((const char *)(row + PREFETCH_AHEAD / 4), _MM_HINT_T0);
                acc[c] = vfmadd(vloadu(row), xv, acc[c]);
            }
        }
        for (int c = 0; c < channels; c++) y[o0 + c] = vsum(acc[c]);
    }
}
#endif

// y (1, n) = x (1, k) times w (n, k) transposed, w row-major as nn.Linear holds it, k a multiple of 32: one row of
// a model's decoding. `bf16` 1: w, x and y bfloat16, 32 products per `vdpbf16ps`, float32 sums; 0: all float32, float32
// multiply-adds (F.linear's sums in another order, so not bit for bit its result). Two loop orders, which the
// route chooser measures as two routes, since each CPU prefers another: `one_stream` 0 takes 4 output channels at a
// time, 4 streams of weights each with a software prefetch ahead (as the int8/int4 kernels: fastest on the Xeon);
// 1 takes one output channel at a time with 4 sums along k and no software prefetch, one contiguous stream per
// thread that the hardware prefetchers follow (on an AMD EPYC, Zen 4: 78-81 GB/s over the 17 products of a 4-layer
// decode step, against 57-66 GB/s for the 4 streams). Without AVX512-BF16, bfloat16 takes the same two loop orders
// over the vector layer (AVX512 or AVX2); 0 where built with neither.
int matvec(const void *weights, int64_t n, int64_t k, const void *input, int64_t rows, void *output, int bf16,
           int one_stream, int threads) {
    if (rows != 1 || k % 32) return 0;
#ifdef VECTOR_LANES
    if (!bf16) {
        f32_matvec((const float *)weights, n, k, (const float *)input, (float *)output, one_stream, threads);
        return 1;
    }
#else
    if (!bf16) return 0;
#endif
    const uint16_t *w = weights, *x = input;
    uint16_t *y = output;
#ifdef BF16_512
    if (one_stream) {
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t o = 0; o < n; o++) {
            const uint16_t *row = w + o * k;
            __m512 acc[4];
            for (int a = 0; a < 4; a++) acc[a] = _mm512_setzero_ps();
            int64_t i = 0;
            for (; i + 128 <= k; i += 128)
                for (int a = 0; a < 4; a++)
                    acc[a] = _mm512_dpbf16_ps(acc[a], (__m512bh)_mm512_loadu_si512(row + i + 32 * a),
                                              (__m512bh)_mm512_loadu_si512(x + i + 32 * a));
            for (int a = 0; i < k; i += 32, a++)
                acc[a] = _mm512_dpbf16_ps(acc[a], (__m512bh)_mm512_loadu_si512(row + i),
                                          (__m512bh)_mm512_loadu_si512(x + i));
            y[o] = float_to_bf16(_mm512_reduce_add_ps(
                _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]))));
        }
        return 1;
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o0 = 0; o0 < n; o0 += 4) {
        const int channels = n - o0 < 4 ? (int)(n - o0) : 4;
        __m512 acc[4];
        for (int c = 0; c < 4; c++) acc[c] = _mm512_setzero_ps();
        for (int64_t i = 0; i < k; i += 32) {
            const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + i);
            for (int c = 0; c < channels; c++) {
                const uint16_t *row = w + (o0 + c) * k + i;
                _mm_prefetch((const char *)(row + PREFETCH_AHEAD / 2), _MM_HINT_T0);
                acc[c] = _mm512_dpbf16_ps(acc[c], (__m512bh)_mm512_loadu_si512(row), xv);
            }
        }
        for (int c = 0; c < channels; c++) y[o0 + c] = float_to_bf16(_mm512_reduce_add_ps(acc[c]));
    }
    return 1;
#elif defined(VECTOR_LANES)
    // Without AVX512-BF16: the weights widened to float32 as they are read (vload_pairs), times x widened once into
    // the same order, per 2 * VECTOR_LANES inputs the even-indexed ones, then the odd-indexed ones.
    const int64_t pair = 2 * VECTOR_LANES;
    float *xf = malloc(sizeof(float) * k);
    if (!xf) return 0;
    for (int64_t i = 0; i < k; i++) xf[i - i % pair + (i % 2) * VECTOR_LANES + (i % pair) / 2] = bf16_to_float(x[i]);
    if (one_stream) {
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t o = 0; o < n; o++) {
            const uint16_t *row = w + o * k;
            vfloat acc[4] = {vzero(), vzero(), vzero(), vzero()}, even, odd;
            int64_t i = 0;
            for (; i + 2 * pair <= k; i += 2 * pair)  // two blocks at a time: 4 chains of multiply-adds
                for (int a = 0; a < 4; a += 2) {
                    vload_pairs(row + i + a / 2 * pair, &even, &odd);
                    acc[a] = vfmadd(even, vloadu(xf + i + a / 2 * pair), acc[a]);
                    acc[a + 1] = vfmadd(odd, vloadu(xf + i + a / 2 * pair + VECTOR_LANES), acc[a + 1]);
                }
            if (i < k) {
                vload_pairs(row + i, &even, &odd);
                acc[0] = vfmadd(even, vloadu(xf + i), acc[0]);
                acc[1] = vfmadd(odd, vloadu(xf + i + VECTOR_LANES), acc[1]);
            }
            y[o] = float_to_bf16(vsum(vadd(vadd(acc[0], acc[1]), vadd(acc[2], acc[3]))));
        }
    } else {
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t o0 = 0; o0 < n; o0 += 4) {
            const int channels = n - o0 < 4 ? (int)(n - o0) : 4;
            vfloat acc[4] = {vzero(), vzero(), vzero(), vzero()}, even, odd;
            for (int64_t i = 0; i < k; i += pair) {
                const vfloat xe = vloadu(xf + i), xo = vloadu(xf + i + VECTOR_LANES);
                for (int c = 0; c < channels; c++) {
                    const uint16_t *row = w + (o0 + c) * k + i;
                    _mm_prefetch((const char *)(row + PREFETCH_AHEAD / 2), _MM_HINT_T0);
                    vload_pairs(row, &even, &odd);
                    acc[c] = vfmadd(odd, xo, vfmadd(even, xe, acc[c]));
                }
            }
            for (int c = 0; c < channels; c++) y[o0 + c] = float_to_bf16(vsum(acc[c]));
        }
    }
    free(xf);
    return 1;
#else
    (void)w, (void)n, (void)x, (void)y, (void)one_stream, (void)threads;
    return 0;
#endif
}

// ----- One-query attention (decode_attention), over the vector layer above -----
#ifdef VECTOR_LANES
#define MAX_HEAD_DIM 256
#define MAX_VECTORS (MAX_HEAD_DIM / VECTOR_LANES)

// exp of scores less their maximum (so at most 0), to float32's precision: 2^(x log2 e) as 2^n, built in the
// exponent bits, times a polynomial in the fraction (Taylor to degree 7, error below float32's rounding); 0 below
// -87, where float32's exp leaves the normal numbers and a hidden key's score lies.
static inline vfloat vexp(vfloat x) {
    const vfloat limit = vset1(-87.f);
    const vfloat t = vmul(vmax(x, limit), vset1(1.44269504f));
    const vfloat n = vround(t);
    const vfloat f = vmul(vsub(t, n), vset1(0.69314718f));  // e^f, |f| <= ln(2) / 2
    vfloat p = vset1(1.f / 5040);
    const float coefficients[] = {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f};
    for (int c = 0; c < 7; c++) p = vfmadd(p, f, vset1(coefficients[c]));
    const vfloat two_to_n = vbits(ishl(iadd(vtoint(n), iset1(127)), 23));  // n >= -126: a normal number
    return vzero_below(x, limit, vmul(p, two_to_n));
}

static inline __attribute__((always_inline)) void attend_one_query(
    const void *q, const void *k, const void *v, int64_t key_stride, const float *bias, void *out, int64_t kv_len,
    int64_t head_dim, float scale, int bf16, float *scores) {
    const int64_t size = bf16 ? 2 : 4, full = head_dim / VECTOR_LANES, row_bytes = key_stride * size;
    const int tail = head_dim % VECTOR_LANES;
    vfloat qs[MAX_VECTORS], acc[MAX_VECTORS];
    for (int64_t i = 0; i * VECTOR_LANES < head_dim; i++) {
        const int64_t at = i * VECTOR_LANES;
        qs[i] = vmul(i < full ? vload(q, at, bf16) : vload_part(q, at, tail, bf16), vset1(scale));
        acc[i] = vzero();
    }
    const char *keys = k, *values = v;
    float top = -INFINITY;
    int64_t j;
    for (j = 0; j < kv_len; j++) {  // the scores, reading each key once
        const char *row = keys + j * row_bytes;
        vfloat dot = vzero();
        for (int64_t i = 0; i < full; i++) dot = vfmadd(qs[i], vload(row, i * VECTOR_LANES, bf16), dot);
        if (tail) dot = vfmadd(qs[full], vload_part(row, full * VECTOR_LANES, tail, bf16), dot);
        scores[j] = vsum(dot) + bias[j];
        top = fmaxf(top, scores[j]);
    }
    vfloat sums = vzero();
    for (j = 0; j + VECTOR_LANES <= kv_len; j += VECTOR_LANES) {
        const vfloat e = vexp(vsub(vloadu(scores + j), vset1(top)));
        vstoreu(scores + j, e);
        sums = vadd(sums, e);
    }
    float total = vsum(sums);
    for (; j < kv_len; j++) total += scores[j] = expf(scores[j] - top);
    for (j = 0; j < kv_len; j++) {  // the weighted values, reading each value once
        const vfloat weight = vset1(scores[j]);
        const char *row = values + j * row_bytes;
        for (int64_t i = 0; i < full; i++) acc[i] = vfmadd(weight, vload(row, i * VECTOR_LANES, bf16), acc[i]);
        if (tail) acc[full] = vfmadd(weight, vload_part(row, full * VECTOR_LANES, tail, bf16), acc[full]);
    }
    float result[MAX_HEAD_DIM + VECTOR_LANES];
    for (int64_t i = 0; i * VECTOR_LANES < head_dim; i++)
        vstoreu(result + i * VECTOR_LANES, vmul(acc[i], vset1(1.f / total)));
    for (int64_t i = 0; i < head_dim; i++) {
        if (bf16)
            ((uint16_t *)out)[i] = float_to_bf16(result[i]);
        else
            ((float *)out)[i] = result[i];
    }
}
#endif

// 1 where decode_attention runs: built with AVX512 (F, BW, VL) or AVX2 with FMA.
int decode_attention_available(void) {
#ifdef VECTOR_LANES
    return 1;
#else
    return 0;
#endif
}

// One query per (sequence, head) attending to the keys and values of a cache, as in a decoding step:
// out = softmax(scale * q . k_j + bias_j) . v_j over the kv_len keys, scores, softmax and sums in float32.
// q, k, v and out are bfloat16, or float32 where !bf16; bias float32 (ALiBi plus a large negative number where a key is
// hidden). Strides in elements: q (b, h) as qs[0], qs[1]; k and v share theirs (b, h, position) as ks[0..2]; bias
// (b, h) as bs[0..1] (0 where broadcast); out (b, h) as os[0..1]; the head_dim values of a row contiguous everywhere.
// Each (sequence, head) reads its keys and values once, in order: a step's attention at the memory's speed, where
// PyTorch's one-query attention reads a bfloat16 cache at a few GB/s. 0 where not built with AVX512 or AVX2, head_dim
// is larger than MAX_HEAD_DIM, or there is no memory for the scores.
int decode_attention(const void *q, const int64_t *qs, const void *k, const void *v, const int64_t *ks,
                     const float *bias, const int64_t *bs, void *out, const int64_t *os, int64_t batch, int64_t heads,
                     int64_t kv_len, int64_t head_dim, float scale, int bf16, int threads) {
#ifdef VECTOR_LANES
    if (head_dim > MAX_HEAD_DIM) return 0;
    const int64_t size = bf16 ? 2 : 4;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *scores = malloc(sizeof(float) * kv_len);
        if (!scores) failed = 1;
#pragma omp for schedule(static)
        for (int64_t p = 0; p < batch * heads; p++) {
            if (!scores) continue;
            const int64_t b = p / heads, h = p % heads;
            const char *qp = (const char *)q + (b * qs[0] + h * qs[1]) * size;
            const char *kp = (const char *)k + (b * ks[0] + h * ks[1]) * size;
            const char *vp = (const char *)v + (b * ks[0] + h * ks[1]) * size;
            char *op = (char *)out + (b * os[0] + h * os[1]) * size;
            const float *bp = bias + b * bs[0] + h * bs[1];
            if (bf16)
                attend_one_query(qp, kp, vp, ks[2], bp, op, kv_len, head_dim, scale, 1, scores);
            else
                attend_one_query(qp, kp, vp, ks[2], bp, op, kv_len, head_dim, scale, 0, scores);
        }
        free(scores);
    }
    return !failed;
#else
    (void)q, (void)qs, (void)k, (void)v, (void)ks, (void)bias, (void)bs, (void)out, (void)os, (void)batch;
    (void)heads, (void)kv_len, (void)head_dim, (void)scale, (void)bf16, (void)threads;
    return 0;
#endif
}

// The weights back in bfloat16, row-major (n, k), for a long prompt's matrix product.
void int8_dequantize(const uint8_t *w, const uint16_t *wscales, int64_t n, int64_t k, uint16_t *out, int threads) {
    const int64_t blocks = k / BLOCK;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t ob = 0; ob < n / 16; ob++) {
        const uint8_t *wb = w + ob * 16 * k;
        const uint16_t *sb = wscales + ob * 16 * blocks;
        for (int quad = 0; quad < 4; quad++) {  // 4 channels at a time: 16 bytes of each 64, 4 inputs each
            uint16_t *rows = out + (ob * 16 + quad * 4) * k;
            for (int64_t b = 0; b < blocks; b++) {
                float s[4];
                for (int c = 0; c < 4; c++) s[c] = bf16_to_float(sb[b * 16 + quad * 4 + c]);
#ifdef VNNI512
                const __m512 scale = _mm512_set_ps(s[3], s[3], s[3], s[3], s[2], s[2], s[2], s[2],
                                                   s[1], s[1], s[1], s[1], s[0], s[0], s[0], s[0]);
                for (int64_t k4 = b * (BLOCK / 4); k4 < (b + 1) * (BLOCK / 4); k4++) {
                    __m512i q = _mm512_sub_epi32(
                        _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(wb + k4 * 64 + quad * 16))),
                        _mm512_set1_epi32(128));
                    __m512i bits = bf16_bits(_mm512_mul_ps(_mm512_cvtepi32_ps(q), scale));
                    uint64_t four[4];  // channel c's 4 bfloat16 values in four[c]
                    _mm256_storeu_si256((__m256i *)four, _mm512_cvtepi32_epi16(bits));
                    for (int c = 0; c < 4; c++) memcpy(rows + c * k + k4 * 4, &four[c], 8);
                }
#else
                for (int c = 0; c < 4; c++)
                    for (int64_t k4 = b * (BLOCK / 4); k4 < (b + 1) * (BLOCK / 4); k4++)
                        for (int j = 0; j < 4; j++)
                            rows[c * k + k4 * 4 + j] =
                                float_to_bf16((float)((int)wb[k4 * 64 + quad * 16 + c * 4 + j] - 128) * s[c]);
#endif
            }
        }
    }
}

void int4_dequantize(const uint8_t *w, const uint16_t *scales, int64_t n, int64_t k,
                     uint16_t *out, int threads) {
    const int64_t groups = k / BLOCK;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t ob = 0; ob < n / 16; ob++) {
        const uint8_t *wb = w + ob * 8 * k;
        const uint16_t *sb = scales + ob * 16 * groups, *zb = sb + n * groups;
        for (int quad = 0; quad < 4; quad++) {  // 4 channels at a time: 16 bytes of each 64, 8 inputs each
            uint16_t *rows = out + (ob * 16 + quad * 4) * k;
            for (int64_t g = 0; g < groups; g++) {
                float scale[4], base[4];
                for (int c = 0; c < 4; c++) {
                    scale[c] = bf16_to_float(sb[g * 16 + quad * 4 + c]);
                    base[c] = bf16_to_float(zb[g * 16 + quad * 4 + c]) - 8 * scale[c];
                }
#ifdef VNNI512
                const __m512 s = _mm512_set_ps(scale[3], scale[3], scale[3], scale[3], scale[2], scale[2], scale[2],
                                               scale[2], scale[1], scale[1], scale[1], scale[1], scale[0], scale[0],
                                               scale[0], scale[0]);
                const __m512 b = _mm512_set_ps(base[3], base[3], base[3], base[3], base[2], base[2], base[2], base[2],
                                               base[1], base[1], base[1], base[1], base[0], base[0], base[0], base[0]);
                for (int64_t step = g * (BLOCK / 8); step < (g + 1) * (BLOCK / 8); step++) {
                    const __m128i *chunk = (const __m128i *)(wb + step * 64 + quad * 16);
                    __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(chunk));
                    for (int half = 0; half < 2; half++) {  // low nibbles: inputs 0-3 of the 8; high: 4-7
                        __m512i q = _mm512_and_si512(half ? _mm512_srli_epi32(bytes, 4) : bytes, _mm512_set1_epi32(15));
                        __m512i bits = bf16_bits(_mm512_fmadd_ps(_mm512_cvtepi32_ps(q), s, b));
                        uint64_t four[4];  // channel c's 4 bfloat16 values in four[c]
                        _mm256_storeu_si256((__m256i *)four, _mm512_cvtepi32_epi16(bits));
                        for (int c = 0; c < 4; c++) memcpy(rows + c * k + step * 8 + half * 4, &four[c], 8);
                    }
                }
#else
                for (int64_t step = g * (BLOCK / 8); step < (g + 1) * (BLOCK / 8); step++)
                    for (int c = 0; c < 4; c++)
                        for (int j = 0; j < 4; j++) {
                            const uint8_t byte = wb[step * 64 + quad * 16 + c * 4 + j];
                            rows[c * k + step * 8 + j] = float_to_bf16((float)(byte & 15) * scale[c] + base[c]);
                            rows[c * k + step * 8 + 4 + j] = float_to_bf16((float)(byte >> 4) * scale[c] + base[c]);
                        }
#endif
            }
        }
    }
}

#if defined(__x86_64__) && defined(__SSE2__)
#include <immintrin.h>
#endif

// Writes back and drops from every cache level the 64-byte lines of [p, p + bytes), so that a timed product reads
// its weights from memory as a decoding step does (its weights, far larger than any cache, stream through): the
// route chooser times cold. 0 where this build has no such instruction (then the caches stay as they are).
int evict_from_caches(const void *p, int64_t bytes) {
#if defined(__x86_64__) && defined(__SSE2__)
    for (uintptr_t line = (uintptr_t)p & ~(uintptr_t)63; line < (uintptr_t)p + (uintptr_t)bytes; line += 64)
#ifdef __CLFLUSHOPT__
        _mm_clflushopt((void *)line);
#else
        _mm_clflush((const void *)line);
#endif
    _mm_mfence();
    return 1;
#else
    (void)p, (void)bytes;
    return 0;
#endif
}
"""
