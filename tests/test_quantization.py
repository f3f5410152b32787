"""CPU kernels of the Linear layers (quantization.py): every route against float math, the choice of routes by
measurement (fake timings), int8 and int4 weights, the packed int4 layout, the whole model against bfloat16, and
loading with from_pretrained(..., weight_quantization=...)."""

import copy
import json
import os
import pickle
import platform
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT
from model_helpers import VOCAB, model_pair, write_hub_folder
from test_loading import mpt_config, published_state_dict
from transformers import AutoModelForCausalLM

import replit_lm.quantization as quantization
from replit_lm.configuration_replit_lm import ReplitLMConfig
from replit_lm.modeling_replit_lm import ReplitLM
from replit_lm.quantization import (
    Int4Linear,
    Int8Linear,
    QuantizedLinear,
    RouteChooser,
    RoutedLinear,
    _int4_layout,
    _unpack_int4,
    int4_group_size,
    row_bucket,
)


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    got, expected = got.float(), expected.float()
    return ((got - expected).norm() / expected.norm()).item()


@pytest.fixture
def per_channel_int8(monkeypatch):
    """int8 layers made as where the native kernels are not built: a scale per output channel, torch's kernels."""
    monkeypatch.setattr(quantization, "native_kernels", lambda: None)


def gaussian(out_features, in_features, seed=0):
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)) * 0.05


# --- layers ----------------------------------------------------------------------------------------------------

# Relative error of a route's output against float32 math, for Gaussian weights and activations: bfloat16 rounds
# the output once; int8 rounds each weight to 1/254 of its block's or row's range (about 0.6-0.7%), plus about 0.8%
# for the activations on the routes that quantize them to int8 too (oneDNN's per row, the native kernel's per block
# of 32); int4 rounds to 1/15 of its group's range (about 9%).
ROUTE_BOUNDS = {"bfloat16": 0.01, "int8": 0.009, "int8 onednn": 0.012, "int8 native_int8": 0.012,
                "int8 native_amx": 0.012, "int4": 0.11}  # fmt: skip


def make_layer(kind: str, weight: torch.Tensor):
    if kind == "bfloat16":
        layer = RoutedLinear(weight.shape[1], weight.shape[0], bias=False).to(torch.bfloat16)
        layer.weight.data.copy_(weight)
        return layer.requires_grad_(False)
    if kind.startswith("int4"):  # "int4": groups of 32 (the default, and the native kernel's); "int4/64"
        return Int4Linear(weight, group_size=int(kind.partition("/")[2] or quantization.INT4_GROUP_SIZE))
    return Int8Linear(weight, per_channel=kind == "int8/channel")  # "int8": blocks of 32 where the kernels run


@pytest.mark.parametrize("shape", [(144, 64), (80, 128), (256, 256), (100, 96)])
@pytest.mark.parametrize("rows", [1, 3, 40, 70])
@pytest.mark.parametrize("kind", ["bfloat16", "int8", "int8/channel", "int4", "int4/64"])
def test_every_route_against_float_math(shape, rows, kind):
    weight = gaussian(*shape).to(torch.bfloat16)
    layer = make_layer(kind, weight)
    x = torch.randn(rows, shape[1], dtype=torch.bfloat16, generator=torch.Generator().manual_seed(1))
    expected = x.float() @ weight.float().t()
    for route in layer.routes(rows):
        out = layer.route_function(route)(x)
        assert out.shape == (rows, shape[0]) and out.dtype == torch.bfloat16 and out.is_contiguous(), route
        bound = ROUTE_BOUNDS.get(f"{kind.partition('/')[0]} {route}", ROUTE_BOUNDS[kind.partition("/")[0]])
        assert relative_error(out, expected) < bound, route
        if kind != "bfloat16":  # what the kernels compute is the product with the weight as quantized
            as_quantized = relative_error(out, x.float() @ layer.dequantized_weight().t())
            # int8's native route quantizes the activations to int16: the float product, rounded to bfloat16.
            assert as_quantized < (0.003 if f"{kind} {route}" == "int8 native" else 0.01), route


@pytest.mark.parametrize("kind", ["bfloat16", "int8", "int8/channel", "int4"])
def test_every_route_runs_under_no_grad_after_inference_mode(kind, monkeypatch):
    """The routes that unpack or widen a weight share a scratch tensor per thread; one first made under
    torch.inference_mode could not be written outside it, and a later pass under no_grad failed."""
    monkeypatch.setattr(quantization, "_SCRATCH", threading.local())  # made afresh, under inference_mode below
    weight = gaussian(80, 64).to(torch.bfloat16)
    layer = make_layer(kind, weight)
    x = torch.randn(70, 64, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(2))
    for route in layer.routes(70):
        with torch.inference_mode():
            first = layer.route_function(route)(x)
        with torch.no_grad():
            assert torch.equal(layer.route_function(route)(x), first), route


@pytest.mark.parametrize("special", [float("nan"), float("inf")])
@pytest.mark.parametrize("kind", ["bfloat16", "int8", "int8/channel", "int4"])
def test_a_nan_or_infinity_in_a_row_makes_that_row_not_finite_on_every_route(kind, special):
    """As in float math: the int8 native route quantized a NaN to 0 and returned finite outputs."""
    weight = gaussian(80, 64).to(torch.bfloat16)
    layer = make_layer(kind, weight)
    for rows in (1, 8, 70):
        x = torch.randn(rows, 64, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(rows))
        x[0, 37] = special
        expected = x[1:].float() @ weight.float().t()
        for route in layer.routes(rows):
            out = layer.route_function(route)(x)
            assert not out[0].isfinite().any(), route
            if rows > 1:
                bound = ROUTE_BOUNDS["int8 onednn" if kind.startswith("int8") else kind.partition("/")[0]]
                assert relative_error(out[1:], expected) < bound, route


@pytest.mark.parametrize("kept", ["plain", "packed", "native", "int4"])
def test_a_quantized_layer_survives_deepcopy_and_pickle(kept):
    """Whatever layout it kept: oneDNN's blocked one is an opaque tensor whose memory cannot be read, and copying or
    pickling a layer (or a model: copy.deepcopy(model)) that kept it raised "Cannot access storage"."""
    weight = gaussian(64, 64).to(torch.bfloat16)
    if kept == "native" and not quantization._has_native_int8():
        pytest.skip("no C compiler, or neither AVX512-VNNI nor AVX2")
    if kept == "packed" and not quantization._has_onednn_int8():
        pytest.skip("this torch has no oneDNN int8 matmul")
    layer = Int4Linear(weight) if kept == "int4" else Int8Linear(weight, per_channel=kept != "native")
    if kept in ("plain", "packed"):
        fastest = {"plain": "weight_only", "packed": "onednn"}[kept]
        layer._keep_layouts_of({bucket: [[fastest, 0.1], ["dequantize", 1.0]] for bucket in quantization.ROW_BUCKETS})
        assert layer.layouts == {kept}
    x = torch.randn(3, 64, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(3))
    for copied in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert copied.routes(3) == layer.routes(3)
        for route in layer.routes(3):
            assert torch.equal(copied.route_function(route)(x), layer.route_function(route)(x)), route
        if kept == "packed":  # the plain matrix came along only to make the blocked layout again
            assert copied.qweight is None and copied.packed is not None


@pytest.mark.parametrize("in_features", [24, 40])
def test_int8_routes_of_widths_that_are_no_multiple_of_16_all_run(in_features):
    """torch's int8 weight-only kernel kills the process for such widths (bfloat16, two rows or more): a model of
    d_model 24 quantized to int8 crashed in its first forward pass, while timing that route."""
    weight = gaussian(64, in_features).to(torch.bfloat16)
    layer = Int8Linear(weight, per_channel=True)
    for rows in (1, 2, 9):
        x = torch.randn(rows, in_features, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(rows))
        for route in layer.routes(rows):
            out = layer.route_function(route)(x)
            assert relative_error(out, x.float() @ weight.float().t()) < ROUTE_BOUNDS["int8 onednn"], route


def forcing(layer, route: str, dtype: torch.dtype) -> RouteChooser:
    """A chooser that ranks `route` first in every bucket of `layer`'s shape (the baseline where not offered)."""
    chooser = RouteChooser()
    chooser.choices[RouteChooser.key(layer, dtype)] = {bucket: [[route, 0.0]] for bucket in quantization.ROW_BUCKETS}
    return chooser


