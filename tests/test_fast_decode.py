"""The CPU inference path: the preallocated generation cache, masks built once, logits only where generate needs
them, a long prompt's attention in blocks of queries, the native one-query attention kernel (the Linear layers' kernel routes are tested in test_quantization.py). Each
fast path is checked against the float32 MptForCausalLM reference, float64 math, or the plain path it replaces;
nothing here times anything (the choice of the attention kernel is tested with fake timings)."""

from dataclasses import replace
from unittest import mock

import pytest
import torch
from model_helpers import VOCAB, model_pair, replit_config
from transformers import DynamicCache, GenerationConfig, GenerationMixin, StaticCache

from replit_lm import attention
from replit_lm.attention import AttentionMask, additive_bias, alibi_bias_table, alibi_slopes
from replit_lm.modeling_replit_lm import CACHE_FIELD, ReplitLM

ATOL = 1e-4
NATIVE_DECODE = attention.native_kernels() is not None and bool(attention.native_kernels().decode_attention_available())


@pytest.fixture(params=["sdpa", "native_decode"])
def decode_backend(request, monkeypatch):
    """Decoding steps through SDPA, then through the native kernel whatever the timing here; yields the list of
    the native kernel's calls, so that a test can check it ran."""
    if request.param == "native_decode" and not NATIVE_DECODE:
        pytest.skip("the native decode attention needs a C compiler and AVX2 or AVX512")
    monkeypatch.setattr(attention, "native_decode_is_faster", lambda *shape: request.param == "native_decode")
    calls = []
    kernel = attention.ATTENTION_BACKENDS["native_decode"]
    monkeypatch.setitem(attention.ATTENTION_BACKENDS, "native_decode", lambda *args: calls.append(1) or kernel(*args))
    yield calls
    assert bool(calls) == (request.param == "native_decode")


def random_ids(batch, length, seed):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def left_padded(lengths, total, seed):
    ids = random_ids(len(lengths), total, seed)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, total - n :] = 1
    return ids.masked_fill(mask == 0, 2), mask


@pytest.mark.parametrize("q_len,kv_len", [(1, 1), (1, 9), (4, 9), (9, 9)])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_additive_bias_is_the_direct_formula(q_len, kv_len, padded, dtype):
    """The bias is slope * (j - i) exactly (in float32, then rounded to dtype), for query i at position
    kv_len - q_len + i, masked; for a decode step it is sliced from the table built once."""
    slopes = alibi_slopes(6)
    mask = AttentionMask(q_len=q_len, kv_len=kv_len, slopes=slopes)
    padding = torch.ones(2, kv_len, dtype=torch.long)
    if padded:
        padding[1, :3] = 0
    got = additive_bias(mask, padding if padded else None, dtype, alibi_bias_table(slopes, 32))
    key = torch.arange(kv_len)
    query = torch.arange(kv_len - q_len, kv_len)
    expected = slopes.view(1, -1, 1, 1) * (key.view(1, -1) - query.view(-1, 1)).view(1, 1, q_len, kv_len)
    hidden = (key.view(1, -1) > query.view(-1, 1)).view(1, 1, q_len, kv_len)
    if padded:
        hidden = hidden | (padding == 0)[:, None, None, :]
    expected = expected.to(dtype).expand(hidden.shape[0], -1, q_len, -1).masked_fill(hidden, torch.finfo(dtype).min)
    assert got.dtype == dtype and torch.equal(got.expand_as(expected), expected)


def test_decode_step_bias_is_one_row_per_head_and_a_view_of_the_table():
    model, _ = model_pair("six_heads")
    x = torch.zeros(3, 1, model.config.d_model)
    mask = model.transformer._attention_mask(x, 20, None, output_attentions=False)
    assert mask.additive.shape == (1, model.config.n_heads, 1, 21)
    table = model.transformer._alibi
    assert mask.additive.untyped_storage().data_ptr() == table.untyped_storage().data_ptr()  # nothing built


