"""Kernel-level tests of triton_flash_attn.flash_attn_alibi against a float64 reference attention.

Without a GPU they run under the Triton interpreter (TRITON_INTERPRET=1, set below before triton is
imported); on a CUDA machine they test the compiled kernels on the GPU.

Tolerances (the reference gets the same, already rounded, inputs):
    float32   forward atol 2e-5 / rtol 1e-4, gradients atol 1e-4 / rtol 1e-3
    float16   forward atol 3e-3 / rtol 1e-2, gradients atol 1e-2 / rtol 2e-2
    bfloat16  forward atol 2e-2 / rtol 2e-2, gradients atol 6e-2 / rtol 5e-2  (GPU only: the
              interpreter's tl.dot multiplies bfloat16 bit patterns as uint16)
"""

import math
import os
import subprocess
import sys

import torch

# triton.jit picks interpreter or compiler when a kernel is defined, so this must precede the first
# import of triton_flash_attn (tests/conftest.py does the same for the model tests).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from conftest import ROOT  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytest.importorskip("triton")

import triton_flash_attn  # noqa: E402
from triton_flash_attn import flash_attn_alibi, triton_available_for  # noqa: E402

INTERPRETED = triton_flash_attn._INTERPRETED
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET is off and there is no CUDA device", allow_module_level=True)
DEVICE = "cpu" if INTERPRETED else "cuda"

TOLERANCES = {  # dtype: (forward atol, rtol), (gradient atol, rtol)
    torch.float32: ((2e-5, 1e-4), (1e-4, 1e-3)),
    torch.float16: ((3e-3, 1e-2), (1e-2, 2e-2)),
    torch.bfloat16: ((2e-2, 2e-2), (6e-2, 5e-2)),
}


def alibi_slopes(heads):
    """MPT's slopes (alibi_bias_max 8), including its interleaving for non-power-of-two head counts."""
    n = 2 ** math.ceil(math.log2(heads))
    slopes = 1.0 / 2 ** (torch.arange(1, n + 1, dtype=torch.float32) * (8.0 / n))
    if n != heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:heads]
    return slopes


def reference_attention(q, k, v, slopes, kv_start, kv_end, softmax_scale):
    """Explicit softmax attention in q's dtype. Returns the output (batch, heads, q_len, head_dim)
    and which query rows see at least one key (batch, 1, q_len); other rows output 0."""
    q_len, kv_len = q.shape[2], k.shape[2]
    qpos = torch.arange(q_len) + kv_len - q_len  # (q_len,)
    j = torch.arange(kv_len)  # (kv_len,)
    scores = softmax_scale * q @ k.transpose(-1, -2) + slopes[:, None, None] * (j - qpos[:, None])
    visible = (j <= qpos[:, None]) & (j >= kv_start[:, None, None, None]) & (j < kv_end[:, None, None, None])
    has_key = visible.any(-1, keepdim=True)  # (batch, 1, q_len, 1)
    # Empty rows get finite scores and are zeroed after the softmax, so their gradient is 0, not nan.
    scores = scores.masked_fill(~visible, float("-inf")).masked_fill(~has_key, 0.0)
    probs = torch.softmax(scores, dim=-1) * has_key
    return probs @ v, has_key.squeeze(-1)


