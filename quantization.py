"""CPU kernels for ReplitLM's Linear layers: each product goes through the route measured fastest on the machine at
hand, and the weights can be quantized to int8 or int4.

Decoding a token reads every weight once, so its speed is bytes per weight over memory bandwidth, unless the kernel
cannot keep up with the memory; which of torch's CPU kernels keeps up differs between CPUs (AMX, AVX512-VNNI,
AVX2) and with the number of rows (one per sequence when decoding, thousands in a prompt). So no route is fixed
here: `ROUTES` times the routes of a layer's shape once per number-of-rows bucket (`ROW_BUCKETS`), the plain
baseline first, and each layer of that shape then takes the fastest. The choices are kept per CPU model, torch
version and thread count in a small JSON file (`ROUTE_CACHE_ENV`). docs/cpu.md has the measurements.

- `RoutedLinear` (float weights): F.linear, torch.mv for one row, or W @ x^T for a few rows.
- `Int8Linear`: int8 weights per output channel; oneDNN's int8 matmul with activations quantized per row on the
  fly, the int8 weight-only kernel, or the weight dequantized to the activations' dtype.
- `Int4Linear`: int4 weights in groups of `INT4_GROUP_SIZE` input channels with a scale and a zero point per
  group; the int4 kernel, or the weight dequantized to bfloat16.

`from_pretrained(path, trust_remote_code=True, weight_quantization="int8")` (or "int4") loads the checkpoint in
bfloat16 and replaces every Linear layer, the LM head included, one layer at a time. The token embedding stays
bfloat16 (a lookup reads a few rows, not the matrix). A quantized model cannot be saved (the oneDNN weight is an
opaque tensor): save the original checkpoint and pass `weight_quantization` again when loading it.
"""

import ctypes
import functools
import json
import os
import platform
import sys
import time
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
TIMING_REPEATS = 3
LONG_CALL_SECONDS = 0.05