@pytest.mark.parametrize("kind", ["int8", "int8/channel", "int4"])
def test_the_input_gradient_through_quantized_layers_is_the_dequantized_weight_s_on_every_route(kind, monkeypatch):
    """With gradients enabled (a plain forward pass outside no_grad: the embedding's weight requires them), each
    route's output carries the gradient of x @ W^T for the weight as quantized. The native routes returned outputs
    cut off from the graph, so a residual's gradient silently left the layer out; the unpacking routes saved the
    per-thread scratch weight, which the next layer's unpacking overwrote before backward read it; torch's int4
    and int8 weight-only kernels and oneDNN's route failed in backward."""
    first, second = (make_layer(kind, gaussian(64, 64, seed=seed).to(torch.bfloat16)) for seed in (3, 4))
    for route in first.routes(9):
        for layer in (first, second):
            layer._planned_dtypes.clear()
        monkeypatch.setattr(quantization, "ROUTES", forcing(first, route, torch.float32))
        x = torch.randn(9, 64, generator=torch.Generator().manual_seed(5), requires_grad=True)
        h = first(x) + x  # a residual around each layer, as in a block
        (second(h) + h).sum().backward()
        w1, w2 = first.dequantized_weight(), second.dequantized_weight()
        dh = 1 + w2.sum(0)  # d sum(second(h) + h) / dh, per input channel
        expected = (dh + dh @ w1).expand(9, -1)
        torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-5, msg=route)


def test_int8_per_channel_products_of_float16_do_not_overflow(per_channel_int8):
    """The unpacking routes multiplied float16 activations by the integer weights (up to 127) and scaled after:
    activations of a few hundred overflowed float16 (to inf) where the result is about 100."""
    weight = gaussian(48, 64).to(torch.bfloat16)
    layer = Int8Linear(weight)
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(6)) * 300
    expected = x.double() @ layer.dequantized_weight().double().t()
    assert expected.abs().max() < 1000  # far from float16's largest, 65504
    for route in layer.routes(9):
        out = layer.route_function(route)(x.half())
        # float16's rounding of the activations and the output (2^-11 each), and for oneDNN's route its int8 ones
        bound = ROUTE_BOUNDS["int8 onednn"] if route == "onednn" else 2e-3
        assert out.isfinite().all() and relative_error(out, expected) < bound, route


@pytest.mark.parametrize("kind", ["bfloat16", "int8", "int4"])
def test_layers_route_by_rows_and_keep_the_input_shape(kind):
    weight = gaussian(96, 64).to(torch.bfloat16)
    layer = make_layer(kind, weight)
    for rows in (1, 5, 70):
        x = torch.randn(2, rows, 64, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(rows))
        out = layer(x)
        assert out.shape == (2, rows, 96) and out.dtype == torch.bfloat16
        bound = ROUTE_BOUNDS["int8 onednn" if kind == "int8" else kind]  # the loosest of the kind's routes
        assert relative_error(out, x.float() @ weight.float().t()) < bound


def test_the_native_routes_are_offered_where_the_kernels_were_built():
    if not quantization._has_native_int8():
        pytest.skip("no C compiler, or neither AVX512-VNNI nor AVX2")
    weight = gaussian(64, 64).to(torch.bfloat16)
    assert "native" in Int8Linear(weight).routes(1) and "native" in Int4Linear(weight).routes(1)
    assert "native" not in Int4Linear(weight, group_size=64).routes(1)  # the kernel's groups are of 32
    # int8 activations (q8_0's products) only for a short prompt's rows: decoding and long prompts keep the float
    # product.
    assert [rows for rows in (1, 8, 9, 64, 65, 512) if "native_int8" in Int8Linear(weight).routes(rows)] == [9, 64]


@pytest.mark.skipif(not quantization._has_amx(), reason="needs a CPU with AMX (and the native kernels)")
@pytest.mark.parametrize("layer_class,vnni_route", [(Int8Linear, "native_int8"), (Int4Linear, "native")])
def test_the_amx_route_computes_what_the_vnni_route_does(layer_class, vnni_route):
    """The same integer products and the same float steps, on AMX tiles: equal bit for bit, whatever the rows
    (tiles of 16, the last one padded) and the dtype."""
    layer = layer_class(gaussian(100, 96).to(torch.bfloat16))
    assert "native_amx" in layer.routes(9) and "native_amx" not in layer.routes(8)
    amx, vnni = layer.route_function("native_amx"), layer.route_function(vnni_route)
    for rows in (9, 16, 17, 70):
        x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(rows))
        for dtype in (torch.bfloat16, torch.float32):
            assert torch.equal(amx(x.to(dtype)), vnni(x.to(dtype))), (rows, dtype)


has_amx_bf16 = quantization._has_amx_bf16()


