"""ALiBi and the attention backends of ReplitLM.

Every backend computes, per head h, causal attention with the ALiBi bias

    softmax(scale * q.k_j + slope_h * (j - i)) . v      over the keys j that query position i may see,

with the causal diagonal aligned bottom-right so that q_len < kv_len (decoding against a KV cache) works.
The model prepares the masking once per forward pass as an `AttentionMask` and every layer hands it to the
backend of ATTENTION_BACKENDS that `attention_backend(config)` names:
    "sdpa"    PyTorch's scaled_dot_product_attention (attn_impl='torch', transformers' default attn_implementation);
    "eager"   the explicit matmul + softmax (attn_impl='torch' with attn_implementation='eager');
    "triton"  the FlashAttention kernel of triton_flash_attn.py, which builds no (q_len x kv_len) tensor at all
              (attn_impl='triton');
    "native_decode"  a decoding step (one new token per sequence, inference) of the torch path on the CPU, in
              bfloat16 or float32, through the C kernel `decode_attention` of quantization.py, which reads each
              head's cached keys and values once; taken in place of "sdpa" where it was timed faster on this machine.
"sdpa", "eager" and "native_decode" take any 0/1 attention mask; "triton" masks a range of keys per sequence (left or
right padding).
"""

import ctypes
import functools
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .quantization import native_kernels, time_call
from .triton_flash_attn import flash_attn_alibi


def alibi_slopes(n_heads: int, alibi_bias_max: int = 8) -> torch.Tensor:
    """Per-head ALiBi slopes, as MPT's `gen_slopes` (also for head counts that are not a power of two). (n_heads,)"""
    n_pow2 = 2 ** math.ceil(math.log2(n_heads))
    # On the CPU whatever the default device: transformers 5 builds models under a meta-device context.
    exponents = torch.arange(1, n_pow2 + 1, dtype=torch.float32, device="cpu") * (alibi_bias_max / n_pow2)
    slopes = 1.0 / torch.pow(2, exponents)
    if n_pow2 != n_heads:
        # MPT interleaves the slopes of the next power of two: odd ones first, then even ones.
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:n_heads]
    return slopes


@dataclass
class AttentionMask:
    """What every layer of one forward pass needs to mask and bias its attention, built once per pass.

    backend: the key of ATTENTION_BACKENDS that every layer of this pass calls.
    kv_start, kv_end: (batch,) int32, the keys [kv_start, kv_end) are real tokens, or None where all are; built for
        the triton backend only.
    additive: (batch or 1, heads, q_len or 1, kv_len) float, ALiBi bias plus a large negative number where a key
        is hidden; built for the sdpa and eager backends only (the triton kernel derives all of it from the slopes
        and ranges).
    cache_position: (q_len,) int64, the positions of the new tokens, where a preallocated cache stores their keys.
    padding: (batch, 1, 1, kv_len) bool, True where a key is padding, or None; set only where the sdpa backend takes a
        padded prompt in blocks of queries (`attends_in_blocks`), which hide the padding block by block: `additive`
        is then (1, heads, q_len, kv_len), without it, instead of (batch, heads, q_len, kv_len) with it (2.1 GB in
        bfloat16 for 8 prompts of 2048 tokens of the real model).
    unpacking: where sequences are packed into rows (and no attention maps are asked for), how each is laid out in
        a row of its own for the attention, with that layout's own mask (see `Unpacking`); None otherwise.
    """

    q_len: int
    kv_len: int
    slopes: torch.Tensor
    backend: str = "sdpa"
    kv_start: torch.Tensor | None = None
    kv_end: torch.Tensor | None = None
    additive: torch.Tensor | None = None
    cache_position: torch.Tensor | None = None
    padding: torch.Tensor | None = None
    unpacking: "Unpacking | None" = None


def numbered_apart(sequences: torch.Tensor) -> torch.Tensor:
    """(batch, n) per-row sequence numbers (the model's `packed_sequences`) made distinct across rows, so that in
    the flattened tensor each run of one number is one sequence."""
    rows = torch.arange(len(sequences), device=sequences.device)[:, None]
    return sequences + rows * (sequences.shape[1] + 1)