def check_against_reference(q, k, v, kv_start=None, kv_end=None, softmax_scale=None):
    """Run the kernel forward and backward on (q, k, v) and compare with the float64 reference."""
    batch, heads, q_len, head_dim = q.shape
    kv_len = k.shape[2]
    slopes = alibi_slopes(heads)
    (fwd_atol, fwd_rtol), (grad_atol, grad_rtol) = TOLERANCES[q.dtype]

    q, k, v = (t.to(DEVICE).requires_grad_() for t in (q, k, v))
    bounds = [None if t is None else t.to(DEVICE) for t in (kv_start, kv_end)]
    out = flash_attn_alibi(q, k, v, slopes.to(DEVICE), *bounds, softmax_scale=softmax_scale)
    d_out = torch.randn(out.shape, dtype=out.dtype).to(DEVICE)
    out.backward(d_out)
    assert out.shape == q.shape and out.dtype == q.dtype

    ref_inputs = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    ref_out, has_key = reference_attention(
        *ref_inputs, slopes.double(),
        torch.zeros(batch, dtype=torch.long) if kv_start is None else kv_start,
        torch.full((batch,), kv_len) if kv_end is None else kv_end,
        1 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale,
    )
    ref_out.backward(d_out.cpu().double())

    rows = has_key.expand(batch, heads, q_len)
    out = out.detach().cpu().double()
    torch.testing.assert_close(out[rows], ref_out.detach()[rows], atol=fwd_atol, rtol=fwd_rtol)
    assert (out[~rows] == 0).all(), "rows with no visible key must output 0"
    for name, t, ref in zip("qkv", (q, k, v), ref_inputs):
        torch.testing.assert_close(t.grad.cpu().double(), ref.grad, atol=grad_atol, rtol=grad_rtol,
                                   msg=lambda m, name=name: f"d{name}: {m}")


def random_qkv(batch, heads, q_len, kv_len, head_dim, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    q = torch.randn(batch, heads, q_len, head_dim).to(dtype)
    k = torch.randn(batch, heads, kv_len, head_dim).to(dtype)
    v = torch.randn(batch, heads, kv_len, head_dim).to(dtype)
    return q, k, v


# float32 blocks are 64 query rows x 64 keys forward, 32 x 64 (dK/dV) and 64 x 32 (dQ) backward:
# the lengths and padding bounds below cross block boundaries both aligned and unaligned, and
# kv_len - q_len = 62 puts the causal diagonal one key before a block edge, where an off-by-one
# in choosing the unmasked blocks shows.
CASES = [
    # batch, heads, q_len, kv_len, head_dim, kv_start, kv_end
    pytest.param(2, 3, 77, 77, 64, None, None, id="d64-self"),
    pytest.param(1, 2, 70, 70, 128, None, None, id="d128-self"),
    pytest.param(1, 3, 64, 200, 80, None, None, id="d80-chunked-prefill"),
    pytest.param(1, 2, 70, 132, 64, None, None, id="d64-diagonal-at-block-edge"),
    pytest.param(3, 6, 1, 100, 80, [37, 64, 0], None, id="d80-decode-left-pad"),
    pytest.param(2, 3, 90, 90, 80, [0, 33], None, id="d80-prefill-left-pad"),
    pytest.param(3, 4, 129, 129, 32, None, [129, 64, 1], id="d32-right-pad"),
    pytest.param(2, 3, 37, 150, 24, [5, 70], [140, 150], id="d24-chunk-both-pads"),
    pytest.param(2, 3, 20, 40, 64, [0, 10], [40, 10], id="d64-fully-padded-sequence"),
]


@pytest.mark.parametrize("batch, heads, q_len, kv_len, head_dim, kv_start, kv_end", CASES)
def test_matches_reference_float32(batch, heads, q_len, kv_len, head_dim, kv_start, kv_end):
    q, k, v = random_qkv(batch, heads, q_len, kv_len, head_dim)
    check_against_reference(
        q, k, v,
        kv_start=None if kv_start is None else torch.tensor(kv_start),
        kv_end=None if kv_end is None else torch.tensor(kv_end),
    )


@pytest.mark.parametrize("dtype", [
    torch.float16,
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
        INTERPRETED, reason="the interpreter's tl.dot multiplies bfloat16 bit patterns as uint16")),
])
def test_matches_reference_half_precision(dtype):
    q, k, v = random_qkv(2, 3, 77, 96, 80, dtype=dtype)
    check_against_reference(q, k, v, kv_start=torch.tensor([0, 21]), kv_end=torch.tensor([90, 96]))