@pytest.mark.skipif(not quantization._has_native_matvec(), reason="needs AVX2 or AVX512 (and the native kernels)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("build", ["this CPU's", "AVX2"])
def test_the_native_matrix_vector_product_is_float_math_rounded_once(build, dtype, request, monkeypatch):
    """One row through `matvec`: float32 sums of the exact products, so the output is the float product rounded to
    the dtype (bfloat16: within half a unit, at most 2^-8 relative, plus the sums' order; float32: the sums' order
    alone), in both loop orders, for output channels that are not a multiple of the 4 the first takes at a time
    and input channels that are not a multiple of the 128 the second takes; with this CPU's instructions
    (AVX512-BF16's dot products where it has them) and with AVX2's multiply-adds. Not offered for more rows or
    float16."""
    if build == "AVX2":
        avx2 = request.getfixturevalue("avx2_native_kernels")
        if not avx2.matvec_available():
            pytest.skip("this CPU has no AVX2 with FMA")
        monkeypatch.setattr(quantization, "native_kernels", lambda: avx2)
    out_features, in_features = 4 * int(torch.randint(20, 60, ())) + 3, 32 * int(torch.randint(2, 40, ()))
    layer = make_layer("bfloat16", gaussian(out_features, in_features, seed=int(torch.randint(1000, ()))))
    layer = layer.to(dtype) if dtype == torch.bfloat16 else layer.float().requires_grad_(False)
    if dtype == torch.float32:  # weights that bfloat16 cannot hold
        layer.weight.data.add_(torch.randn_like(layer.weight) * 1e-3)
    x = torch.randn(1, in_features, dtype=dtype)
    exact = x.double() @ layer.weight.double().t()
    # Rounding to the dtype, and float32 sums of in_features products in another order than exact's.
    magnitude = x.double().abs() @ layer.weight.double().abs().t()
    bound = exact.abs() * (2**-8 if dtype == torch.bfloat16 else 0) + 1e-6 * magnitude
    for route in ("native", "native_one_stream"):  # the two loop orders
        assert route in layer.routes(1) and route not in layer.routes(2)
        assert route not in RoutedLinear(in_features, 8, bias=False).to(torch.float16).routes(1)
        out = layer.route_function(route)(x)
        assert out.shape == (1, out_features) and out.dtype == dtype
        assert ((out.double() - exact).abs() <= bound).all(), route


@pytest.mark.skipif(not has_amx_bf16, reason="needs a CPU with AMX's bfloat16 products (and the native kernels)")
@pytest.mark.parametrize("layer_class", [Int8Linear, Int4Linear])
def test_the_amx_bfloat16_route_is_the_product_with_the_unpacked_weight(layer_class):
    """The weights unpacked to the bfloat16 values the "dequantize" route multiplies, and float32 sums: the same
    product but for the order of the sums, whatever the rows (pairs of 16-row tiles, the last one padded), the
    output channels (pairs of 16, here 7 blocks of them: the last one alone) and the dtype."""
    layer = layer_class(gaussian(100, 96, seed=int(torch.randint(1000, ()))).to(torch.bfloat16))
    assert "native_amx_bf16" in layer.routes(9) and "native_amx_bf16" in layer.routes(512)
    assert "native_amx_bf16" not in layer.routes(8)
    unpacked = layer.dequantized_weight().to(torch.bfloat16).float()
    amx = layer.route_function("native_amx_bf16")
    for rows in (9, 16, 17, 32, 33, 70):
        x = torch.randn(rows, 96)
        expected = x.to(torch.bfloat16).float() @ unpacked.t()
        assert relative_error(amx(x), expected) < 1e-6, rows  # float32 out: the sums' order alone
        assert relative_error(amx(x.to(torch.bfloat16)), expected) < 0.004, rows  # rounded to bfloat16


@pytest.mark.skipif(not quantization._has_native_int8(), reason="no C compiler, or neither AVX512-VNNI nor AVX2")
def test_int8_with_the_native_kernels_has_a_bfloat16_scale_per_block_of_32(monkeypatch):
    """q8_0's layout: closer to the weights than a scale per output channel (whose torch kernels are then not
    offered: they read no other scales), held once, in the native kernels' layout."""
    weight = gaussian(64, 256).to(torch.bfloat16)
    weight[:, :32] *= 20  # one block of large weights per row: a row's scale would blur the rest
    weight[:8, 64:96] = 0  # blocks of zeros: a scale of 0 would give NaN
    blocks = Int8Linear(weight)
    assert torch.equal(blocks.dequantized_weight()[:8, 64:96], torch.zeros(8, 32))
    assert blocks.block_size == 32 and blocks._native_scale.dtype == torch.bfloat16
    assert blocks.layouts == {"native"} and blocks.qweight is None and blocks.scale is None
    assert set(blocks.routes(64)) - {"native_amx", "native_amx_bf16"} == {"dequantize", "dequantize_t", "native",
                                                                         "native_int8"}  # fmt: skip
    x = torch.randn(64, 256, dtype=torch.bfloat16)
    for route in blocks.routes(64):
        assert relative_error(blocks.route_function(route)(x), x.float() @ weight.float().t()) < 0.01, route
    monkeypatch.setattr(quantization, "native_kernels", lambda: None)
    rows = Int8Linear(weight)
    assert rows.block_size == 256 and "native" not in rows.routes(1)
    error = {name: relative_error(layer.dequantized_weight()[:, 32:], weight.float()[:, 32:])
             for name, layer in (("blocks", blocks), ("rows", rows))}  # fmt: skip
    assert error["blocks"] < error["rows"] / 10


@pytest.mark.skipif(not quantization._has_native_int8(), reason="no C compiler, or neither AVX512-VNNI nor AVX2")
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_the_native_kernels_read_and_write_each_dtype(kind):
    """bfloat16 and float32 go in and out of the kernels as they are (the bfloat16 output rounded as torch rounds,
    ties to even, so bit for bit the float32 output converted); other dtypes through float32; any strides."""
    layer = make_layer(kind, gaussian(100, 96).to(torch.bfloat16))
    product = layer.route_function("native")
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    in_float32 = product(x.float())
    assert in_float32.dtype == torch.float32
    assert relative_error(in_float32, x.float() @ layer.dequantized_weight().t()) < 0.01
    assert torch.equal(product(x), in_float32.to(torch.bfloat16))
    in_float16 = product(x.half())
    assert in_float16.dtype == torch.float16 and torch.equal(in_float16, in_float32.half())
    strided = x.float().t().contiguous().t()  # the same values, column-major
    assert not strided.is_contiguous() and torch.equal(product(strided), in_float32)


@pytest.mark.parametrize("setting", [dict(CC="/nonexistent/cc"), dict(CC="false"), {quantization.NATIVE_ENV: "off"}])
def test_without_a_compiler_the_native_routes_fall_back(monkeypatch, tmp_path, setting):
    """No compiler, one that fails, or the kernels turned off: no native route, the others compute as before."""
    monkeypatch.setenv("HOME", str(tmp_path))  # no library built earlier
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    for name, value in setting.items():
        monkeypatch.setenv(name, value)
    quantization.native_kernels.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert quantization.native_kernels() is None
        assert bool(caught) == (quantization.NATIVE_ENV not in setting)  # a warning unless turned off on purpose
        assert not list(tmp_path.rglob("*.so"))  # nothing half-written left behind
        weight = gaussian(64, 64).to(torch.bfloat16)
        # 16 rows: over 2 rows of 64 outputs the relative error spreads so wide that int4 passed its bound in 1 of
        # 3000 draws (0.115; over 16 rows at most 0.087 in 3000).
        x = torch.randn(16, 64, dtype=torch.bfloat16)
        for layer in (Int8Linear(weight), Int4Linear(weight)):
            assert "native" not in layer.routes(1)
            bound = ROUTE_BOUNDS[type(layer).__name__[:4].lower()]
            assert relative_error(layer(x), x.float() @ weight.float().t()) < bound
    finally:
        quantization.native_kernels.cache_clear()


FOREIGN_LIBRARY = r"""
#include <stdio.h>
__attribute__((constructor)) static void ran(void) { FILE *f = fopen(MARKER, "w"); if (f) fclose(f); }
"""


@pytest.mark.skipif(quantization.native_kernels() is None, reason="needs the native kernels (a C compiler)")
def test_the_native_library_is_loaded_only_from_a_folder_no_one_else_can_write(monkeypatch, tmp_path):
    """Whoever can write the library's folder, or one above it, chooses the code this process runs: a library
    planted where others may write (the kernels' name is computable) is never loaded; the kernels are then built in a private
    folder, removed after loading. In a folder of the user's alone, a file that is not our library (another
    version's, or damaged: a kernel missing) is rebuilt, not a crash."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    name = Path(quantization.native_kernels()._name).name
    try:
        for shared in ("kernels", ".cache", None):  # the folder others may write to: the library's, or one above
            # A home of its own each time: the process keeps a loaded library's path, and would not load it again.
            home = tmp_path / f"home-{shared}"
            monkeypatch.setenv("HOME", str(home))
            folder = home / ".cache" / "replit_lm" / "kernels"
            folder.mkdir(parents=True)
            marker = tmp_path / f"ran-{shared}"
            source = tmp_path / "foreign.c"
            source.write_text(FOREIGN_LIBRARY)
            compiled = subprocess.run([os.environ.get("CC", "cc"), f'-DMARKER="{marker}"', "-shared", "-fPIC",
                                       str(source), "-o", str(folder / name)], capture_output=True)
            assert compiled.returncode == 0, compiled.stderr
            if shared:
                (folder if shared == "kernels" else home / ".cache").chmod(0o777)
            quantization.native_kernels.cache_clear()
            kernels = quantization.native_kernels()
            assert kernels is not None and kernels.int8_vectors_available() in (0, 1)
            assert marker.exists() == (shared is None)  # in the user's own folder the file is theirs to load
            assert not list((tmp_path / "tmp").iterdir())  # the private build folder is gone
    finally:
        quantization.native_kernels.cache_clear()


NATIVE_INTEGER_ROUTES = {Int8Linear: ("native", "native_int8"), Int4Linear: ("native",)}


@pytest.mark.skipif(not quantization._has_native_int8(), reason="no C compiler, or neither AVX512-VNNI nor AVX2")
@pytest.mark.parametrize("build", ["AVX2", "AVX512 without VNNI", "plain C"])
def test_the_native_kernels_of_other_cpus_compute_the_same(build, request, monkeypatch):
    """Built here with AVX512 or its VNNI turned off: AVX2's integer tiles (most laptop CPUs, and AVX512 CPUs without
    VNNI) give this CPU's build's products bit for bit, whatever the rows (tiles of 4, the last one partial) and the
    dtype; the plain C loops, where neither is built, the same products but for the float rounding. The dequantized
    weights too (the "dequantize" route unpacks the native layout in C)."""
    fixture = {"AVX2": "avx2_native_kernels", "AVX512 without VNNI": "no_vnni_native_kernels"}.get(build)
    other = request.getfixturevalue(fixture or "plain_c_native_kernels")
    if fixture and not other.int8_vectors_available():
        pytest.skip("this CPU has no AVX2 with FMA")
    weight = gaussian(100, 96, seed=int(torch.randint(1000, ()))).to(torch.bfloat16)
    for make, routes in NATIVE_INTEGER_ROUTES.items():
        layer = make(weight)
        layer.route_function("native")  # makes the native layout
        dtypes = (torch.bfloat16, torch.float32)
        inputs = [torch.randn(rows, 96).to(dtype) for rows in (1, 2, 3, 5, 9) for dtype in dtypes]
        here = {(route, i): layer.route_function(route)(x) for route in (*routes, "dequantize")
                for i, x in enumerate(inputs)}  # fmt: skip
        for (route, i), out in here.items():
            assert relative_error(out, inputs[i].float() @ layer.dequantized_weight().t()) < 0.012, route
        monkeypatch.setattr(quantization, "native_kernels", lambda: other)
        for (route, i), expected in here.items():
            got = layer.route_function(route)(inputs[i])
            if fixture and route != "dequantize":
                assert torch.equal(got, expected), (make.__name__, route, inputs[i].shape, inputs[i].dtype)
            else:
                torch.testing.assert_close(got, expected, atol=2e-2, rtol=1e-2)
        monkeypatch.undo()


@pytest.mark.skipif(not quantization._has_native_int8(), reason="no C compiler, or neither AVX512-VNNI nor AVX2")
@pytest.mark.parametrize("build", ["this CPU's", "AVX2"])
def test_the_native_integer_sums_do_not_saturate(build, request, monkeypatch):
    """The largest sums the kernels form: every weight and activation of a block at the end of its range with
    matching signs, int8 q = +-127 against activations quantized to +-127 (int8) or +-32767 (int16), int4 q = 15
    against 127 (the activations all 1, the weights all 1 but one 0 per group). AVX2's byte products sum pairs in
    saturating int16 (int4's a whole group of them: up to 8 pairs of 15 * 127 * 2, 30480): a saturated sum would be
    off by far more than the rounding allowed here."""
    if build == "AVX2":
        avx2 = request.getfixturevalue("avx2_native_kernels")
        if not avx2.int8_vectors_available():
            pytest.skip("this CPU has no AVX2 with FMA")
        monkeypatch.setattr(quantization, "native_kernels", lambda: avx2)
    signs = torch.randint(0, 2, (64, 128)).float() * 2 - 1
    x = signs[:5]  # rows 0-4 of the weight's signs: every product of those output channels positive
    int8 = Int8Linear(signs.to(torch.bfloat16))
    ones = torch.ones(64, 128)
    ones[:, ::32] = 0  # one 0 per group of 32, the rest 1: q 15, x all 1
    int4 = Int4Linear(ones.to(torch.bfloat16))
    cases = [(int8, route, x) for route in NATIVE_INTEGER_ROUTES[Int8Linear]] + [(int4, "native", torch.ones(5, 128))]
    for layer, route, inputs in cases:
        expected = inputs @ layer.dequantized_weight().t()
        assert expected[:, :5].diagonal().min() > 100  # the maxed-out sums are there
        got = layer.route_function(route)(inputs)
        assert relative_error(got, expected) < 1e-5, (type(layer).__name__, route)


def test_float32_prompts_and_training_keep_f_linear():
    """float32 products of more than one row are F.linear's, bit for bit; one row (decoding) takes the route measured
    fastest, within float32 rounding of F.linear. Training takes F.linear in every dtype (gradients flow)."""
    layer = RoutedLinear(64, 48, bias=False).requires_grad_(False)
    for rows in (2, 8, 70):
        x = torch.randn(rows, 64)
        assert torch.equal(layer(x), F.linear(x, layer.weight))
    x = torch.randn(1, 64)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight))
    bf16 = RoutedLinear(32, 16, bias=False).to(torch.bfloat16)
    for rows in (1, 4):
        x = torch.randn(rows, 32, dtype=torch.bfloat16, requires_grad=True)
        bf16(x).float().sum().backward()
        torch.testing.assert_close(x.grad.float(), bf16.weight.float().sum(0).expand(rows, -1), atol=0.05, rtol=0.02)


# --- the choice of routes ----------------------------------------------------------------------------------------


class FakeTimer:
    """Timings from a table: seconds per row for each route (a fixed cost per call where given as a pair)."""

    def __init__(self, per_row: dict, failing=()):
        self.per_row, self.failing, self.calls = per_row, set(failing), []

    def __call__(self, function, x, repeats, before=None):
        route = function.route
        self.calls.append((route, x.shape[0]))
        if route in self.failing:
            raise RuntimeError(f"{route} is not available")
        fixed, per_row = self.per_row[route] if isinstance(self.per_row[route], tuple) else (0.0, self.per_row[route])
        return fixed + per_row * x.shape[0]


class NamedRoutes:
    """A stand-in layer whose routes are named functions, for the chooser alone."""

    in_features, out_features = 16, 8

    def __init__(self, names):
        self.names = names

    def routes(self, rows):
        return [name for name in self.names if name != "mv" or rows == 1]

    def route_function(self, route):
        function = lambda x: x  # noqa: E731
        function.route = route
        return function


def tag_routes(monkeypatch, layer):
    """Make a real layer's route functions carry their names, for FakeTimer."""
    original = layer.route_function

    def tagged(route):
        function = original(route)
        named = lambda x: function(x)  # noqa: E731
        named.route = route
        return named

    monkeypatch.setattr(layer, "route_function", tagged)
    return layer


def chooser_with(timer) -> RouteChooser:
    chooser = RouteChooser()
    chooser.timer = timer
    return chooser


def routes_of(plan: dict) -> dict:
    return {bucket: [route for route, _ in ranking] for bucket, ranking in plan.items()}


def test_the_fastest_route_is_chosen_per_row_bucket():
    # "mv" wins one row; "matmul_t" has a fixed cost but the lower cost per row, and wins from 64 rows on.
    timer = FakeTimer({"linear": 1.0, "mv": 0.5, "matmul_t": (20.0, 0.1)})
    plan = chooser_with(timer).plan(NamedRoutes(["linear", "mv", "matmul_t"]), torch.bfloat16)
    # Each bucket ranks what it timed; at 8 rows "matmul_t" was dropped after its one-row probe (slower already).
    assert routes_of(plan) == {1: ["mv", "linear", "matmul_t"], 8: ["linear"], 64: ["matmul_t", "linear"],
                               512: ["matmul_t", "linear"]}  # fmt: skip
    assert plan[64] == [["matmul_t", 26.4], ["linear", 64.0]]  # with the times measured


def test_float32_times_its_one_row_routes_only(monkeypatch):
    """A float32 layer offers routes for one row (decoding) alone: its other buckets are F.linear's untimed, the
    one-row bucket takes the fastest of what it timed."""
    timer = FakeTimer({"linear": 1.0, "mv": 2.0, "native": 0.5, "native_one_stream": 0.25})
    monkeypatch.setattr(quantization, "ROUTES", chooser_with(timer))
    monkeypatch.setattr(quantization, "_has_native_matvec", lambda: True)
    layer = tag_routes(monkeypatch, RoutedLinear(64, 48, bias=False).requires_grad_(False))
    plan = quantization.ROUTES.plan(layer, torch.float32)
    assert routes_of(plan) == {1: ["native_one_stream", "native", "linear", "mv"], 8: ["linear"], 64: ["linear"],
                               512: ["linear"]}  # fmt: skip
    assert {rows for _, rows in timer.calls} == {1}


def test_the_baseline_wins_ties_and_a_route_slower_than_it_is_dropped_after_one_short_call():
    timer = FakeTimer({"linear": 1.0, "slow": 100.0, "tie": 1.0})
    plan = chooser_with(timer).plan(NamedRoutes(["linear", "slow", "tie"]), torch.bfloat16)
    assert routes_of(plan) == {1: ["linear", "tie", "slow"], 8: ["linear", "tie"], 64: ["linear", "tie"],
                               512: ["linear", "tie"]}  # fmt: skip
    # Each bucket stops timing the slow route at the first probe slower than the baseline's whole bucket: for the
    # 512-row bucket that is 8 rows (800 s > 512 s), for the others its first row.
    assert [rows for route, rows in timer.calls if route == "slow"] == [1, 1, 1, 1, 8]


def test_a_failing_route_falls_back():
    timer = FakeTimer({"linear": 1.0, "broken": 0.01}, failing={"broken"})
    plan = chooser_with(timer).plan(NamedRoutes(["linear", "broken"]), torch.bfloat16)
    assert all(ranking == ["linear"] for ranking in routes_of(plan).values())


def test_each_timed_call_runs_after_its_before_hook():
    events = []
    quantization.time_call(lambda x: events.append("call"), torch.zeros(1), 3, before=lambda: events.append("before"))
    assert events == ["before", "call"] * 3


# The tensors each route multiplies with, by attribute (int4's "kernel" route reads torch's packing).
NATIVE_INT8 = ["native", "_native_scale"]
NATIVE_INT4 = ["native", "native_scales"]
READS = {"bfloat16": dict.fromkeys(["linear", "mv", "matmul_t", "native", "native_one_stream", "float32"], ["weight"]),
         "int8": dict.fromkeys(["native", "native_int8", "native_amx", "native_amx_bf16", "dequantize",
                                "dequantize_t"], NATIVE_INT8),
         "int4": {**dict.fromkeys(["native", "native_amx", "native_amx_bf16", "dequantize", "dequantize_t"],
                                  NATIVE_INT4), "kernel": ["packed", "scales_and_zeros"]}}  # fmt: skip


@pytest.mark.skipif(quantization.native_kernels() is None, reason="needs the native kernels (a C compiler)")
@pytest.mark.parametrize("kind", ["bfloat16", "int8", "int4"])
def test_every_route_is_timed_with_the_weights_it_reads_out_of_the_caches(monkeypatch, kind):
    """A decoding step's weights stream from memory (a model is larger than the caches), so a route timed with
    its weight in cache would be ranked for another machine: before every timed call the chooser drops from the
    caches every tensor the route reads."""
    layer = tag_routes(monkeypatch, make_layer(kind, gaussian(96, 64).to(torch.bfloat16)))
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    expected = layer.route_function(layer.routes(1)[0])(x)
    # A real eviction leaves the numbers as they were, and drops something on x86-64.
    assert quantization.evict_from_caches(layer) == (platform.machine().lower() in ("x86_64", "amd64"))
    assert torch.equal(layer.route_function(layer.routes(1)[0])(x), expected)

    evicted, timed = [], []
    monkeypatch.setattr(quantization.native_kernels(), "evict_from_caches",
                        lambda pointer, size: evicted.append((pointer, size)) or 1)  # fmt: skip

    def timer(function, x, repeats, before=None):
        evicted.clear()
        before()
        timed.append((function.route, set(evicted)))
        return {"linear": 1.0, "dequantize": 1.0}.get(function.route, 0.5) * x.shape[0]

    chooser_with(timer).plan(layer, torch.bfloat16)
    assert {route for route, _ in timed} == {route for rows in quantization.ROW_BUCKETS for route in layer.routes(rows)}
    for route, dropped in timed:
        for name in READS[kind][route]:
            storage = getattr(layer, name).untyped_storage()
            assert (storage.data_ptr(), storage.nbytes()) in dropped, f"{route} timed with {name} in cache"


def test_choices_are_kept_per_machine_in_the_cache_file(tmp_path, monkeypatch):
    monkeypatch.setenv(quantization.ROUTE_CACHE_ENV, str(tmp_path / "routes.json"))
    first = chooser_with(FakeTimer({"linear": 1.0, "mv": 0.5}))
    plan = first.plan(NamedRoutes(["linear", "mv"]), torch.bfloat16)
    stored = json.loads((tmp_path / "routes.json").read_text())
    assert list(stored) == [first._machine()]

    def no_timing(*args):
        raise AssertionError("a stored choice was measured again")

    assert chooser_with(no_timing).plan(NamedRoutes(["linear", "mv"]), torch.bfloat16) == plan
    # Another dtype is another choice.
    float32 = chooser_with(FakeTimer({"linear": 0.1, "mv": 0.5})).plan(NamedRoutes(["linear", "mv"]), torch.float32)
    assert routes_of(float32)[1] == ["linear", "mv"]


def test_choices_are_kept_per_thread_count(tmp_path, monkeypatch):
    """A ranking timed with one thread count is not taken, nor filed, under another (torch.set_num_threads between
    two products)."""
    monkeypatch.setenv(quantization.ROUTE_CACHE_ENV, str(tmp_path / "routes.json"))
    threads = torch.get_num_threads()
    layer = NamedRoutes(["linear", "mv"])
    try:
        torch.set_num_threads(1)
        chooser = chooser_with(FakeTimer({"linear": 1.0, "mv": 0.5}))
        assert routes_of(chooser.plan(layer, torch.bfloat16))[1] == ["mv", "linear"]
        torch.set_num_threads(2)
        chooser.timer = FakeTimer({"linear": 0.5, "mv": 1.0})  # with two threads, another ranking
        assert routes_of(chooser.plan(layer, torch.bfloat16))[1] == ["linear", "mv"]
        torch.set_num_threads(1)
        assert routes_of(chooser_with(FakeTimer({})).plan(layer, torch.bfloat16))[1] == ["mv", "linear"]  # stored
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("content", [
    "{not json", "[]", "null", '{"MACHINE": []}', '{"MACHINE": {"KEY": 3}}', '{"MACHINE": {"KEY": {"one": []}}}',
    '{"MACHINE": {"KEY": {"1": [7]}}}', '{"MACHINE": {"KEY": {"1": [["mv", 0.5]]}}}',  # the other buckets missing
    '{"MACHINE": {"KEY": {"1": [["mv", "fast"]], "8": [], "64": [], "512": []}}}',
    '{"MACHINE": {"KEY": {"1": [["mv", null]], "8": [["linear", 1]], "64": [["linear", 1]], "512": [[1, 1]]}}}',
    "a folder", "a named pipe"])  # fmt: skip
def test_a_cache_file_that_is_not_ours_is_measured_again(tmp_path, monkeypatch, content):
    """Any content (JSON of another shape, rankings with buckets missing or times that are not numbers, filed under
    the very key looked up) costs a measurement, never the pass; a file of ours replaces it. A folder or a named pipe
    (as a device: not a regular file, and never read, which would wait for a writer) in the file's place is left as
    it is (the choices then stay in memory), with nothing written beside it."""
    path = tmp_path / "routes.json"
    monkeypatch.setenv(quantization.ROUTE_CACHE_ENV, str(path))
    chooser = chooser_with(FakeTimer({"linear": 1.0, "mv": 0.5}))
    layer = NamedRoutes(["linear", "mv"])
    if content == "a folder":
        path.mkdir()
    elif content == "a named pipe":
        os.mkfifo(path)
    else:
        key = chooser.key(layer, torch.bfloat16)
        path.write_text(content.replace("MACHINE", chooser._machine()).replace("KEY", key))
    plan = chooser.plan(layer, torch.bfloat16)
    assert routes_of(plan) == {1: ["mv", "linear"], 8: ["linear"], 64: ["linear"], 512: ["linear"]}
    if path.is_file():
        assert list(json.loads(path.read_text())) == [chooser._machine()]
    assert path.is_fifo() if content == "a named pipe" else path.is_dir() or path.is_file()
    assert [file.name for file in tmp_path.iterdir()] == ["routes.json"]


def test_a_cache_file_behind_a_symbolic_link_is_written_through_it(tmp_path, monkeypatch):
    (tmp_path / "kept").mkdir()
    link = tmp_path / "routes.json"
    link.symlink_to(tmp_path / "kept" / "routes.json")
    monkeypatch.setenv(quantization.ROUTE_CACHE_ENV, str(link))
    chooser = chooser_with(FakeTimer({"linear": 1.0, "mv": 0.5}))
    chooser.plan(NamedRoutes(["linear", "mv"]), torch.bfloat16)
    assert link.is_symlink() and list(json.loads(link.read_text())) == [chooser._machine()]


def test_row_buckets():
    assert [row_bucket(rows) for rows in (1, 2, 8, 9, 64, 65, 512, 4096)] == [1, 8, 8, 64, 64, 512, 512, 512]


def test_a_chosen_route_drives_the_layer(monkeypatch):
    """With fake timings that make each route win somewhere, the layer computes through the chosen one."""
    # float32 (the weight widened per call): a fixed cost and a lower cost per row, so that it wins a long prompt.
    timings = {"linear": 1.0, "mv": 0.5, "native": 0.7, "native_one_stream": 0.8, "matmul_t": 2.0, "float32": (50.0, 0.5)}
    monkeypatch.setattr(quantization, "ROUTES", chooser_with(FakeTimer(timings)))
    layer = tag_routes(monkeypatch, make_layer("bfloat16", gaussian(48, 32).to(torch.bfloat16)))
    used = []
    tagged = layer.route_function

    def spying(route):
        function = tagged(route)
        spy = lambda x: used.append(route) or function(x)  # noqa: E731
        spy.route = route
        return spy

    monkeypatch.setattr(layer, "route_function", spying)
    layer(torch.randn(1, 32, dtype=torch.bfloat16))
    layer(torch.randn(4, 32, dtype=torch.bfloat16))
    layer(torch.randn(64, 32, dtype=torch.bfloat16))
    layer(torch.randn(300, 32, dtype=torch.bfloat16))
    assert used[-4:] == ["mv", "linear", "linear", "float32"]


INT8_LAYOUTS = {"qweight": "plain", "packed": "packed", "native": "native"}  # attribute -> layout


def held_layouts(layer) -> set:
    return {layout for attribute, layout in INT8_LAYOUTS.items() if getattr(layer, attribute) is not None}


@pytest.mark.skipif(not quantization._has_onednn_int8(), reason="needs oneDNN's int8 matmul")
@pytest.mark.parametrize("winner", ["onednn", "weight_only", "onednn for one row only"])
def test_int8_keeps_only_the_weight_layout_its_decode_route_reads(monkeypatch, per_channel_int8, winner):
    """One layout per layer, whatever the other buckets chose: two would double the int8 weights."""
    if winner == "onednn for one row only":  # fixed cost 0, per row 0.5 s; the others win from 8 rows on
        timings = {"dequantize": (3.0, 0.01), "dequantize_t": (3.0, 0.01), "weight_only": (3.0, 0.01), "onednn": 0.5}
        winner = "onednn"
    else:
        timings = {"dequantize": 1.0, "dequantize_t": 1.0, "weight_only": 2.0, "onednn": 2.0, winner: 0.5}
    monkeypatch.setattr(quantization, "ROUTES", chooser_with(FakeTimer(timings)))
    weight = gaussian(96, 64).to(torch.bfloat16)
    layer = tag_routes(monkeypatch, Int8Linear(weight))
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    out = layer(x)
    kept = "packed" if winner == "onednn" else "plain"
    assert held_layouts(layer) == layer.layouts == {kept}
    assert relative_error(out, x.float() @ weight.float().t()) < ROUTE_BOUNDS["int8 onednn"]
    assert relative_error(layer.dequantized_weight(), weight.float()) < 0.01
    # Later calls read the kept layout: their bucket's route where it reads that layout, else its baseline.
    ranking = quantization.ROUTES.plan(layer, x.dtype)[row_bucket(3)]
    route = next(route for route, _ in ranking if route in layer.routes(3))
    own_routes = {"packed": ["onednn"], "plain": ["weight_only"]}
    assert layer.routes(3) == ["dequantize", "dequantize_t"] + own_routes[kept]
    assert torch.equal(layer(x), layer.route_function(route)(x))
    assert held_layouts(layer) == {kept}


def test_the_kept_layout_decodes_fastest_and_breaks_near_ties_by_the_prompt():
    reads = {"weight_only": "plain", "onednn": "packed", "native": "native"}
    plan = {1: [["weight_only", 1.00], ["native", 1.05], ["onednn", 3.0], ["dequantize", 4.0]],
            8: [["dequantize", 1.0]],
            64: [["onednn", 2.0], ["native", 5.0], ["dequantize", 9.0], ["weight_only", 30.0]],
            512: [["dequantize", 1.0]]}  # fmt: skip
    # weight_only decodes fastest, native within DECODE_TIE of it and much faster on a prompt.
    assert quantization.layout_to_keep(plan, reads, "plain") == "native"
    plan[1][1][1] = 1.5  # no longer a near tie: decoding speed decides
    assert quantization.layout_to_keep(plan, reads, "plain") == "plain"
    plan[1] = [["dequantize", 1.0], ["weight_only", 1.2]]  # the baseline reads any layout: a tie of all
    assert quantization.layout_to_keep(plan, reads, "plain") == "plain"


def test_a_stored_plan_ranking_a_route_not_available_here_does_not_choose_the_layout(monkeypatch, per_channel_int8):
    """A stored ranking whose fastest route this layer cannot take (here oneDNN's, as from a torch build that has
    it): the layer keeps the layout of the fastest route it can take, not the one it could only dequantize from."""
    layer = Int8Linear(gaussian(96, 64).to(torch.bfloat16))
    layer.onednn_available = False
    ranking = [["onednn", 0.1], ["weight_only", 0.5], ["dequantize", 1.0]]
    chooser = RouteChooser()
    chooser.choices[chooser.key(layer, torch.bfloat16)] = {bucket: ranking for bucket in quantization.ROW_BUCKETS}
    monkeypatch.setattr(quantization, "ROUTES", chooser)
    layer(torch.randn(3, 64, dtype=torch.bfloat16))
    assert layer.layouts == {"plain"} and layer.packed is None and layer.qweight is not None


@pytest.mark.skipif(quantization.native_kernels() is None, reason="needs the native kernels (a C compiler)")
def test_a_ranking_measured_without_the_native_kernels_is_measured_again_with_them(tmp_path, monkeypatch):
    """A first run without the kernels (no compiler, or REPLIT_LM_NATIVE=off) must not keep a later run, with
    them, off their routes: the stored ranking is not theirs."""
    monkeypatch.setenv(quantization.ROUTE_CACHE_ENV, str(tmp_path / "routes.json"))
    without = tag_routes(monkeypatch, Int4Linear(gaussian(96, 64).to(torch.bfloat16)))
    without.native_available = False
    timer = FakeTimer({"dequantize": 1.0, "dequantize_t": 1.0, "kernel": 0.5, "native": 0.1, "native_amx": 0.1,
                       "native_amx_bf16": 0.1})  # fmt: skip
    assert "native" not in routes_of(chooser_with(timer).plan(without, torch.bfloat16))[1]
    with_kernels = tag_routes(monkeypatch, Int4Linear(gaussian(96, 64).to(torch.bfloat16)))
    assert routes_of(chooser_with(timer).plan(with_kernels, torch.bfloat16))[1][0] == "native"


@pytest.mark.skipif(quantization.native_kernels() is None, reason="needs the native kernels (a C compiler)")
@pytest.mark.parametrize("winner", ["kernel", "native", "dequantize"])
def test_int4_keeps_only_the_weight_layout_its_decode_route_reads(monkeypatch, winner):
    timings = {"dequantize": 1.0, "dequantize_t": 1.0, "kernel": 2.0, "native": 2.0, "native_amx": 2.0,
               "native_amx_bf16": 2.0, winner: 0.5}  # fmt: skip
    monkeypatch.setattr(quantization, "ROUTES", chooser_with(FakeTimer(timings)))
    weight = gaussian(96, 64).to(torch.bfloat16)
    layer = tag_routes(monkeypatch, Int4Linear(weight))
    expected = layer.dequantized_weight()
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    layer(x)
    kept = "packed" if winner == "kernel" else "native"
    assert layer.layouts == {kept}
    assert (layer.packed is not None, layer.native is not None) == (kept == "packed", kept == "native")
    assert torch.equal(layer.dequantized_weight(), expected)  # either layout holds the same weights
    own = {"kernel"} if kept == "packed" else {"native"}  # (the AMX routes: more than 8 rows)
    assert set(layer.routes(1)) == {"dequantize", "dequantize_t"} | own
    for route in layer.routes(3):
        assert relative_error(layer.route_function(route)(x), x.float() @ expected.t()) < 0.01, route


@pytest.mark.skipif(not quantization._has_onednn_int8(), reason="needs oneDNN's int8 matmul")
def test_int8_long_inputs_run_in_chunks_with_the_same_result(per_channel_int8):
    """Activations are quantized per row, so a prompt split into chunks of rows gives what one call gives."""
    layer = Int8Linear(gaussian(96, 64).to(torch.bfloat16))
    rows = 2 * quantization.ONEDNN_INT8_CHUNK_ROWS + 5
    x = torch.randn(rows, 64, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(2))
    calls = []
    original = layer._onednn

    def spy(chunk):
        calls.append(chunk.shape[0])
        return original(chunk)

    layer._onednn = spy
    out = layer.route_function("onednn")(x)
    assert calls == [quantization.ONEDNN_INT8_CHUNK_ROWS] * 2 + [5]
    assert torch.equal(out, original(x))


def test_layers_keep_float32_activations():
    weight = gaussian(64, 64).to(torch.bfloat16)
    x = torch.randn(5, 64)
    for layer in (Int8Linear(weight), Int4Linear(weight)):
        assert layer(x).dtype == torch.float32


def range_int4(weight: torch.Tensor, group_size: int = 32) -> torch.Tensor:
    """int4 as the range of each group gives it (levels from its minimum to its maximum, scale and zero point in
    bfloat16), unpacked: the first guess the layer refits."""
    w = weight.float().view(weight.shape[0], -1, group_size)
    low, high = w.amin(dim=2, keepdim=True), w.amax(dim=2, keepdim=True)
    scale = ((high - low) / 15).clamp(min=1e-8).to(torch.bfloat16).float()
    start = (low + 8 * scale).to(torch.bfloat16).float() - 8 * scale
    q = ((w - start) / scale).round().clamp(0, 15)
    return (q * scale + start).view_as(weight)


def test_int4_fits_each_group_closer_than_its_range_does():
    """The refitted scale and zero point: a lower squared error than the range's on fresh Gaussian weights, and
    groups whose weights are all one value (zeros included) kept exact."""
    weight = gaussian(64, 256, seed=int(torch.randint(1000, ()))).to(torch.bfloat16)
    weight[:4, :32] = 0
    weight[4:8, 32:64] = 0.25
    unpacked = Int4Linear(weight).dequantized_weight()
    assert torch.equal(unpacked[:4, :32], torch.zeros(4, 32)) and torch.equal(unpacked[4:8, 32:64], weight[4:8, 32:64])
    refitted = (unpacked - weight.float()).square().mean()
    by_range = (range_int4(weight) - weight.float()).square().mean()
    assert refitted < 0.93 * by_range  # 0.85-0.88 over 200 draws of Gaussian weights


def test_int4_dequantized_weight_agrees_with_the_kernel():
    """The weight the layer holds, unpacked, is the one torch's kernel multiplies by (applied to the identity)."""
    layer = Int4Linear(gaussian(80, 128).to(torch.bfloat16), group_size=32)
    assert layer.can_unpack and layer.routes(1)[:3] == ["dequantize", "dequantize_t", "kernel"]
    eye = torch.eye(128, dtype=torch.bfloat16)
    by_kernel = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, *layer._packed())[:, :80].t().float()
    torch.testing.assert_close(layer.dequantized_weight(), by_kernel, atol=4e-3, rtol=0)