@dataclass
class Unpacking:
    """Sequences packed into rows, laid out one per row of `rows` x `length` slots for the attention: its cost is
    then the sum of the sequences' squares, not the square of the row, and the triton kernel, which masks one range
    of keys per row, takes them. tokens (n,): the flat (row * q_len + position) index of every real token, sequence
    after sequence; slots (n,): where each goes among rows * length, at its distance from its sequence's first token
    (padding inside a sequence stays a gap, as in the row); filled (rows, length) bool: the slots that hold a token,
    the unpacked layout's attention mask; mask: the AttentionMask of that layout, which the model sets."""

    tokens: torch.Tensor
    slots: torch.Tensor
    filled: torch.Tensor
    mask: "AttentionMask | None" = None

    @classmethod
    def of(cls, sequences: torch.Tensor, real: torch.Tensor) -> "Unpacking":
        """sequences, real: (batch, q_len), the sequence of each token (the model's `packed_sequences`) and whether it
        is not padding (padding belongs to no sequence)."""
        tokens = real.reshape(-1).nonzero().view(-1)
        numbers = numbered_apart(sequences).reshape(-1)[tokens]
        _, sequence, counts = torch.unique_consecutive(numbers, return_inverse=True, return_counts=True)
        first = tokens[counts.cumsum(0) - counts]  # each sequence's first token
        offset = tokens - first[sequence]
        length = int(offset.max()) + 1
        slots = sequence * length + offset
        filled = torch.zeros(len(counts) * length, dtype=torch.bool, device=tokens.device).index_fill_(0, slots, True)
        return cls(tokens, slots, filled.view(len(counts), length))

    def unpack(self, t: torch.Tensor) -> torch.Tensor:
        """(batch, heads, q_len, head_dim) -> (rows, heads, length, head_dim), zeros in the empty slots."""
        batch, heads, q_len, head_dim = t.shape
        rows, length = self.filled.shape
        flat = t.transpose(1, 2).reshape(batch * q_len, heads, head_dim).index_select(0, self.tokens)
        laid = flat.new_zeros(rows * length, heads, head_dim).index_copy(0, self.slots, flat)
        return laid.view(rows, length, heads, head_dim).transpose(1, 2)

    def pack(self, t: torch.Tensor, batch: int, q_len: int) -> torch.Tensor:
        """The inverse of `unpack`, zeros at padding. (rows, heads, length, head_dim) -> (batch, heads, q_len,
        head_dim)"""
        rows, heads, length, head_dim = t.shape
        flat = t.transpose(1, 2).reshape(rows * length, heads, head_dim).index_select(0, self.slots)
        packed = flat.new_zeros(batch * q_len, heads, head_dim).index_copy(0, self.tokens, flat)
        return packed.view(batch, q_len, heads, head_dim).transpose(1, 2)


