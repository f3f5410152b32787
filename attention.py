"""ALiBi and the attention backends of ReplitLM.

Every backend computes, per head h, causal attention with the ALiBi bias

    softmax(scale * q.k_j + slope_h * (j - i)) . v      over the keys j that query position i may see,

with the causal diagonal aligned bottom-right so that q_len < kv_len (decoding against a KV cache) works.
The model prepares the masking once per forward pass as an `AttentionMask` and every layer hands it to the
backend of ATTENTION_BACKENDS that `attention_backend(config)` names:
    "sdpa"    PyTorch's scaled_dot_product_attention (attn_impl='torch', transformers' default attn_implementation);
    "eager"   the explicit matmul + softmax (attn_impl='torch' with attn_implementation='eager');
    "triton"  the FlashAttention kernel of triton_flash_attn.py, which builds no (q_len x kv_len) tensor at all
              (attn_impl='triton').
"sdpa" and "eager" take any 0/1 attention mask; "triton" masks a range of keys per sequence (left or right padding).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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
    kv_start, kv_end: (batch,) int64, the keys [kv_start, kv_end) are real tokens, or None where all are; built for
        the triton backend only.
    additive: (batch or 1, heads, q_len or 1, kv_len) float, ALiBi bias plus a large negative number where a key
        is hidden; built for the sdpa and eager backends only (the triton kernel derives all of it from the slopes
        and ranges).
    cache_position: (q_len,) int64, the positions of the new tokens, where a preallocated cache stores their keys.
    """

    q_len: int
    kv_len: int
    slopes: torch.Tensor
    backend: str = "sdpa"
    kv_start: torch.Tensor | None = None
    kv_end: torch.Tensor | None = None
    additive: torch.Tensor | None = None
    cache_position: torch.Tensor | None = None


def key_ranges(attention_mask: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The range [start, end) of real keys per row of a (batch, kv_len) padding mask, or None where unpadded.

    Raises where the real tokens of a row are not one contiguous run (a hole: padding between real tokens), which a
    range cannot describe.
    """
    mask = attention_mask.bool()
    kv_len = mask.shape[1]
    positions = torch.arange(kv_len, device=mask.device)
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
    mask: AttentionMask, attention_mask: torch.Tensor | None, dtype: torch.dtype, alibi_table: torch.Tensor
) -> torch.Tensor:
    """ALiBi bias plus masking as one additive tensor, for the sdpa and eager backends; alibi_table from `alibi_bias_table`
    with at least kv_len columns. (batch or 1, heads, q_len or 1, kv_len)

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
        bias = (mask.slopes.view(-1, 1, 1) * distance).to(dtype).unsqueeze(0)  # (1, heads, q_len, kv_len)
        hidden = (distance > 0).view(1, 1, mask.q_len, mask.kv_len)  # causal
    if attention_mask is not None:
        padding = ~attention_mask.bool()[:, None, None, :]  # (batch, 1, 1, kv_len)
        hidden = padding if hidden is None else hidden | padding
    if hidden is None:
        return bias
    # The finite minimum rather than -inf: a query row with no visible key (a left-padding position) then gets
    # a uniform softmax instead of NaNs, and its output is never used.
    return bias.masked_fill(hidden, torch.finfo(dtype).min)


def sdpa_attention(q, k, v, mask: AttentionMask, softmax_scale: float, dropout_p: float, output_attentions: bool):
    """q: (batch, heads, q_len, head_dim); k, v: (batch, heads, kv_len, head_dim). Returns (output, weights or None).
    scaled_dot_product_attention never forms the weights: asked for them, the eager computation runs instead."""
    if output_attentions:
        return eager_attention(q, k, v, mask, softmax_scale, dropout_p, output_attentions)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.additive, dropout_p=dropout_p, scale=softmax_scale)
    return out, None


def eager_attention(q, k, v, mask: AttentionMask, softmax_scale: float, dropout_p: float, output_attentions: bool):
    """The explicit computation: scores, softmax in float32, weighted sum. Shapes as `sdpa_attention`."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * softmax_scale + mask.additive
    weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    out = torch.matmul(F.dropout(weights, p=dropout_p), v)
    return out, weights if output_attentions else None


def triton_attention(q, k, v, mask: AttentionMask, softmax_scale: float, dropout_p: float, output_attentions: bool):
    if output_attentions:
        raise ValueError("output_attentions=True needs attn_impl='torch': the triton kernel never forms the weights")
    out = flash_attn_alibi(q, k, v, mask.slopes, mask.kv_start, mask.kv_end, softmax_scale, dropout_p)
    return out, None


ATTENTION_BACKENDS = {"sdpa": sdpa_attention, "eager": eager_attention, "triton": triton_attention}


def attention_backend(config) -> str:
    """The key of ATTENTION_BACKENDS that a ReplitLMConfig selects: "triton" where attn_impl='triton' (the card's
    switch), else transformers' attn_implementation of the torch path, "eager" or "sdpa" (also where unset)."""
    if config.attn_impl == "triton":
        return "triton"
    return "eager" if config._attn_implementation == "eager" else "sdpa"