def test_int4_weights_unpacked_to_bfloat16_are_rounded_once():
    """The "dequantize" route's bfloat16 weight is the float32 one rounded, from either layout (the native kernel's
    and torch's): computed in bfloat16 the product, the offset and their sum were each rounded."""
    layer = Int4Linear(gaussian(80, 128).to(torch.bfloat16), group_size=32)
    expected = layer.dequantized_weight().to(torch.bfloat16)
    assert torch.equal(layer._dequantize(torch.bfloat16)[:80], expected)  # by the native kernel where built
    layer._packed()
    layer.native = layer.native_scales = None
    assert torch.equal(layer._dequantize(torch.bfloat16)[:80], expected)


@pytest.mark.parametrize("n,k", [(16, 32), (48, 64), (64, 96), (80, 64), (144, 32), (192, 256)])
def test_unpack_int4_inverts_the_packing(n, k):
    values = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=torch.Generator().manual_seed(n + k))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, quantization.INT4_INNER_K_TILES)
    assert _int4_layout() is not None
    assert torch.equal(_unpack_int4(packed, n, k, _int4_layout()).to(torch.int32), values)


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
def test_quantizing_in_chunks_of_rows_changes_nothing(cls, monkeypatch):
    """Weights are quantized QUANTIZE_ROWS output channels at a time (bounded temporaries)."""
    weight = gaussian(336, 64).to(torch.bfloat16)  # 5 chunks of 64 rows and a partial one
    whole = cls(weight)
    monkeypatch.setattr(quantization, "QUANTIZE_ROWS", 64)
    chunked = cls(weight)
    for name, tensor in whole.named_buffers():
        if tensor.is_mkldnn:
            tensor, other = tensor.to_dense(), getattr(chunked, name).to_dense()
        else:
            other = getattr(chunked, name)
        assert torch.equal(tensor, other), name
    assert torch.equal(whole.dequantized_weight(), chunked.dequantized_weight())