@pytest.mark.parametrize("name", ["pow2_heads", "six_heads"])
@torch.no_grad()
def test_static_cache_decoding_equals_full_forward(name, decode_backend):
    """A preallocated cache, filled by a prompt and then one token at a time, as generate drives it."""
    model, _ = model_pair(name)
    ids, mask = left_padded([15, 9], 15, seed=3)
    full = model(ids, attention_mask=mask).logits
    cache = StaticCache(config=model.config, max_cache_len=20)
    out = model(ids[:, :8], attention_mask=mask[:, :8], past_key_values=cache, use_cache=True)
    pieces = [out.logits]
    for t in range(8, 15):
        out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache, use_cache=True)
        pieces.append(out.logits)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(pieces, dim=1)[real], full[real], atol=ATOL, rtol=0)


def test_generate_defaults_to_a_static_cache_and_matches_the_reference(decode_backend):
    model, ref = model_pair("six_heads")
    ids, mask = left_padded([10, 6, 4], 10, seed=11)
    caches = []
    original_forward = model.forward

    def spy(*args, **kwargs):
        caches.append(kwargs.get("cache", kwargs.get("past_key_values")))
        return original_forward(*args, **kwargs)

    model.forward = spy
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=2, eos_token_id=None)
    ours = model.generate(ids, **kwargs)
    assert isinstance(caches[0], StaticCache)
    assert torch.equal(ours, ref.generate(ids, **kwargs))
    # A cache the caller passes is used as given.
    caches.clear()
    dynamic = model.generate(ids, **{CACHE_FIELD: DynamicCache()}, **kwargs)
    assert type(caches[0]) is DynamicCache and torch.equal(dynamic, ours)
    # So does a generation_config (what generate.py passes): the static cache goes into a copy of it, not into a
    # separate argument, which transformers 5 warns about when it comes with a generation_config.
    caches.clear()
    config = GenerationConfig(max_new_tokens=12, do_sample=False, pad_token_id=2, eos_token_id=None)
    passed = []
    original_generate = GenerationMixin.generate

    def record(self, *args, **generate_kwargs):
        passed.append(generate_kwargs)
        return original_generate(self, *args, **generate_kwargs)

    with mock.patch.object(GenerationMixin, "generate", record):
        configured = model.generate(ids, attention_mask=mask, generation_config=config)
    assert isinstance(caches[0], StaticCache) and torch.equal(configured, ours)
    assert "cache_implementation" not in passed[0] and passed[0]["generation_config"].cache_implementation == "static"
    assert config.cache_implementation is None  # the caller's object is left alone


@pytest.mark.parametrize("mode", [dict(num_beams=3), dict(do_sample=True, top_k=10, num_return_sequences=2)])
def test_beam_search_and_sampling_with_the_static_cache_match_the_reference(mode, decode_backend):
    model, ref = model_pair("pow2_heads")
    ids, mask = left_padded([6, 4], 6, seed=12)
    results = []
    for m in (model, ref):
        torch.manual_seed(99)
        kwargs = dict(attention_mask=mask, max_new_tokens=8, pad_token_id=2, eos_token_id=None)
        results.append(m.generate(ids, **kwargs, **mode))
    assert torch.equal(*results)


def test_prefill_in_generate_computes_only_the_last_logits():
    model, _ = model_pair("pow2_heads")
    rows = []
    model.lm_head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[1]))
    model.generate(random_ids(2, 9, seed=1), max_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=2)
    assert rows == [1, 1, 1]


def test_bfloat16_long_prompt_is_as_accurate_as_the_reference():
    """Over 512 tokens the ALiBi bias spans hundreds: in bfloat16, ours stays as close to float32 (the truth) as
    MptForCausalLM in bfloat16, which adds its bias in float32. With the bias in MPT's key-only form rounded to
    bfloat16 the error was 12% against the reference's 0.8%. MPT's own initialisation (std 0.02) leaves attention
    spread over many keys, where such errors show."""
    shape = dict(d_model=256, n_heads=8, n_layers=2, max_seq_len=1024, vocab_size=512)
    ours, ref = model_pair(spread_weights=False, **shape)
    ids = torch.randint(3, 512, (2, 512), generator=torch.Generator().manual_seed(31))
    truth = ours(ids).logits
    errors = []
    for model in (ours.to(torch.bfloat16), ref.to(torch.bfloat16)):
        got = model(ids).logits.float()
        errors.append(((got - truth).norm() / truth.norm()).item())
    assert errors[0] <= 1.25 * errors[1], errors