def row_bucket(rows: int) -> int:
    return next((bucket for bucket in ROW_BUCKETS if rows <= bucket), ROW_BUCKETS[-1])


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), which route choices are kept under; benchmarks print it."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _time_call(fn, x: torch.Tensor, repeats: int) -> float:
    """The fastest of up to `repeats` calls of fn(x), in seconds; a call longer than LONG_CALL_SECONDS is not
    repeated (its noise is small next to it, and the measurement stays short)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - start)
        if best > LONG_CALL_SECONDS:
            break
    return best


class RouteChooser:
    """Chooses, per layer shape, activation dtype and row bucket, the fastest route that computes a layer's product.

    A layer offers `routes(rows)`: route names in order, its plain baseline first. The first time a shape is seen,
    every bucket is timed on that layer with random activations: the baseline at the bucket's rows, then each other
    route at growing row counts, dropped as soon as it is slower than the baseline already (so that a route that is
    very slow on this CPU costs one short call, not a long one), else timed at the bucket's rows. A route that
    raises is dropped. The baseline wins ties, so nothing is ever slower than it by more than the timing noise.
    """

    def __init__(self):
        self.choices: dict[str, dict[int, str]] = {}  # shape key -> bucket -> route
        self.timer = _time_call  # tests replace it with fake timings
        self._loaded_from: Path | None = None

    def plan(self, layer, dtype: torch.dtype) -> dict[int, str]:
        """The route of each row bucket for `layer` with activations of `dtype`, measured on first use."""
        key = f"{type(layer).__name__} {layer.out_features}x{layer.in_features} {str(dtype).removeprefix('torch.')}"
        if key not in self.choices:
            self._load()
            if key not in self.choices:
                self.choices[key] = {bucket: self.measure(layer, dtype, bucket) for bucket in ROW_BUCKETS}
                self._save()
        return self.choices[key]

    @torch.no_grad()
    def measure(self, layer, dtype: torch.dtype, bucket: int) -> str:
        generator = torch.Generator().manual_seed(0)
        inputs = {rows: torch.randn(rows, layer.in_features, generator=generator).to(dtype) for rows in ROW_BUCKETS}
        baseline, *others = layer.routes(bucket)
        limit = self.timer(layer.route_function(baseline), inputs[bucket], TIMING_REPEATS)
        best, best_time = baseline, limit
        for route in others:
            function = layer.route_function(route)
            try:
                for rows in (r for r in ROW_BUCKETS if r < bucket and route in layer.routes(r)):
                    if self.timer(function, inputs[rows], 1) > limit:  # more rows never take less time
                        break
                else:
                    seconds = self.timer(function, inputs[bucket], TIMING_REPEATS)
                    if seconds < best_time:
                        best, best_time = route, seconds
            except RuntimeError:  # not available in this torch build, or not for this shape
                continue
        return best

    def _cache_file(self) -> Path | None:
        setting = os.environ.get(ROUTE_CACHE_ENV, "")
        if setting == "off":
            return None
        return Path(setting) if setting else Path.home() / ".cache" / "replit_lm" / "cpu_routes.json"

    def _machine(self) -> str:
        return f"{cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads"

    def _load(self):
        path = self._cache_file()
        if path is None or path == self._loaded_from:
            return
        self._loaded_from = path
        try:
            stored = json.loads(path.read_text()).get(self._machine(), {})
        except (OSError, ValueError, AttributeError):
            return  # no file yet, or one that is not ours: measure again
        for key, plan in stored.items():
            self.choices.setdefault(key, {int(bucket): route for bucket, route in plan.items()})

    def _save(self):
        path = self._cache_file()
        if path is None:
            return
        try:
            stored = json.loads(path.read_text()) if path.exists() else {}
        except ValueError:
            stored = {}
        stored[self._machine()] = self.choices
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_suffix(f".{os.getpid()}.tmp")
            temporary.write_text(json.dumps(stored, indent=1, sort_keys=True))
            temporary.replace(path)
        except OSError:
            pass  # a read-only home: the choices stay in memory


ROUTES = RouteChooser()


def _routed(layer, x: torch.Tensor) -> torch.Tensor:
    """layer's product with x (..., in_features) through the route chosen for its shape and x's rows."""
    x2d = x.reshape(-1, layer.in_features)
    route = ROUTES.plan(layer, x.dtype)[row_bucket(x2d.shape[0])]
    if route not in layer.routes(x2d.shape[0]):
        route = layer.routes(x2d.shape[0])[0]
    return layer.route_function(route)(x2d).reshape(*x.shape[:-1], layer.out_features)


class RoutedLinear(nn.Linear):
    """nn.Linear (no bias) whose bfloat16 and float16 CPU inference takes the route measured fastest for its shape
    (see RouteChooser): F.linear, torch.mv for one row, or W @ x^T for a few rows. float32 (F.linear already reads
    its weights at the memory's speed there, and stays bit for bit what the reference computes), training, other
    devices and layers with a bias use F.linear."""

    SMALL_ROWS = 64

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.device.type != "cpu"
            or self.bias is not None
            or x.dtype != self.weight.dtype
            or x.dtype == torch.float32
            or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
        ):
            return F.linear(x, self.weight, self.bias)
        return _routed(self, x)

    def routes(self, rows: int) -> list[str]:
        return ["linear"] + (["mv"] if rows == 1 else []) + (["matmul_t"] if rows <= self.SMALL_ROWS else [])

    def route_function(self, route: str):
        if route == "mv":
            return lambda x: torch.mv(self.weight, x.view(-1)).view(1, -1)
        if route == "matmul_t":
            # (out, rows) -> (rows, out), made contiguous: SDPA's fused CPU kernel needs unit stride in q.
            return lambda x: torch.matmul(self.weight, x.t()).t().contiguous()
        return lambda x: F.linear(x, self.weight)


def _has_onednn_int8() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")


class QuantizedLinear(nn.Module):
    """Base of the quantized replacements of nn.Linear (no bias: ReplitLM has none)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"

    def dequantized_weight(self) -> torch.Tensor:
        """The weight as the kernel sees it, (out_features, in_features) float32: for tests and error analysis."""
        raise NotImplementedError


class Int8Linear(QuantizedLinear):
    """int8 weights with one float32 scale per output channel: weight ~= q * scale[:, None].

    Routes: "dequantize" (the weight in the activations' dtype, then F.linear: the baseline), "weight_only" (torch's
    int8 weight-only kernel) and, where torch has oneDNN's int8 matmul, "onednn": activations quantized too,
    symmetrically per row (token), x ~= xq * x_scale, xq = round(x / x_scale) in [-127, 127], x_scale = max|x| / 127,
    so that the int32 products are exact and the error is that of rounding the weights and the activations. Once
    its routes are chosen, a layer keeps one weight layout, the plain int8 matrix or oneDNN's blocked copy: the one
    its decode route reads.
    """

    def __init__(self, weight: torch.Tensor):
        super().__init__(weight.shape[1], weight.shape[0])
        self.onednn_available = _has_onednn_int8()
        scale = torch.empty(self.out_features)
        q = torch.empty(self.out_features, self.in_features, dtype=torch.int8)
        for rows in _row_chunks(self.out_features):
            w = weight[rows].detach().to(torch.float32, copy=True)  # (chunk, in), modified in place below
            scale[rows] = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
            q[rows] = w.div_(scale[rows, None]).round_().clamp_(-127, 127)
        self.register_buffer("scale", scale, persistent=False)  # (out,)
        self.register_buffer("qweight", q, persistent=False)  # (out, in); None once no chosen route reads it
        self.packed = None  # oneDNN's blocked layout of qweight, made when that route is first used
        self.layouts = {"plain", "packed"}  # the layouts this layer may use; one once its routes are chosen
        self._scale_cache = {}  # the weight-only kernel wants the scales in the activations' dtype
        self._planned_dtypes = set()

    def routes(self, rows: int) -> list[str]:
        plain = ["dequantize", "weight_only"] if "plain" in self.layouts else []
        return plain + (["onednn"] if self.onednn_available and "packed" in self.layouts else [])

    def route_function(self, route: str):
        if route == "onednn":
            return self._onednn_in_chunks
        if route == "weight_only":
            return lambda x: torch.ops.aten._weight_int8pack_mm(x, self._plain(), self._scales_as(x.dtype))
        # The per-channel scale commutes with the product.
        return lambda x: F.linear(x, self._plain().to(x.dtype)) * self._scales_as(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _routed(self, x.contiguous())
        if x.dtype not in self._planned_dtypes:
            self._planned_dtypes.add(x.dtype)
            self._keep_layouts_of(ROUTES.plan(self, x.dtype))
        return out

    def _keep_layouts_of(self, plan: dict[int, str]):
        """Keep one weight layout, the one the decode (one-row) route reads: holding both would double the int8
        weights. Buckets whose chosen route reads the other layout take the baseline of this one."""
        if plan[ROW_BUCKETS[0]] == "onednn":
            self._packed()
            self.qweight, self.layouts = None, {"packed"}
        else:
            self._plain()
            self.packed, self.layouts = None, {"plain"}

    def _plain(self) -> torch.Tensor:
        if self.qweight is None:
            self.qweight = self.packed.to_dense().t().contiguous()
        return self.qweight

    def _packed(self) -> torch.Tensor:
        if self.packed is None:
            # Reordered into oneDNN's blocked layout once (an opaque MKLDNN tensor); the hint is the decode shape.
            self.packed = torch.ops.onednn.qlinear_prepack(self.qweight, [1, self.in_features])
            self._zero_points = torch.zeros(self.out_features, dtype=torch.int64)
            self._one, self._zero = torch.tensor(1.0), torch.tensor(0)
        return self.packed

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
            xq, self._one, self._zero, packed, self.scale, self._zero_points,
            None, 1.0, 0, torch.float32, "none", [], "",
        )  # fmt: skip
        return (out * x_scale).to(x.dtype)  # (rows, out)

    def _scales_as(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._scale_cache:
            self._scale_cache[dtype] = self.scale.to(dtype)
        return self._scale_cache[dtype]

    def dequantized_weight(self) -> torch.Tensor:
        q = self.qweight if self.qweight is not None else self.packed.to_dense().t()  # (out, in) int8
        return q.float() * self.scale[:, None]


class Int4Linear(QuantizedLinear):
    """int4 weights in groups of `group_size` input channels, asymmetric: in each group,
    weight ~= (q - 8) * scale + zero with q in [0, 15], where [zero - 8 * scale, zero + 7 * scale] spans the group's
    range. scales_and_zeros: (in / group_size, padded out, 2) bfloat16, the kernel's layout; the kernel works in
    blocks of 16 output channels, so the weight gets zero rows up to a multiple of 16 (a small vocabulary's LM head).

    Routes: "dequantize" (the weight unpacked to bfloat16, then F.linear: the baseline, where this torch's packed
    layout is one `_unpack_int4` knows) and "kernel" (torch's int4 kernel, which dequantizes as it multiplies).
    Both compute in bfloat16.
    """

    def __init__(self, weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE):
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features)
        self.group_size = int4_group_size(in_features, group_size)
        self.padded_out = -(-out_features // 16) * 16
        groups = in_features // self.group_size
        packed, scales_and_zeros = [], []
        for rows in _row_chunks(self.padded_out):
            w = weight[rows].detach().to(torch.float32, copy=True)  # (chunk, in), modified in place below
            w = F.pad(w, (0, 0, 0, rows.stop - rows.start - w.shape[0]))  # zero rows past out_features
            w = w.view(-1, groups, self.group_size)
            low, high = w.amin(dim=2), w.amax(dim=2)  # (chunk, groups)
            # Rounded to bfloat16 before the weights are quantized against them, so that q absorbs the rounding.
            scale = ((high - low) / 15).clamp(min=1e-8).to(torch.bfloat16)
            zero = (low + 8 * scale.float()).to(torch.bfloat16)
            start = zero.float() - 8 * scale.float()  # the value of q = 0
            q = w.sub_(start[..., None]).div_(scale.float()[..., None]).round_().clamp_(0, 15)
            q = q.to(torch.int32).view(-1, in_features)
            packed.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, INT4_INNER_K_TILES))
            scales_and_zeros.append(torch.stack([scale, zero], dim=2))  # (chunk, groups, 2)
        self.register_buffer("packed", torch.cat(packed), persistent=False)  # (padded out, in / 2) uint8
        scales_and_zeros = torch.cat(scales_and_zeros).transpose(0, 1).contiguous()  # (groups, padded out, 2)
        self.register_buffer("scales_and_zeros", scales_and_zeros, persistent=False)
        self.can_unpack = _int4_layout() is not None

    def routes(self, rows: int) -> list[str]:
        return ["dequantize", "kernel"] if self.can_unpack else ["kernel"]

    def route_function(self, route: str):
        if route == "kernel":
            product = lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(  # noqa: E731
                x, self.packed, self.group_size, self.scales_and_zeros
            )
        else:
            product = lambda x: F.linear(x, self._dequantize(torch.bfloat16))  # noqa: E731
        # Both are vectorised for bfloat16 only; padding rows of the weight are cut off the output.
        return lambda x: product(x.to(torch.bfloat16))[:, : self.out_features].to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _routed(self, x.contiguous())

    def _dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight in `dtype`, padding rows included. (padded out, in)"""
        n, k = self.padded_out, self.in_features
        q = _unpack_int4(self.packed, n, k, _int4_layout()).view(n, -1, self.group_size).to(dtype)  # (n, groups, size)
        scale, zero = self.scales_and_zeros.to(dtype).permute(2, 1, 0).unsqueeze(-1)  # 2 x (n, groups, 1)
        return q.mul_(scale).add_(zero - 8 * scale).view(n, k)

    def dequantized_weight(self) -> torch.Tensor:
        # The kernel itself applied to the identity: exact whatever the packed layout.
        eye = torch.eye(self.in_features, dtype=torch.bfloat16)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.group_size, self.scales_and_zeros)
        return out[:, : self.out_features].t().float()


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
    return model


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
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise(ctypes.c_void_p(begin), ctypes.c_size_t(end - begin), 4)  # 4: MADV_DONTNEED