def key_ranges(attention_mask: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The range [start, end) of real keys per row of a (batch, kv_len) padding mask, or None where unpadded.

    Raises where the real tokens of a row are not one contiguous run (a hole: padding between real tokens), which a
    range cannot describe.
    """
    mask = attention_mask.bool()
    kv_len = mask.shape[1]
    # int32, the Triton kernels' own type: bounds of that type go to them as they are, with no cast per layer.
    positions = torch.arange(kv_len, device=mask.device, dtype=torch.int32)
    start = torch.where(mask, positions, kv_len).amin(dim=1)
    end = torch.where(mask, positions + 1, 0).amax(dim=1)
    holes = ((end - start).clamp(min=0) != mask.sum(dim=1)).nonzero()
    if len(holes):
        raise ValueError(
            f"attention_mask has padding between real tokens (row {int(holes[0])}): attn_impl='triton' masks one range "
            "of keys per sequence, so it takes left or right padding only; attn_impl='torch' takes any mask"
        )
    start = None if bool((start == 0).all()) else start
    end = None if bool((end == kv_len).all()) else end
    return start, end


def alibi_bias_table(slopes: torch.Tensor, length: int) -> torch.Tensor:
    """slope * (j - (length - 1)) for the keys j in [0, length): the ALiBi bias of a query at position length - 1.
    (heads, length) float32.

    A decoded token is the last position, so the bias of a decode step over kv_len keys is the last kv_len columns
    of this table (the same products): the model builds the table once and slices it at every step instead of
    recomputing the bias per token.
    """
    distance = torch.arange(1 - length, 1, dtype=torch.float32, device=slopes.device)
    return slopes.view(-1, 1) * distance


def additive_bias(
    mask: AttentionMask,
    attention_mask: torch.Tensor | None,
    dtype: torch.dtype,
    alibi_table: torch.Tensor,
    sequences: torch.Tensor | None = None,
) -> torch.Tensor:
    """ALiBi bias plus masking as one additive tensor, for the sdpa and eager backends; alibi_table from
    `alibi_bias_table` with at least kv_len columns; `sequences` (batch or 1, kv_len), where sequences are packed
    into one row, the sequence of each token (no past then): a query sees the keys of its own only, and within one
    the distance of two tokens in the row is the distance of their positions, so the bias stays the row's.
    (batch or 1, heads, q_len or 1, kv_len)

    The bias of query i and key j is slope * (j - i), relative to the query: small and exactly rounded near the
    diagonal, where the attention mass is, in any dtype. (MPT writes it as slope * (j - (kv_len - 1)), which
    differs per query row by a constant that softmax ignores, but it adds that in float32: in bfloat16 the early
    rows' diagonal values, about -slope * kv_len, would keep only 8 bits of precision.)
    """
    hidden = None  # (batch or 1, 1, q_len or 1, kv_len), True where a key is hidden
    if mask.q_len == 1:  # a decode step: the table's last columns, and no causal mask (the token sees every key)
        bias = alibi_table[:, alibi_table.shape[1] - mask.kv_len :].to(dtype).view(1, -1, 1, mask.kv_len)
    else:
        key_pos = torch.arange(mask.kv_len, device=mask.slopes.device)
        query_pos = torch.arange(mask.kv_len - mask.q_len, mask.kv_len, device=mask.slopes.device)
        distance = (key_pos.view(1, -1) - query_pos.view(-1, 1)).float()  # (q_len, kv_len): j - i
        heads = len(mask.slopes)
        bias = torch.empty(1, heads, mask.q_len, mask.kv_len, dtype=dtype, device=distance.device)
        # One head at a time, rounded to dtype as it is written: no (heads, q_len, kv_len) float32 temporary
        # (512 MB for a 2048-token prompt of the real model), in 25-40% of the time.
        for head, slope in enumerate(mask.slopes.tolist()):
            torch.mul(distance, slope, out=bias[0, head])
        causal = (distance > 0).view(1, 1, mask.q_len, mask.kv_len)
        if sequences is not None:  # (batch or 1, 1, q_len, kv_len)
            causal = causal | (sequences[:, None, :, None] != sequences[:, None, None, :])
        elif attention_mask is None:  # in place: bias is this call's own (a decode step's may be the table itself)
            return bias.masked_fill_(causal, torch.finfo(dtype).min)
        hidden = causal
    if attention_mask is not None:
        padding = ~attention_mask.bool()[:, None, None, :]  # (batch, 1, 1, kv_len)
        hidden = padding if hidden is None else hidden | padding
    if hidden is None:
        return bias
    # The finite minimum rather than -inf: a query row with no visible key (a left-padding position) then gets
    # a uniform softmax instead of NaNs, and its output is never used.
    return bias.masked_fill(hidden, torch.finfo(dtype).min)


PROMPT_BLOCK = 128
"""Queries per call of SDPA for a long prompt on the CPU (see `sdpa_attention`)."""


def attends_in_blocks(q_len: int, device: torch.device) -> bool:
    """Whether `sdpa_attention` takes these queries in blocks of PROMPT_BLOCK."""
    return device.type == "cpu" and q_len > PROMPT_BLOCK


def sdpa_attention(q, k, v, mask: AttentionMask, softmax_scale: float, dropout_p: float, output_attentions: bool):
    """q: (batch, heads, q_len, head_dim); k, v: (batch, heads, kv_len, head_dim). Returns (output, weights or None).
    scaled_dot_product_attention never forms the weights: asked for them, the eager computation runs instead.

    On the CPU, SDPA's fused kernel computes every (query, key) pair of an additive mask, the hidden half of a
    prompt's square included; a prompt longer than PROMPT_BLOCK goes in blocks of queries, each with the keys up to
    its last query only: 28-41% less time for 512 to 2048 tokens (docs/cpu.md). The keys left out are hidden from
    every query of the block, so each real query's result is the same sum less terms that were exactly 0."""
    if output_attentions:
        return eager_attention(q, k, v, mask, softmax_scale, dropout_p, output_attentions)
    q_len = q.shape[2]
    if not attends_in_blocks(q_len, q.device):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.additive, dropout_p=dropout_p, scale=softmax_scale)
        return out, None
    past = mask.kv_len - q_len
    blocks = []
    for start in range(0, q_len, PROMPT_BLOCK):
        end = min(start + PROMPT_BLOCK, q_len)
        seen = past + end  # the keys up to the block's last query
        bias = mask.additive[:, :, start:end, :seen]
        if mask.padding is not None:  # (batch, heads, block, seen): the padded batch's mask, one block of it
            bias = bias.masked_fill(mask.padding[..., :seen], torch.finfo(bias.dtype).min)
        out = F.scaled_dot_product_attention(
            q[:, :, start:end], k[:, :, :seen], v[:, :, :seen], attn_mask=bias, dropout_p=dropout_p, scale=softmax_scale
        )
        blocks.append(out)
    return torch.cat(blocks, dim=2), None


def eager_attention(q, k, v, mask: AttentionMask, softmax_scale: float, dropout_p: float, output_attentions: bool):
    """The explicit computation: scores, softmax in float32, weighted sum. Shapes as `sdpa_attention`."""
    # In float32: the hidden keys' bias is the dtype's minimum, and in float16 any score below about -16 added to
    # it would overflow to -inf, turning a row with every key hidden (left padding) into NaNs.
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * softmax_scale + mask.additive
    weights = torch.softmax(scores, dim=-1).to(q.dtype)
    out = torch.matmul(F.dropout(weights, p=dropout_p), v)
    return out, weights if output_attentions else None


def triton_attention(q, k, v, mask: AttentionMask, softmax_scale: float, dropout_p: float, output_attentions: bool):
    if output_attentions:
        raise ValueError("output_attentions=True needs attn_impl='torch': the triton kernel never forms the weights")
    out = flash_attn_alibi(q, k, v, mask.slopes, mask.kv_start, mask.kv_end, softmax_scale, dropout_p)
    return out, None


def native_decode_attention(q, k, v, mask: AttentionMask, softmax_scale: float, dropout_p: float, output_attentions):
    """One query per sequence through the native kernel; `mask.additive` float32, dropout_p 0, output_attentions
    False (`native_decode_pays` checks both). Shapes as `sdpa_attention`."""
    if not q.dtype == k.dtype == v.dtype:  # a cache kept in another dtype than the model's
        sdpa = replace(mask, additive=mask.additive.to(q.dtype))
        return sdpa_attention(q, k.to(q.dtype), v.to(q.dtype), sdpa, softmax_scale, dropout_p, output_attentions)
    batch, heads, _, head_dim = q.shape
    q, k, v, bias = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, mask.additive))
    if k.stride() != v.stride():  # the kernel takes one set of strides for both
        k, v = k.contiguous(), v.contiguous()
    out = torch.empty(batch, 1, heads, head_dim, dtype=q.dtype).transpose(1, 2)  # contiguous once transposed back

    def strides(t: torch.Tensor, count: int):  # a dimension of size 1 is broadcast: stride 0
        return (ctypes.c_int64 * count)(*(t.stride(i) if t.shape[i] > 1 else 0 for i in range(count)))

    k_strides = (ctypes.c_int64 * 3)(*k.stride()[:3])
    done = native_kernels().decode_attention(
        q.data_ptr(), strides(q, 2), k.data_ptr(), v.data_ptr(), k_strides, bias.data_ptr(), strides(bias, 2),
        out.data_ptr(), strides(out, 2), batch, heads, mask.kv_len, head_dim, softmax_scale,
        int(q.dtype == torch.bfloat16), torch.get_num_threads(),
    )  # fmt: skip
    if not done:
        raise MemoryError(f"decode_attention failed: no memory for {mask.kv_len} scores, or head_dim {head_dim} > 256")
    return out, None