@pytest.mark.parametrize("batch_lengths", [[7], [7, 4, 2]])
def test_bfloat16_generation_is_as_accurate_as_the_reference(batch_lengths, decode_backend):
    """bfloat16 through the fast routes and the static cache, against MptForCausalLM in bfloat16: the first
    generated token's logits (float32 as truth) are as close as the reference's, and greedy decoding of each row
    agrees with that row decoded alone."""
    ours, ref = model_pair("pow2_heads")
    ids, mask = left_padded(batch_lengths, 7, seed=21)
    real = mask.bool()
    truth = ours(ids, attention_mask=mask).logits[real]
    errors = []
    for model in (ours.to(torch.bfloat16), ref.to(torch.bfloat16)):
        got = model(ids, attention_mask=mask).logits[real].float()
        errors.append(((got - truth).norm() / truth.norm()).item())
    assert errors[0] <= 1.25 * errors[1] and errors[0] < 0.05, errors
    generated = ours.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None)
    for row, n in enumerate(batch_lengths):
        alone = ours.generate(ids[row : row + 1, 7 - n :], max_new_tokens=6, do_sample=False, eos_token_id=None)
        assert torch.equal(alone[0, n:], generated[row, 7:])


@pytest.mark.parametrize("main_is_reference", [False, True])
def test_replit_lm_as_the_assistant_model_of_assisted_decoding(main_is_reference):
    """As the draft model, ReplitLM's generate runs once per drafting round on the cache of the last round: it keeps
    the dynamic cache that assisted decoding rolls back, and greedy assisted decoding gives greedy decoding's tokens."""
    model, ref = model_pair("pow2_heads")
    main = ref if main_is_reference else model
    ids = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(40))
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=2, eos_token_id=None)
    expected = main.generate(ids, **kwargs)
    # A different draft model, so that some drafted tokens are rejected and its cache is cropped.
    assistant = ReplitLM(replit_config(n_layers=1)).eval()
    assistant.generation_config.num_assistant_tokens = 3
    assistant.generation_config.num_assistant_tokens_schedule = "constant"
    assert torch.equal(main.generate(ids, assistant_model=assistant, **kwargs), expected)


def one_query_case(dtype, head_dim, batch, kv_len, seed):
    """Random q, and k, v as a preallocated cache hands them over (the first kv_len positions of a longer buffer),
    with the last row left-padded, and its float32 ALiBi-and-padding bias. The buffers hold float32 values
    rounded to dtype, so that float64 math on them is the exact answer."""
    generator = torch.Generator().manual_seed(seed)
    heads = 6
    q = torch.randn(batch, heads, 1, head_dim, generator=generator).to(dtype)
    k, v = (torch.randn(batch, heads, kv_len + 7, head_dim, generator=generator).to(dtype) for _ in range(2))
    k, v = k[:, :, :kv_len], v[:, :, :kv_len]
    padding = torch.ones(batch, kv_len, dtype=torch.long)
    padding[-1, : kv_len // 3] = 0
    mask = AttentionMask(q_len=1, kv_len=kv_len, slopes=alibi_slopes(heads), backend="native_decode")
    mask.additive = additive_bias(
        mask, padding if batch > 1 else None, torch.float32, alibi_bias_table(mask.slopes, 64)
    )
    return q, k, v, mask


@pytest.fixture(params=["this CPU's build", "AVX2 build"])
def decode_kernels(request, monkeypatch):
    if request.param == "AVX2 build":
        avx2 = request.getfixturevalue("avx2_native_kernels")
        if not avx2.decode_attention_available():
            pytest.skip("this CPU has no AVX2 with FMA")
        monkeypatch.setattr(attention, "native_kernels", lambda: avx2)
    elif not NATIVE_DECODE:
        pytest.skip("the native decode attention needs a C compiler and AVX2 or AVX512")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [80, 16, 20, 8])  # the real model's, and a whole, a partial, a lone tail vector