def test_custom_softmax_scale():
    q, k, v = random_qkv(1, 2, 40, 40, 32)
    check_against_reference(q, k, v, softmax_scale=0.3)


def test_non_contiguous_inputs():
    # MPT's layout: one fused projection (batch, seq, 3, heads, head_dim) viewed as
    # (batch, heads, seq, head_dim) per q/k/v, so no input is contiguous.
    torch.manual_seed(0)
    qkv = torch.randn(2, 50, 3, 6, 40).to(DEVICE)  # on DEVICE already: .to() would make copies contiguous
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not any(t.is_contiguous() for t in (q, k, v))
    check_against_reference(q, k, v, kv_end=torch.tensor([50, 31]))


@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_random_shapes_and_padding(data):
    batch = data.draw(st.integers(1, 2), label="batch")
    heads = data.draw(st.integers(1, 5), label="heads")
    head_dim = data.draw(st.sampled_from([16, 24, 48, 80]), label="head_dim")
    q_len = data.draw(st.integers(1, 70), label="q_len")
    kv_len = data.draw(st.integers(q_len, q_len + 70), label="kv_len")
    kv_start = [data.draw(st.integers(0, kv_len // 2), label="kv_start") for _ in range(batch)]
    kv_end = [data.draw(st.integers(start, kv_len), label="kv_end") for start in kv_start]
    q, k, v = random_qkv(batch, heads, q_len, kv_len, head_dim, seed=data.draw(st.integers(0, 2**16)))
    check_against_reference(q, k, v, kv_start=torch.tensor(kv_start), kv_end=torch.tensor(kv_end))


@pytest.mark.parametrize("dropout_p", [0.1, -0.1, float("nan")])
def test_dropout_is_rejected(dropout_p):
    q, k, v = random_qkv(1, 2, 4, 4, 16)
    with pytest.raises(ValueError, match="dropout"):
        flash_attn_alibi(q, k, v, alibi_slopes(2), dropout_p=dropout_p)


@pytest.mark.parametrize("q_shape, kv_shape, match", [
    ((1, 2, 4, 256), (1, 2, 4, 256), "head_dim up to 128"),
    ((1, 2, 8, 16), (1, 2, 4, 16), "must not exceed kv_len"),
    ((1, 2, 4, 16), (1, 3, 4, 16), "differ in batch, heads or head_dim"),
])
def test_bad_shapes_are_rejected(q_shape, kv_shape, match):
    q, k = torch.zeros(q_shape, device=DEVICE), torch.zeros(kv_shape, device=DEVICE)
    with pytest.raises(ValueError, match=match):
        flash_attn_alibi(q, k, k, alibi_slopes(q_shape[1]))


@pytest.mark.skipif(not INTERPRETED, reason="the interpreter's limit")
def test_bfloat16_is_refused_by_the_interpreter_which_computes_it_wrongly():
    q, k, v = random_qkv(1, 2, 4, 4, 16)
    with pytest.raises(ValueError, match="interpreter .* bfloat16"):
        flash_attn_alibi(q.bfloat16(), k.bfloat16(), v.bfloat16(), alibi_slopes(2))


def run_python(code, **env_changes):
    """Run `code` in a fresh interpreter (triton's mode is fixed at import) from the repo root."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_changes)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cpu_tensor_without_interpreter_is_rejected():
    result = run_python(
        "import torch\n"
        "from triton_flash_attn import flash_attn_alibi\n"
        "x = torch.zeros(1, 2, 4, 16)\n"
        "try:\n"
        "    flash_attn_alibi(x, x, x, torch.ones(2))\n"
        "except RuntimeError as err:\n"
        "    print(err)\n"
    )
    assert result.returncode == 0, result.stderr
    assert ("attn_impl='triton' needs a CUDA device (or TRITON_INTERPRET=1 for the interpreter); "
            "got a tensor on cpu") in result.stdout


def test_missing_triton_gives_import_error():
    result = run_python(
        "import sys, torch\n"
        "sys.modules['triton'] = None  # makes `import triton` raise ImportError\n"
        "import triton_flash_attn\n"
        "try:\n"
        "    triton_flash_attn.triton_available_for(torch.zeros(1))\n"
        "except ImportError as err:\n"
        "    print(err)\n",
        TRITON_INTERPRET="1",
    )
    assert result.returncode == 0, result.stderr
    assert "attn_impl='triton' needs the triton package (pip install triton" in result.stdout


def test_available_for_supported_device():
    triton_available_for(torch.zeros(1, device=DEVICE))


def test_second_derivative_is_refused_not_silently_zero():
    # The backward runs Triton kernels that autograd cannot trace, so a second derivative through it (a gradient
    # penalty: loss + |d loss / d q|^2) does not exist. It must raise, not come back as if that term were 0.
    q, k, v = (t.to(DEVICE).requires_grad_() for t in random_qkv(1, 2, 6, 6, 16, seed=torch.seed() % 2**31))
    out = flash_attn_alibi(q, k, v, alibi_slopes(2).to(DEVICE))
    (dq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        (out.sum() + dq.square().sum()).backward()


def test_key_bounds_beyond_int32_are_clamped_not_wrapped():
    # The kernels read the bounds as int32. A bound past kv_len (or before 0) means the same as kv_len (or 0),
    # but 2**32 + 3 narrowed to int32 is 3: it wrapped around and silently showed or hid other keys.
    q, k, v = random_qkv(2, 2, 9, 20, 16, seed=torch.seed() % 2**31)
    check_against_reference(q, k, v, kv_start=torch.tensor([-2**32 + 2, 2**32 + 3]), kv_end=torch.tensor([2**32, 20]))


@pytest.mark.parametrize("bound", [torch.tensor([1.7]), torch.tensor([True]), [1]], ids=["float", "bool", "list"])
def test_key_bounds_that_are_not_integer_tensors_are_rejected(bound):
    # A float bound was silently truncated, a bool taken as 0/1, a list failed with an AttributeError on .shape.
    q, k, v = random_qkv(1, 2, 4, 4, 16)
    with pytest.raises((ValueError, TypeError), match="integer"):
        flash_attn_alibi(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), alibi_slopes(2), kv_start=bound)


def test_zero_head_dim_is_rejected():
    q = torch.zeros(1, 2, 4, 0, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim"):
        flash_attn_alibi(q, q, q, alibi_slopes(2))


def test_rows_and_heads_have_launch_grid_axes_of_their_own():
    # CUDA takes at most 65535 programs on a grid's second and third axes: 2048 packed sequences (a row each) of 32
    # heads, as one axis, were past it. The interpreter has no such limit, so it checks the grid; a GPU runs it.
    rows, heads = 4096, 32
    blocks, *others = triton_flash_attn._grid(100, 16, rows, heads)
    assert blocks == 7 and others == [rows, heads]
    assert max(others) <= triton_flash_attn.MAX_GRID_AXIS
    if not INTERPRETED:
        q, k, v = (torch.randn(rows, heads, 2, 16, device=DEVICE) for _ in range(3))
        slopes = alibi_slopes(heads)
        out = flash_attn_alibi(q, k, v, slopes.to(DEVICE))
        some = [0, rows // 2, rows - 1]  # the rows at both ends of the grid and one between
        starts, ends = torch.zeros(len(some), dtype=torch.long), torch.full((len(some),), 2)
        expected, _ = reference_attention(q[some].cpu(), k[some].cpu(), v[some].cpu(), slopes, starts, ends, 0.25)
        torch.testing.assert_close(out[some].cpu(), expected, atol=2e-5, rtol=1e-4)


def test_more_rows_than_a_launch_grid_takes_are_refused():
    q = torch.zeros(triton_flash_attn.MAX_GRID_AXIS + 1, 1, 1, 16, device=DEVICE)
    with pytest.raises(ValueError, match="65535 rows .* split the batch"):
        flash_attn_alibi(q, q, q, alibi_slopes(1))