def test_int4_pads_output_channels_to_the_kernels_blocks():
    weight = gaussian(101, 64).to(torch.bfloat16)  # a tiny vocabulary's LM head
    layer = Int4Linear(weight)
    assert layer.padded_out == 112
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert layer(x).shape == (3, 101)
    assert relative_error(layer(x), x.float() @ weight.float().t()) < ROUTE_BOUNDS["int4"]


def test_int4_group_size_and_shape_errors():
    assert int4_group_size(2560) == 32 and int4_group_size(10240) == 32 and int4_group_size(2560, 128) == 128
    assert int4_group_size(64, 128) == 64 and int4_group_size(96, 128) == 32
    with pytest.raises(ValueError, match="divisible"):
        Int4Linear(gaussian(64, 48))


# --- the model -------------------------------------------------------------------------------------------------


def quantized_pair(mode: str, name: str = "pow2_heads"):
    """The tiny reference-checked model in bfloat16, and a copy of it quantized to `mode`."""
    bf16 = model_pair(name)[0].to(torch.bfloat16)
    quantized = model_pair(name)[0].to(torch.bfloat16).quantize_weights(mode)
    return bf16, quantized


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantize_weights_replaces_every_linear_layer(mode):
    bf16, model = quantized_pair(mode)
    assert model.config.weight_quantization == mode
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert isinstance(model.lm_head, QuantizedLinear) and model.transformer.wte.weight.dtype == torch.bfloat16
    bytes_before = sum(p.numel() * p.element_size() for p in bf16.parameters())
    bytes_after = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    assert bytes_after < bytes_before
    with pytest.raises(ValueError, match="already quantized"):
        model.quantize_weights("int8")