@pytest.mark.parametrize("batch,kv_len", [(1, 1), (1, 64), (3, 37)])
def test_native_decode_attention_is_the_float64_result(decode_kernels, dtype, head_dim, batch, kv_len):
    """Within float32's rounding, and in bfloat16 within the rounding of the output to bfloat16 (2^-9 of it), of
    the eager formula in float64 on the same inputs; padded keys get no weight. With AVX512 (16 lanes) where the CPU
    has it, and AVX2 (8 lanes)."""
    q, k, v, mask = one_query_case(dtype, head_dim, batch, kv_len, seed=head_dim * kv_len + batch)
    scale = head_dim**-0.5
    out, weights = attention.native_decode_attention(q, k, v, mask, scale, 0.0, False)
    exact = replace_additive(mask, mask.additive.double())
    expected, _ = attention.eager_attention(q.double(), k.double(), v.double(), exact, scale, 0.0, False)
    assert weights is None and out.dtype == dtype and out.shape == q.shape
    tolerance = dict(rtol=2**-8, atol=1e-6) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.double(), expected, **tolerance)


def replace_additive(mask, additive):
    return AttentionMask(q_len=mask.q_len, kv_len=mask.kv_len, slopes=mask.slopes, additive=additive)


@pytest.mark.skipif(not NATIVE_DECODE, reason="the native decode attention needs a C compiler and AVX2 or AVX512")
def test_native_decode_attention_takes_a_cache_of_another_dtype_through_sdpa():
    q, k, v, mask = one_query_case(torch.float32, 16, 3, 20, seed=5)
    out, _ = attention.native_decode_attention(q, k.bfloat16(), v.bfloat16(), mask, 0.25, 0.0, False)
    expected, _ = attention.eager_attention(q, k.bfloat16().float(), v.bfloat16().float(), mask, 0.25, 0.0, False)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["faster", "slower", "not built", "failing"])
def test_the_decode_kernel_is_taken_only_where_timed_faster(monkeypatch, case):
    """Given fake timings (SDPA 2 ms, the kernel 1 or 3 ms), the native kernel is chosen exactly when faster; where
    it is not built, or fails, SDPA stays."""
    if not NATIVE_DECODE:
        pytest.skip("the native decode attention needs a C compiler and AVX2 or AVX512")
    timed = []

    def fake_time(function, x, repeats):
        function(x)  # both really run: a failing kernel raises here
        timed.append(function)
        return {"faster": 0.001, "slower": 0.003}.get(case, 0.0) if len(timed) == 1 else 0.002

    def failing(*args):
        raise MemoryError("decode_attention: no memory for the scores")

    monkeypatch.setattr(attention, "time_call", fake_time)
    if case == "not built":
        monkeypatch.setattr(attention, "native_kernels", lambda: None)
    if case == "failing":
        monkeypatch.setattr(attention, "native_decode_attention", failing)
    attention.native_decode_is_faster.cache_clear()
    try:
        assert attention.native_decode_is_faster(4, 16, torch.bfloat16, 1) is (case == "faster")
        assert len(timed) == (2 if case in ("faster", "slower") else 0)
    finally:
        attention.native_decode_is_faster.cache_clear()