ATTENTION_BACKENDS = {
    "sdpa": sdpa_attention,
    "eager": eager_attention,
    "triton": triton_attention,
    "native_decode": native_decode_attention,
}

DECODE_TIMING_KEYS = 512
"""Cached keys over which `native_decode_is_faster` times the native kernel against SDPA."""
DECODE_TIMING_REPEATS = 5


def native_decode_pays(x: torch.Tensor, n_heads: int, output_attentions: bool, dropout_p: float) -> bool:
    """Whether the layers of a pass over x (batch, new tokens, d_model) that would take "sdpa" take "native_decode":
    one new token per sequence, on the CPU, in bfloat16 or float32, with no gradient and no attention dropout (a
    model in training mode keeps it under no_grad too), no autocast and no attention weights asked for, where the
    native kernel is built and `native_decode_is_faster` here."""
    return (
        x.shape[1] == 1
        and x.device.type == "cpu"
        and x.dtype in (torch.bfloat16, torch.float32)
        and not torch.is_grad_enabled()
        and dropout_p == 0
        and not torch.is_autocast_enabled("cpu")
        and not output_attentions
        and native_decode_is_faster(n_heads, x.shape[-1] // n_heads, x.dtype, torch.get_num_threads())
    )


@functools.cache
def native_decode_is_faster(n_heads: int, head_dim: int, dtype: torch.dtype, threads: int) -> bool:
    """Whether the native one-query kernel beats SDPA on this machine: both timed once per process and shape, on
    random queries over DECODE_TIMING_KEYS cached keys, the best of DECODE_TIMING_REPEATS calls each (about 10 ms).
    False where the kernel is not built (no C compiler, neither AVX2 nor AVX512, REPLIT_LM_NATIVE=off) or fails."""
    kernels = native_kernels()
    if kernels is None or not kernels.decode_attention_available():
        return False
    generator = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(1, n_heads, n, head_dim, generator=generator).to(dtype)
        for n in (1, DECODE_TIMING_KEYS, DECODE_TIMING_KEYS)
    )
    slopes = alibi_slopes(n_heads)
    native = AttentionMask(q_len=1, kv_len=DECODE_TIMING_KEYS, slopes=slopes, backend="native_decode")
    native.additive = alibi_bias_table(slopes, DECODE_TIMING_KEYS).view(1, n_heads, 1, -1)
    sdpa = AttentionMask(q_len=1, kv_len=DECODE_TIMING_KEYS, slopes=slopes, additive=native.additive.to(dtype))
    scale = head_dim**-0.5
    try:
        native_seconds = time_call(
            lambda q: native_decode_attention(q, k, v, native, scale, 0.0, False), q, DECODE_TIMING_REPEATS
        )
    except (MemoryError, RuntimeError):
        return False
    return native_seconds < time_call(
        lambda q: sdpa_attention(q, k, v, sdpa, scale, 0.0, False), q, DECODE_TIMING_REPEATS
    )


def attention_backend(config) -> str:
    """The key of ATTENTION_BACKENDS that a ReplitLMConfig selects: "triton" where attn_impl='triton' (the card's
    switch), else transformers' attn_implementation of the torch path, "eager" or "sdpa" (also where unset)."""
    if config.attn_impl == "triton":
        return "triton"
    return "eager" if config._attn_implementation == "eager" else "sdpa"