@pytest.mark.parametrize("mode", ["int8", "int8/channel", "int4"])
def test_a_dtype_change_after_quantizing_keeps_the_quantized_weights(mode, monkeypatch):
    """model.float() / .to(torch.bfloat16) on a quantized model convert its float parameters, never the quantized
    layers' scales: their raw memory is what the native kernels read (a float32 copy of bfloat16 scales gave logits
    off by about 6 before)."""
    if mode == "int8/channel":
        monkeypatch.setattr(quantization, "native_kernels", lambda: None)
    model = model_pair("pow2_heads")[0].quantize_weights(mode.partition("/")[0])  # float32 activations
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers() if not buffer.is_mkldnn}
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(torch.seed() % 2**32))
    expected = model(ids).logits  # the first call, which chooses the routes, computes what later calls do
    torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=0)
    torch.testing.assert_close(model.float()(ids).logits, expected, rtol=0, atol=0)
    in_bf16 = model.to(torch.bfloat16)
    assert in_bf16.transformer.wte.weight.dtype == torch.bfloat16
    for name, buffer in in_bf16.named_buffers():
        if name in buffers:
            assert buffer.dtype == buffers[name].dtype and torch.equal(buffer, buffers[name]), name
    # bfloat16 activations and LayerNorm/embedding weights, the same quantized weights: the float32 model's logits to
    # bfloat16's rounding, compounded over the tiny model's layers, plus the activations' rounding to int8 where the
    # timing picks such a route for bfloat16 (on an AMD EPYC: 2.5-8.4% over 12 seeds; scales read as the wrong dtype
    # gave errors of the order of the logits themselves).
    assert relative_error(in_bf16(ids).logits.float(), expected) < 0.15


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_quantized_model_refuses_to_leave_the_cpu_and_stays_whole(mode):
    """The kernels read CPU memory: .to(another device) of the model, or of one quantized layer, is refused before
    anything moves ("meta" stands in for a GPU here), and the model still computes what it did."""
    model = model_pair("pow2_heads")[0].quantize_weights(mode)
    ids = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(torch.seed() % 2**32))
    expected = model(ids).logits
    for move in (lambda: model.to("meta"), lambda: model.to_empty(device="meta"), lambda: model.lm_head.to("meta")):
        with pytest.raises(ValueError, match="CPU only and cannot move to meta"):
            move()
    assert all(t.device.type == "cpu" for t in (*model.parameters(), *model.buffers()))
    torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=0)
    assert model.to("cpu") is model


