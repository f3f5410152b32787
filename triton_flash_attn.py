"""FlashAttention with ALiBi for MPT (replit-code-v1-3b), written in Triton.

Causal attention whose ALiBi bias is computed inside the kernels from per-head slopes, so no
(seq x seq) bias or mask tensor is ever built and memory stays linear in sequence length.
Forward and backward follow FlashAttention-2: the forward keeps a running max and sum per query
row and saves the row's log-sum-exp; the backward recomputes the probabilities from it, with
separate kernels for dK/dV (one program per key block) and dQ (one program per query block) so
that no atomics are needed and the gradients are deterministic.

Inside the kernels everything is in base 2, because exp2 is the native instruction: scores and
slopes are pre-multiplied by log2(e) and the saved log-sum-exp is a log2.

Layout: q is (batch, heads, q_len, head_dim), k and v are (batch, heads, kv_len, head_dim), any
strides. Query row i sits at key position kv_len - q_len + i (causal diagonal aligned
bottom-right), which covers training (q_len == kv_len), cached decoding (q_len == 1) and chunked
prefill against a KV cache.
"""

import math
import os
import types

import torch

try:
    import triton
    import triton.language as tl

    _TRITON_IMPORT_ERROR = None
except ImportError as err:
    # The model imports this module on CPU-only machines that may lack triton. Keep the kernel
    # definitions below importable; triton_available_for() raises before anything is launched.
    _TRITON_IMPORT_ERROR = err
    triton = tl = types.SimpleNamespace(jit=lambda fn: fn, constexpr=None)

MAX_HEAD_DIM = 128
_LOG2E = 1.4426950408889634

# Launch configuration per kernel for 16-bit inputs: (BLOCK_M query rows, BLOCK_N keys, warps, pipeline
# stages), as `benchmarks/bench_triton_attention.py --tune` chose them on an H200 (it times candidates on a GPU
# and prints the fastest as this dict). Head dims above 64 (the model's 80 is padded to 128) use these as they
# are; smaller head dims use 4 warps, and float32 halves the larger block.
LAUNCH_CONFIGS = {"fwd": (64, 64, 4, 3), "bwd_dkdv": (32, 64, 4, 3), "bwd_dq": (128, 64, 8, 3)}


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _kv_bounds(KvStart, KvEnd, b, kv_len):
    """Valid key range [kv_start, kv_end) of sequence b, clamped to [0, kv_len]."""
    kv_start = tl.maximum(tl.load(KvStart + b), 0)
    kv_end = tl.minimum(tl.load(KvEnd + b), kv_len)
    return kv_start, kv_end