@pytest.mark.parametrize(
    "case",
    ["decode", "prompt", "gradient", "attention weights", "float16", "autocast", "triton", "eager", "dropout",
     "train mode without dropout"],
)
def test_only_inference_decode_steps_of_the_sdpa_path_take_the_native_kernel(monkeypatch, case):
    """The kernel has no dropout: a model in training mode with attn_pdrop > 0 keeps SDPA's under no_grad too."""
    monkeypatch.setattr(attention, "native_decode_is_faster", lambda *shape: True)
    model, _ = model_pair("pow2_heads")
    if case in ("dropout", "train mode without dropout"):
        model.config.attn_pdrop = 0.1 if case == "dropout" else 0.0
        model.train()
    if case == "triton":
        model.config.attn_impl = "triton"
    if case == "eager":
        model.set_attn_implementation("eager")
    dtype = torch.float16 if case == "float16" else torch.float32
    x = torch.zeros(2, 3 if case == "prompt" else 1, model.config.d_model, dtype=dtype)
    with torch.set_grad_enabled(case == "gradient"), torch.autocast("cpu", enabled=case == "autocast"):
        mask = model.transformer._attention_mask(x, 5, None, output_attentions=case == "attention weights")
    assert (mask.backend == "native_decode") == (case in ("decode", "train mode without dropout"))
    if case == "decode":
        assert mask.additive.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_prompt_attention_in_blocks_is_the_float64_result(dtype):
    """A prompt longer than PROMPT_BLOCK, left-padded, after a few cached tokens: every real query's output is the
    eager formula's in float64, within float32's rounding, and in bfloat16 as close as one SDPA call over the whole
    square (SDPA rounds its scores and weights to bfloat16: up to 8e-3 here)."""
    generator = torch.Generator().manual_seed(8)
    heads, head_dim, past, q_len = 4, 16, 3, 2 * attention.PROMPT_BLOCK + 37
    kv_len = past + q_len
    q = torch.randn(2, heads, q_len, head_dim, generator=generator).to(dtype)
    k, v = (torch.randn(2, heads, kv_len, head_dim, generator=generator).to(dtype) for _ in range(2))
    padding = torch.ones(2, kv_len, dtype=torch.long)
    padding[1, :50] = 0
    mask = AttentionMask(q_len=q_len, kv_len=kv_len, slopes=alibi_slopes(heads))
    mask.additive = additive_bias(mask, padding, dtype, alibi_bias_table(mask.slopes, kv_len))
    out, _ = attention.sdpa_attention(q, k, v, mask, 0.25, 0.0, False)
    # The padding left to the blocks (as the model does for a padded prompt): the same mask, one block at a time.
    causal = additive_bias(mask, None, dtype, alibi_bias_table(mask.slopes, kv_len))
    blocks = replace(mask, additive=causal, padding=(padding == 0)[:, None, None, :])
    assert torch.equal(attention.sdpa_attention(q, k, v, blocks, 0.25, 0.0, False)[0], out)
    exact = replace_additive(
        mask, additive_bias(mask, padding, torch.float64, alibi_bias_table(mask.slopes, kv_len).double())
    )
    expected, _ = attention.eager_attention(q.double(), k.double(), v.double(), exact, 0.25, 0.0, False)
    real = padding[:, past:].bool()  # (batch, q_len): the real queries
    got, expected = out.transpose(1, 2)[real].double(), expected.transpose(1, 2)[real]
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    else:
        whole = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask.additive, scale=0.25)
        whole_error = (whole.transpose(1, 2)[real].double() - expected).abs().max()
        error = (got - expected).abs().max()
        assert error <= 1.5 * whole_error and error < 2e-2, (error, whole_error)


@torch.no_grad()
def test_model_with_prompt_blocks_matches_the_reference(monkeypatch):
    """Blocks of 5 queries, so that the tiny model's prompts go in blocks: the logits of a padded batch and of a
    prompt continued against a cache are MptForCausalLM's."""
    monkeypatch.setattr(attention, "PROMPT_BLOCK", 5)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    model, ref = model_pair("six_heads")
    ids, mask = left_padded([17, 11], 17, seed=6)
    real = mask.bool()
    torch.testing.assert_close(
        model(ids, attention_mask=mask).logits[real], ref(ids, attention_mask=mask).logits[real], atol=ATOL, rtol=0
    )
    # The padding is left to the blocks: the pass's mask is one (heads, q_len, kv_len) bias, not one per sequence.
    x = torch.zeros(2, 17, model.config.d_model)
    built = model.transformer._attention_mask(x, 0, mask, output_attentions=False)
    assert built.additive.shape == (1, model.config.n_heads, 17, 17) and built.padding.shape == (2, 1, 1, 17)
    assert len(calls) == 4 * model.config.n_layers  # 17 queries: blocks of 5, 5, 5 and 2
    cache = DynamicCache()
    first = model(ids[:, :6], attention_mask=mask[:, :6], past_key_values=cache, use_cache=True).logits
    rest = model(ids[:, 6:], attention_mask=mask, past_key_values=cache, use_cache=True).logits
    expected = ref(ids, attention_mask=mask).logits
    torch.testing.assert_close(torch.cat([first, rest], dim=1)[real], expected[real], atol=ATOL, rtol=0)