def test_quantization_errors_name_the_layer():
    model = model_pair("six_heads")[0]  # d_model 48: no int4 group size divides it
    with pytest.raises(ValueError, match=r"transformer\.blocks\.0\.attn\.Wqkv .*int4.*divisible"):
        model.quantize_weights("int4")
    assert isinstance(model.lm_head, torch.nn.Linear) and model.config.weight_quantization is None  # untouched
    with pytest.raises(ValueError, match="weight_quantization"):
        model_pair("pow2_heads")[0].quantize_weights("int3")


@pytest.mark.parametrize("mode", ["int8", "int8 weight-only"])
def test_int8_model_generates_like_bfloat16(mode, monkeypatch):
    """On the tiny random model (weights of std 0.3, so that every error shows), int8 keeps most greedy choices."""
    if mode == "int8 weight-only":
        monkeypatch.setattr(quantization, "_has_onednn_int8", lambda: False)
    bf16, model = quantized_pair("int8")
    ids = torch.randint(3, VOCAB, (4, 24), generator=torch.Generator().manual_seed(2))
    expected, got = bf16(ids).logits.float(), model(ids).logits.float()
    assert relative_error(got, expected) < 0.12
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.85
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    out = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=2, eos_token_id=None)
    assert out.shape == (4, 29)


QUANTIZED_ROUTES = {"int4": ["dequantize", "dequantize_t", "kernel", "native", "native_amx", "native_amx_bf16"],
                    "int8": ["dequantize", "dequantize_t", "native", "native_int8", "native_amx", "native_amx_bf16"]}


@pytest.mark.parametrize("mode,route", [(mode, route) for mode, routes in QUANTIZED_ROUTES.items() for route in routes])
def test_quantized_model_runs_prompt_and_decode_routes(monkeypatch, mode, route):
    """Through each route where the layer offers it, the baseline elsewhere (routes differ in how they round the
    activations, which this check is not about)."""
    if route.startswith("native") and not quantization._has_native_int8():
        pytest.skip("no C compiler, or neither AVX512-VNNI nor AVX2")
    if route == "native_amx" and not quantization._has_amx() or route == "native_amx_bf16" and not has_amx_bf16:
        pytest.skip("no AMX here")
    timings = dict.fromkeys(QUANTIZED_ROUTES[mode], 1.0) | {route: 0.5}
    monkeypatch.setattr(quantization, "ROUTES", chooser_with(FakeTimer(timings)))
    _, model = quantized_pair(mode)
    model = tag_all_routes(monkeypatch, model)
    ids = torch.randint(3, VOCAB, (4, 48), generator=torch.Generator().manual_seed(3))
    # A prompt of many rows, then single tokens (routes chosen per row bucket): the cached decode agrees with one
    # forward pass over everything.
    full = model(ids).logits
    first = model(ids[:, :-2], use_cache=True)
    cache = first.past_key_values
    step1 = model(ids[:, -2:-1], past_key_values=cache, use_cache=True).logits
    step2 = model(ids[:, -1:], past_key_values=cache, use_cache=True).logits
    cached = torch.cat([first.logits, step1, step2], dim=1).float()
    assert relative_error(cached, full.float()) < 0.02


def tag_all_routes(monkeypatch, model):
    for layer in model.modules():
        if isinstance(layer, QuantizedLinear):
            tag_routes(monkeypatch, layer)
    return model