@triton.jit
def _key_blocks(start_m, q_len, q_offset, kv_start, kv_end, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Split the keys seen by query rows [start_m, start_m + BLOCK_M) into three ranges:
    [lo, mid_lo):     the first block when left padding cuts it (needs the mask),
    [mid_lo, mid_hi): blocks every row of the block sees entirely (no mask),
    [mid_hi, hi):     blocks cut by the causal diagonal or by right padding (need the mask).
    Keys outside [lo, hi) are invisible to all these rows and never loaded.
    lo <= mid_lo <= mid_hi <= hi; every range but the last starts on a BLOCK_N boundary.
    """
    first_qpos = start_m + q_offset
    last_qpos = tl.minimum(start_m + BLOCK_M, q_len) - 1 + q_offset
    lo = kv_start // BLOCK_N * BLOCK_N
    hi = tl.maximum(tl.minimum(kv_end, last_qpos + 1), lo)
    mid_lo = tl.minimum(tl.cdiv(kv_start, BLOCK_N) * BLOCK_N, hi)
    mid_hi = tl.maximum(tl.minimum(kv_end, first_qpos + 1) // BLOCK_N * BLOCK_N, mid_lo)
    return lo, mid_lo, mid_hi, hi


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q, K, V,
    stride_kn, stride_kd, stride_vn, stride_vd,
    qpos, slope, kv_start, kv_end, qk_scale, lo, hi,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Online-softmax accumulation of keys [lo, hi) into (acc, l_i, m_i) for one query block."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        # Padded keys are never read, not just masked out: padding may hold nan, and 0 * nan = nan.
        key_ok = (offs_n >= kv_start) & (offs_n < kv_end)
        k_t = tl.load(K + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                      mask=d_ok[:, None] & key_ok[None, :], other=0.0)  # (BLOCK_D, BLOCK_N)
        v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=key_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        # (BLOCK_M, BLOCK_N) scores in log2 units. The bias is relative to the query position so
        # that it is exact (integer distance) and small near the diagonal, where the mass is.
        s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
        s += slope * (offs_n[None, :] - qpos[:, None]).to(tl.float32)
        if MASKED:
            s = tl.where(key_ok[None, :] & (offs_n[None, :] <= qpos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen only masked keys so far keeps m = -inf; shift it by 0 instead,
        # since -inf - -inf is nan.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)  # rescales what was summed under the old row max
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q, K, V, Out, Lse, Slopes, KvStart, KvEnd,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    num_heads, q_len, kv_len, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid (query blocks, batch, heads). Writes Out and the log2-sum-exp Lse (batch, heads, q_len)."""
    # Launch the query blocks with the most keys (bottom of the causal triangle) first, so the
    # cheap ones fill the tail of the grid.
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    b = tl.program_id(1)
    h = tl.program_id(2)
    bh = b.to(tl.int64) * num_heads + h  # up to 65535 * 65535 rows of Lse / Delta: past int32
    Q += b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    K += b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    Out += b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    Lse += bh * q_len

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < q_len
    d_ok = offs_d < HEAD_DIM
    q_offset = kv_len - q_len
    qpos = offs_m + q_offset  # key position of each query row
    slope = tl.load(Slopes + h)  # already in log2 units
    kv_start, kv_end = _kv_bounds(KvStart, KvEnd, b, kv_len)

    q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max of the scores
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    lo, mid_lo, mid_hi, hi = _key_blocks(start_m, q_len, q_offset, kv_start, kv_end, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                               qpos, slope, kv_start, kv_end, qk_scale, lo, mid_lo,
                               HEAD_DIM, BLOCK_D, BLOCK_N, True, DOT_PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                               qpos, slope, kv_start, kv_end, qk_scale, mid_lo, mid_hi,
                               HEAD_DIM, BLOCK_D, BLOCK_N, False, DOT_PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                               qpos, slope, kv_start, kv_end, qk_scale, mid_hi, hi,
                               HEAD_DIM, BLOCK_D, BLOCK_N, True, DOT_PRECISION)

    # Rows that saw no key (left padding, fully padded sequences) have l_i == 0: they output 0
    # and get a log-sum-exp of +inf, so the backward recomputes probabilities of exactly 0.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(Out + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(Lse + offs_m, tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe)), mask=row_ok)


@triton.jit
def _bwd_preprocess_kernel(
    Out, DO, Delta,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    num_heads, q_len,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Delta (batch, heads, q_len) = rowsum(dO * O), the softmax-backward term shared by all keys."""
    b = tl.program_id(1)
    h = tl.program_id(2)
    bh = b.to(tl.int64) * num_heads + h  # up to 65535 * 65535 rows of Lse / Delta: past int32
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < q_len)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od, mask=mask, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                 + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + bh * q_len + offs_m, delta, mask=offs_m < q_len)


@triton.jit
def _bwd_dkdv_inner(
    dk, dv, k, v, Q, DO, Lse, Delta,
    stride_qm, stride_qd, stride_dom, stride_dod,
    offs_n, key_ok, slope, q_offset, q_len, qk_scale, lo, hi,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Accumulate into dk, dv (BLOCK_N, BLOCK_D) the contributions of query rows [lo, hi)."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < q_len
        q_t = tl.load(Q + offs_m[None, :] * stride_qm + offs_d[:, None] * stride_qd,
                      mask=d_ok[:, None] & row_ok[None, :], other=0.0)  # (BLOCK_D, BLOCK_M)
        do = tl.load(DO + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                     mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
        # +inf for rows past q_len makes their probabilities 0, like the forward's empty rows.
        lse = tl.load(Lse + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(Delta + offs_m, mask=row_ok, other=0.0)
        qpos = offs_m + q_offset
        # Transposed scores (BLOCK_N, BLOCK_M), recomputed exactly as in the forward.
        s_t = tl.dot(k, q_t, input_precision=DOT_PRECISION) * qk_scale
        s_t += slope * (offs_n[:, None] - qpos[None, :]).to(tl.float32)
        if MASKED:
            s_t = tl.where(key_ok[:, None] & (offs_n[:, None] <= qpos[None, :]), s_t, float("-inf"))
        p_t = tl.math.exp2(s_t - lse[None, :])
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, Lse, Delta, Slopes, KvStart, KvEnd,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    num_heads, q_len, kv_len, sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid (key blocks, batch, heads): dK and dV of one key block, looping over query blocks."""
    start_n = tl.program_id(0) * BLOCK_N
    b = tl.program_id(1)
    h = tl.program_id(2)
    bh = b.to(tl.int64) * num_heads + h  # up to 65535 * 65535 rows of Lse / Delta: past int32
    Q += b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    K += b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    DO += b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
    DK += b.to(tl.int64) * stride_dkb + h.to(tl.int64) * stride_dkh
    DV += b.to(tl.int64) * stride_dvb + h.to(tl.int64) * stride_dvh
    Lse += bh * q_len
    Delta += bh * q_len

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    slope = tl.load(Slopes + h)
    kv_start, kv_end = _kv_bounds(KvStart, KvEnd, b, kv_len)
    key_ok = (offs_n >= kv_start) & (offs_n < kv_end)
    kv_mask = key_ok[:, None] & d_ok[None, :]
    k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    q_offset = kv_len - q_len
    # Query rows that see at least one key of this block: qpos >= start_n.
    m_lo = tl.maximum(start_n - q_offset, 0) // BLOCK_M * BLOCK_M
    # From m_mid on, every row sees every key of the block and needs no mask -- unless padding
    # cuts the block, which then masks all rows; a block entirely in padding gets no rows at all.
    # Rows past q_len need no mask either: their +inf log-sum-exp zeroes them.
    m_mid = tl.minimum(tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - q_offset, 0), BLOCK_M) * BLOCK_M, q_len)
    inside = (start_n >= kv_start) & (start_n + BLOCK_N <= kv_end)
    outside = (start_n + BLOCK_N <= kv_start) | (start_n >= kv_end)
    m_mid = tl.where(inside, m_mid, q_len)
    m_lo = tl.where(outside, q_len, m_lo)

    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q, DO, Lse, Delta, stride_qm, stride_qd, stride_dom, stride_dod,
                             offs_n, key_ok, slope, q_offset, q_len, qk_scale, m_lo, m_mid,
                             HEAD_DIM, BLOCK_D, BLOCK_M, True, DOT_PRECISION)
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q, DO, Lse, Delta, stride_qm, stride_qd, stride_dom, stride_dod,
                             offs_n, key_ok, slope, q_offset, q_len, qk_scale, m_mid, q_len,
                             HEAD_DIM, BLOCK_D, BLOCK_M, False, DOT_PRECISION)

    out_mask = (offs_n < kv_len)[:, None] & d_ok[None, :]
    tl.store(DK + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             (dk * sm_scale).to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=out_mask)