# --- loading ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory):
    model = model_pair("pow2_heads")[0]
    folder = tmp_path_factory.mktemp("hub") / "repo"
    return write_hub_folder(folder, mpt_config(model.config), published_state_dict(model)), model


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_from_pretrained_quantizes_on_load(hub_folder, mode, monkeypatch):
    folder, _ = hub_folder
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, weight_quantization=mode)
    # The classes of the copy that transformers imported from the folder, so compared by name.
    layer_class = {"int8": "Int8Linear", "int4": "Int4Linear"}[mode]
    assert model.config.weight_quantization == mode
    assert type(model.transformer.blocks[0].attn.Wqkv).__name__ == type(model.lm_head).__name__ == layer_class
    # Loaded in bfloat16 unless a dtype is asked for.
    assert model.transformer.wte.weight.dtype == torch.bfloat16
    bf16 = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.bfloat16)
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(4))
    direct = model_pair("pow2_heads")[0].to(torch.bfloat16).quantize_weights(mode)
    # The same quantized weights; and the same products once both module copies take the same routes (each copy
    # measures its own, and routes differ in how they round the activations).
    loaded_layers = [m for m in model.modules() if type(m).__name__ == layer_class]
    direct_layers = [m for m in direct.modules() if isinstance(m, QuantizedLinear)]
    assert len(loaded_layers) == len(direct_layers)
    for loaded_layer, direct_layer in zip(loaded_layers, direct_layers):
        assert torch.equal(loaded_layer.dequantized_weight(), direct_layer.dequantized_weight())
    monkeypatch.setattr(sys.modules[type(model.lm_head).__module__], "ROUTES", quantization.ROUTES)
    torch.testing.assert_close(model(ids).logits, direct(ids).logits, atol=1e-3, rtol=1e-3)
    assert relative_error(model(ids).logits, bf16(ids).logits) < (0.12 if mode == "int8" else 0.6)


def test_from_pretrained_honours_a_dtype_and_a_config_file_setting(hub_folder, tmp_path):
    folder, model = hub_folder
    loaded = AutoModelForCausalLM.from_pretrained(
        folder, trust_remote_code=True, weight_quantization="int8", dtype=torch.float32
    )
    assert loaded.transformer.wte.weight.dtype == torch.float32
    assert loaded(torch.tensor([[5, 6, 7]])).logits.dtype == torch.float32
    config = dict(mpt_config(model.config), weight_quantization="int4")
    folder = write_hub_folder(tmp_path / "int4", config, published_state_dict(model))
    loaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    assert loaded.config.weight_quantization == "int4" and type(loaded.lm_head).__name__ == "Int4Linear"


def test_saving_a_quantized_model_is_a_clear_error(hub_folder, tmp_path):
    folder, _ = hub_folder
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, weight_quantization="int8")
    with pytest.raises(NotImplementedError, match="save the original checkpoint"):
        model.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved" / "model.safetensors").exists()
    # Its state dict would leave the quantized weights out: loaded strictly into another quantized model, it
    # reported success and changed nothing but the norms and the embedding.
    with pytest.raises(NotImplementedError, match="transformer.blocks.0.attn.Wqkv holds quantized weights"):
        model.state_dict()


def test_resizing_the_vocabulary_of_a_quantized_model_is_a_clear_error(hub_folder):
    folder, _ = hub_folder
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, weight_quantization="int8")
    vocab = model.config.vocab_size
    with pytest.raises(NotImplementedError, match="LM head cannot be resized"):
        model.resize_token_embeddings(vocab + 8)
    assert model.transformer.wte.weight.shape[0] == vocab == model.config.vocab_size  # nothing changed halfway
    assert model(torch.tensor([[5, 6, 7]])).logits.shape == (1, 3, vocab)


def test_training_a_quantized_model_is_a_clear_error(hub_folder):
    """The quantized layers compute no gradient: Trainer's step failed deep in autograd ("does not require grad")."""
    folder, _ = hub_folder
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, weight_quantization="int8").train()
    ids = torch.tensor([[5, 6, 7, 8]])
    with pytest.raises(NotImplementedError, match="quantized to int8, for inference only"):
        model(ids, labels=ids)
    with torch.no_grad():  # evaluation, in either mode, still works
        assert model(ids, labels=ids).loss.isfinite()
    assert model.eval()(ids, labels=ids).loss.isfinite()


def test_bad_weight_quantization_value_is_rejected_on_load(hub_folder):
    folder, _ = hub_folder
    with pytest.raises(ValueError, match="weight_quantization"):
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, weight_quantization="int2")


LOAD_AND_MEASURE = """
import sys, torch
from transformers import AutoModelForCausalLM

def status(field):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field + ":"))

def load_and_run(folder):
    kwargs = {"bf16": dict(dtype=torch.bfloat16)}.get(sys.argv[3], dict(weight_quantization=sys.argv[3]))
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, **kwargs)
    model(torch.tensor([[5, 6, 7]]))  # touches every weight
    return model

load_and_run(sys.argv[1])  # a tiny model first: imports, thread pools and kernels start up outside the measurement
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
model = load_and_run(sys.argv[2])
print(status("VmHWM") - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads peak RSS from /proc")
@pytest.mark.parametrize("mode", ["bf16", "int8", "int4"])
def test_loading_peak_memory_stays_under_the_checkpoint_size(tmp_path, mode):
    """A 400 MB bfloat16 checkpoint loads without the process growing by more than 1.2x its size, or, quantized,
    by more than what the quantized model needs (the float weights are views of the mapped file, dropped layer by
    layer as they are quantized, and what quantizing frees goes back to the system: measured 1.01x, 0.70x, 0.47x;
    int8 was 1.1-1.24x while freed heap memory stayed with the process; int4 0.59-0.77x while its least-squares fit
    held four temporaries the size of a chunk of weights, 0.50-0.55x with one)."""
    torch.manual_seed(0)
    folders = []
    for name, shape in (("tiny", dict(d_model=64, n_layers=1)), ("big", dict(d_model=1024, n_layers=16))):
        model = ReplitLM(ReplitLMConfig(n_heads=8, vocab_size=4096, max_seq_len=64, **shape)).to(torch.bfloat16)
        config = dict(mpt_config(model.config), vocab_size=model.config.vocab_size)
        folders.append(write_hub_folder(tmp_path / name, config, published_state_dict(model)))
        del model
    size = (folders[1] / "model.safetensors").stat().st_size
    script = tmp_path / "measure.py"
    script.write_text(LOAD_AND_MEASURE)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, script, *folders, mode], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    grown = int(out.stdout.split()[-1])
    bound = {"bf16": 1.2, "int8": 0.95, "int4": 0.7}[mode]
    assert grown < bound * size, f"{mode}: grew by {grown / size:.2f}x the checkpoint's {size / 1e6:.0f} MB"


DEMO = ROOT / "demo"
# What README states for the demo model, teacher-forced over this repository's own code (held out from its
# training on the standard library): top-1 agreement with bfloat16 at least, relative logit error at most.
DEMO_BOUNDS = {"int8": (0.95, 0.03), "int4": (0.75, 0.15)}


@pytest.mark.skipif(not (DEMO / "config.json").exists(), reason="needs the trained demo model in demo/")
@pytest.mark.parametrize("mode", DEMO_BOUNDS)
def test_demo_model_quantized_accuracy_within_stated_bounds(mode):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(DEMO, trust_remote_code=True)
    ids = []
    for path in sorted(ROOT.glob("*.py")):
        ids += tokenizer(path.read_text(encoding="utf-8"))["input_ids"]
    windows = torch.tensor(ids[: 8 * 128]).view(8, 128)
    reference = AutoModelForCausalLM.from_pretrained(DEMO, trust_remote_code=True, dtype=torch.bfloat16)
    quantized = AutoModelForCausalLM.from_pretrained(DEMO, trust_remote_code=True, weight_quantization=mode)
    with torch.inference_mode():
        expected, got = reference(windows).logits.float(), quantized(windows).logits.float()
    min_agreement, max_error = DEMO_BOUNDS[mode]
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= min_agreement
    assert relative_error(got, expected) <= max_error


def test_int8_keeps_torch_s_layout_where_the_native_int8_kernel_is_plain_c(monkeypatch, plain_c_native_kernels):
    """Built with neither AVX512-VNNI nor AVX2, the native int8 product is a plain C loop (7x slower than a bfloat16
    decode step): int8 then keeps a scale per output channel and torch's int8 kernels, as without a compiler."""
    if plain_c_native_kernels.int8_vectors_available():
        pytest.skip("this compiler builds vector kernels even with -mno-avx512f -mno-avx2")
    monkeypatch.setattr(quantization, "native_kernels", lambda: plain_c_native_kernels)
    weight = gaussian(64, 64).to(torch.bfloat16)
    layer = Int8Linear(weight)
    assert not layer.native_available and layer.block_size == 64 and "native" not in layer.routes(1)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert relative_error(layer(x), x.float() @ weight.float().t()) < ROUTE_BOUNDS["int8 onednn"]