@triton.jit
def _bwd_dq_inner(
    dq, q, do, lse, delta, K, V,
    stride_kn, stride_kd, stride_vn, stride_vd,
    qpos, slope, kv_start, kv_end, qk_scale, lo, hi,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Accumulate into dq (BLOCK_M, BLOCK_D) the contributions of keys [lo, hi)."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_ok = (offs_n >= kv_start) & (offs_n < kv_end)
        kv_mask = d_ok[:, None] & key_ok[None, :]
        k_t = tl.load(K + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                      mask=kv_mask, other=0.0)  # (BLOCK_D, BLOCK_N)
        v_t = tl.load(V + offs_n[None, :] * stride_vn + offs_d[:, None] * stride_vd,
                      mask=kv_mask, other=0.0)  # (BLOCK_D, BLOCK_N)
        s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        s += slope * (offs_n[None, :] - qpos[:, None]).to(tl.float32)
        if MASKED:
            s = tl.where(key_ok[None, :] & (offs_n[None, :] <= qpos[:, None]), s, float("-inf"))
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, v_t, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k_t.dtype), tl.trans(k_t), dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, Lse, Delta, Slopes, KvStart, KvEnd,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    num_heads, q_len, kv_len, sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid (query blocks, batch, heads): dQ of one query block, looping over key blocks."""
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M  # heaviest blocks first
    b = tl.program_id(1)
    h = tl.program_id(2)
    bh = b.to(tl.int64) * num_heads + h  # up to 65535 * 65535 rows of Lse / Delta: past int32
    Q += b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    K += b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    DO += b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
    DQ += b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
    Lse += bh * q_len
    Delta += bh * q_len

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < q_len
    mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    q_offset = kv_len - q_len
    qpos = offs_m + q_offset
    slope = tl.load(Slopes + h)
    kv_start, kv_end = _kv_bounds(KvStart, KvEnd, b, kv_len)

    q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=mask, other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=mask, other=0.0)
    lse = tl.load(Lse + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    lo, mid_lo, mid_hi, hi = _key_blocks(start_m, q_len, q_offset, kv_start, kv_end, BLOCK_M, BLOCK_N)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                       qpos, slope, kv_start, kv_end, qk_scale, lo, mid_lo,
                       HEAD_DIM, BLOCK_D, BLOCK_N, True, DOT_PRECISION)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                       qpos, slope, kv_start, kv_end, qk_scale, mid_lo, mid_hi,
                       HEAD_DIM, BLOCK_D, BLOCK_N, False, DOT_PRECISION)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                       qpos, slope, kv_start, kv_end, qk_scale, mid_hi, hi,
                       HEAD_DIM, BLOCK_D, BLOCK_N, True, DOT_PRECISION)

    tl.store(DQ + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=mask)


# triton.jit chooses between the interpreter and the compiler when a kernel is defined, i.e. when
# this module is imported, so TRITON_INTERPRET must be set before that.
_INTERPRETED = _TRITON_IMPORT_ERROR is None and not isinstance(_fwd_kernel, triton.runtime.JITFunction)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------


def triton_available_for(tensor):
    """Raise ImportError / RuntimeError if the Triton kernels cannot run on `tensor`; else return None."""
    if _TRITON_IMPORT_ERROR is not None:
        raise ImportError(
            "attn_impl='triton' needs the triton package (pip install triton; it ships with CUDA "
            f"builds of torch on Linux), but importing it failed: {_TRITON_IMPORT_ERROR}"
        ) from _TRITON_IMPORT_ERROR
    if tensor.device.type == "cuda" or (tensor.device.type == "cpu" and _INTERPRETED):
        return
    message = (
        "attn_impl='triton' needs a CUDA device (or TRITON_INTERPRET=1 for the interpreter); "
        f"got a tensor on {tensor.device}"
    )
    if os.environ.get("TRITON_INTERPRET") == "1" and not _INTERPRETED:
        message += " (TRITON_INTERPRET=1 was set after triton_flash_attn was imported; set it before)"
    raise RuntimeError(message)


# CUDA's limit on the second and third axes of a launch grid (the first takes 2**31 - 1).
MAX_GRID_AXIS = 65535


def _grid(length, block, batch, heads):
    """One program per block of `length`, per row and per head. Rows and heads have an axis each: batch * heads on
    one axis passed CUDA's limit at 2048 rows of 32 heads, which packed training reaches (a row per sequence)."""
    return (triton.cdiv(length, block), batch, heads)


def _check_inputs(q, k, v, alibi_slopes):
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(
            "expected q (batch, heads, q_len, head_dim) and k, v (batch, heads, kv_len, head_dim); "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    batch, heads, q_len, head_dim = q.shape
    if (k.shape[0], k.shape[1], k.shape[3]) != (batch, heads, head_dim):
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, heads or head_dim")
    if q_len > k.shape[2]:
        raise ValueError(f"q_len ({q_len}) must not exceed kv_len ({k.shape[2]})")
    if max(batch, heads) > MAX_GRID_AXIS:
        raise ValueError(
            f"at most {MAX_GRID_AXIS} rows and {MAX_GRID_AXIS} heads in one call (CUDA's limit on a launch grid); got "
            f"{batch} rows of {heads} heads: split the batch"
        )
    if not 1 <= head_dim <= MAX_HEAD_DIM:  # 0 would fail as a ZeroDivisionError in the default softmax_scale
        raise ValueError(f"head_dim up to {MAX_HEAD_DIM} is supported (and at least 1); got {head_dim}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share one of float16, bfloat16, float32; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if q.dtype == torch.bfloat16 and q.device.type == "cpu" and _INTERPRETED:
        raise ValueError(
            "Triton's interpreter (TRITON_INTERPRET=1) cannot run this kernel in bfloat16 (its tl.dot multiplies "
            "bfloat16 bit patterns as integers, a wrong result): use float32 or float16 there, or a CUDA device"
        )
    if alibi_slopes.shape != (heads,):
        raise ValueError(f"alibi_slopes must have shape ({heads},); got {tuple(alibi_slopes.shape)}")


def _kv_bound(bound, default, batch, kv_len, device):
    """(batch,) int32 on `device`; the kernels always read both bounds, so a missing one is the full range."""
    if bound is None:
        return torch.full((batch,), default, dtype=torch.int32, device=device)
    if not isinstance(bound, torch.Tensor):
        raise TypeError(f"kv_start / kv_end must be (batch,) integer tensors; got {type(bound).__name__}")
    if bound.shape != (batch,):
        raise ValueError(f"kv_start / kv_end must have shape ({batch},); got {tuple(bound.shape)}")
    if bound.is_floating_point() or bound.is_complex() or bound.dtype == torch.bool:
        raise ValueError(f"kv_start / kv_end must be integer tensors; got {bound.dtype}")
    if bound.dtype != torch.int32:
        # Clamped to [0, kv_len] before the narrowing to the kernels' int32, which would wrap a bound past 2**31
        # around to another key; the kernels clamp int32 bounds themselves, so those (the model's) pass as they are.
        bound = bound.clamp(0, kv_len).to(torch.int32)
    return bound.to(device=device).contiguous()


def _meta(q, kernel):
    """Block sizes, warps and stages for `kernel` (a key of LAUNCH_CONFIGS), given q's head dim and dtype."""
    head_dim = q.shape[-1]
    # tl.arange needs a power of two and tl.dot at least 16; the extra columns are masked.
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m, block_n, num_warps, num_stages = LAUNCH_CONFIGS[kernel]
    if block_d <= 64:
        num_warps = 4
    if q.dtype == torch.float32:
        # fp32 tiles take twice the shared memory of 16-bit ones: halve the larger block.
        block_m, block_n = (block_m // 2, block_n) if block_m > block_n else (block_m, block_n // 2)
        num_stages = 2
    return dict(
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
        # fp32 is for exactness checks, so IEEE products rather than the TF32 default.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else None,
        num_warps=num_warps, num_stages=num_stages,
    )


def _forward(q, k, v, slopes_log2, kv_start, kv_end, softmax_scale):
    batch, heads, q_len, _ = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((batch, heads, q_len), dtype=torch.float32, device=q.device)
    meta = _meta(q, "fwd")
    # Short query chunks (decoding, q_len == 1) would waste most of a tuned BLOCK_M-row block.
    meta["BLOCK_M"] = min(meta["BLOCK_M"], max(16, triton.next_power_of_2(q_len)))
    _fwd_kernel[_grid(q_len, meta["BLOCK_M"], batch, heads)](
        q, k, v, out, lse, slopes_log2, kv_start, kv_end,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        heads, q_len, k.shape[2], softmax_scale * _LOG2E, **meta,
    )
    return out, lse


def _backward(do, q, k, v, out, lse, slopes_log2, kv_start, kv_end, softmax_scale):
    batch, heads, q_len, _ = q.shape
    kv_len = k.shape[2]
    delta = torch.empty_like(lse)
    meta = _meta(q, "bwd_dq")
    _bwd_preprocess_kernel[_grid(q_len, meta["BLOCK_M"], batch, heads)](
        out, do, delta, *out.stride(), *do.stride(), heads, q_len,
        HEAD_DIM=meta["HEAD_DIM"], BLOCK_D=meta["BLOCK_D"], BLOCK_M=meta["BLOCK_M"],
    )
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    qk_scale = softmax_scale * _LOG2E

    dkdv_meta = _meta(q, "bwd_dkdv")
    _bwd_dkdv_kernel[_grid(kv_len, dkdv_meta["BLOCK_N"], batch, heads)](
        q, k, v, do, dk, dv, lse, delta, slopes_log2, kv_start, kv_end,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        heads, q_len, kv_len, softmax_scale, qk_scale, **dkdv_meta,
    )
    _bwd_dq_kernel[_grid(q_len, meta["BLOCK_M"], batch, heads)](
        q, k, v, do, dq, lse, delta, slopes_log2, kv_start, kv_end,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        heads, q_len, kv_len, softmax_scale, qk_scale, **meta,
    )
    return dq, dk, dv


class _FlashAttnAlibi(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, slopes_log2, kv_start, kv_end, softmax_scale):
        out, lse = _forward(q, k, v, slopes_log2, kv_start, kv_end, softmax_scale)
        ctx.save_for_backward(q, k, v, out, lse, slopes_log2, kv_start, kv_end)
        ctx.softmax_scale = softmax_scale
        return out

    # The kernels are opaque to autograd, so the gradients they return carry no graph of their own. Without
    # once_differentiable, a second derivative (create_graph=True, e.g. a gradient penalty) silently came back as
    # if its terms through the kernel were 0; with it, differentiating twice raises.
    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, out, lse, slopes_log2, kv_start, kv_end = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, out, lse, slopes_log2, kv_start, kv_end, ctx.softmax_scale)
        return dq, dk, dv, None, None, None, None


def flash_attn_alibi(q, k, v, alibi_slopes, kv_start=None, kv_end=None, softmax_scale=None, dropout_p=0.0):
    """Causal attention with ALiBi, FlashAttention-style (no (seq x seq) tensor is ever built).
    q: (batch, heads, q_len, head_dim); k, v: (batch, heads, kv_len, head_dim); q_len <= kv_len.
    alibi_slopes: (heads,) float32.
    The causal diagonal is aligned bottom-right: query i sits at key position kv_len - q_len + i and sees keys j <= that.
    kv_start, kv_end: optional (batch,) int tensors: keys outside [kv_start[b], kv_end[b]) are masked
        (left padding in batched generation -> kv_start; right padding in training -> kv_end).
    Score = softmax_scale * q.k + slope_h * (j - query_position)   (softmax_scale default 1/sqrt(head_dim)).
    Returns (batch, heads, q_len, head_dim) in q's dtype. Query rows with no visible key return 0.
    """
    if dropout_p != 0.0:  # a negative or NaN probability too, which `> 0` let through as no dropout
        raise ValueError(
            f"the triton attention kernel has no attention dropout (got dropout_p={dropout_p}); "
            "the published model uses attn_pdrop=0 -- use attn_impl='torch' to train with dropout"
        )
    triton_available_for(q)
    _check_inputs(q, k, v, alibi_slopes)
    batch, _, _, head_dim = q.shape
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    kv_start = _kv_bound(kv_start, 0, batch, k.shape[2], q.device)
    kv_end = _kv_bound(kv_end, k.shape[2], batch, k.shape[2], q.device)
    slopes_log2 = alibi_slopes.to(device=q.device, dtype=torch.float32) * _LOG2E
    return _FlashAttnAlibi.apply(q, k, v, slopes_log2, kv_start, kv_end, float(softmax_scale))
