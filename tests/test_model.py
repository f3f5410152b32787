"""ReplitLM against transformers' MptForCausalLM (an independent implementation of the same math) in float32.

Tolerance: logits within 1e-4 absolute of the reference (float32, weights of std ~0.3 so that errors would show).
"""

from unittest import mock

import pytest
import torch
from model_helpers import TINY_CONFIGS, VOCAB, model_pair, replit_config
from transformers import DynamicCache, StaticCache

from replit_lm import attention
from replit_lm.attention import alibi_slopes
from replit_lm.configuration_replit_lm import ReplitLMConfig
from replit_lm.modeling_replit_lm import TRANSFORMERS_5, ReplitLM

ATOL = 1e-4


def random_ids(batch, length, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


def left_padding_mask(lengths, total):
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, total - n :] = 1
    return mask


@pytest.mark.parametrize("name", TINY_CONFIGS)
def test_logits_match_reference(name):
    model, ref = model_pair(name)
    ids = random_ids(3, 17, seed=hash(name) % 1000)
    torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("n_heads", [1, 2, 3, 5, 6, 8, 12, 32])
def test_alibi_slopes_match_mpt(n_heads):
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    # MPT's bias for key distance -1 is exactly minus the slope.
    expected = -build_mpt_alibi_tensor(n_heads, 2)[:, 0, 0]
    torch.testing.assert_close(alibi_slopes(n_heads), expected, atol=0, rtol=0)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("mask_dtype", [torch.long, torch.bool])
def test_padded_batch_matches_reference_and_single_sequences(padding_side, mask_dtype):
    model, ref = model_pair("six_heads")
    lengths, total = [12, 7, 3], 12
    ids = random_ids(3, total, seed=7)
    mask = left_padding_mask(lengths, total)
    if padding_side == "right":
        mask = mask.flip(1)
    ids = ids.masked_fill(mask == 0, 2)
    mask = mask.to(mask_dtype)
    logits = model(ids, attention_mask=mask).logits
    ref_logits = ref(ids, attention_mask=mask.long()).logits
    for row, n in enumerate(lengths):
        real = mask[row].bool()
        torch.testing.assert_close(logits[row, real], ref_logits[row, real], atol=ATOL, rtol=0)
        alone = model(ids[row : row + 1, real]).logits[0]
        torch.testing.assert_close(logits[row, real], alone, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["pow2_heads", "six_heads"])
def test_cached_decoding_equals_full_forward(name):
    model, _ = model_pair(name)
    ids = random_ids(2, 15, seed=3)
    mask = left_padding_mask([15, 9], 15)
    full = model(ids, attention_mask=mask).logits
    cache = DynamicCache()
    out = model(ids[:, :8], attention_mask=mask[:, :8], past_key_values=cache, use_cache=True)
    pieces = [out.logits]
    for t in range(8, 15):
        out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=out.past_key_values)
        pieces.append(out.logits)
    cached = torch.cat(pieces, dim=1)
    real = mask.bool()
    torch.testing.assert_close(cached[real], full[real], atol=ATOL, rtol=0)


def test_chunked_prefill_against_cache():
    model, _ = model_pair("pow2_heads")
    ids = random_ids(1, 20, seed=4)
    full = model(ids).logits
    first = model(ids[:, :11], use_cache=True)
    second = model(ids[:, 11:], past_key_values=first.past_key_values, use_cache=True)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), full, atol=ATOL, rtol=0)


def test_greedy_generate_left_padded_matches_reference():
    model, ref = model_pair("six_heads")
    ids = random_ids(3, 10, seed=11)
    mask = left_padding_mask([10, 6, 4], 10)
    ids = ids.masked_fill(mask == 0, 2)
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=2, eos_token_id=None)
    ours = model.generate(ids, **kwargs)
    theirs = ref.generate(ids, **kwargs)
    assert torch.equal(ours, theirs)
    # Each row generates as it would alone.
    for row, n in enumerate([10, 6, 4]):
        alone = model.generate(ids[row : row + 1, 10 - n :], max_new_tokens=12, do_sample=False, eos_token_id=None)
        assert torch.equal(alone[0, n:], ours[row, 10:])


def test_sampled_generate_matches_reference_with_seed():
    model, ref = model_pair("pow2_heads")
    ids = random_ids(2, 6, seed=12)
    mask = left_padding_mask([6, 4], 6)
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=True, top_k=20, top_p=0.95, temperature=0.8)
    torch.manual_seed(99)
    ours = model.generate(ids, pad_token_id=2, eos_token_id=None, **kwargs)
    torch.manual_seed(99)
    theirs = ref.generate(ids, pad_token_id=2, eos_token_id=None, **kwargs)
    assert torch.equal(ours, theirs)


def test_generate_uses_cache_by_default_and_without_cache_agrees():
    model, _ = model_pair("pow2_heads")
    ids = random_ids(1, 5, seed=13)
    assert model.generation_config.use_cache
    cached = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None)
    uncached = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, use_cache=False)
    assert torch.equal(cached, uncached)


def test_generation_continues_from_the_cache_it_returned():
    """Continuing from the cache of an earlier call (return_dict_in_generate) gives the tokens of one longer call, on
    either release, however short the first call's preallocated cache was; a later call leaves that cache alone
    (transformers 4.x reused it for the next call); and a call that fails does not break the next one."""
    model, _ = model_pair("pow2_heads")
    ids = random_ids(2, 7, seed=int(torch.randint(1000, ())))
    greedy = dict(do_sample=False, eos_token_id=None, pad_token_id=2)
    first = model.generate(ids, max_new_tokens=3, return_dict_in_generate=True, **greedy)
    cache = first.past_key_values
    kept = [layer.keys.clone() for layer in cache.layers]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.generate(torch.full((1, 4), VOCAB), max_new_tokens=2, **greedy)
    assert model.generate(ids[:1], max_new_tokens=4, **greedy).shape == (1, 11)
    assert all(torch.equal(layer.keys, before) for layer, before in zip(cache.layers, kept))
    more = model.generate(first.sequences, past_key_values=cache, max_new_tokens=6, **greedy)
    assert torch.equal(more, model.generate(ids, max_new_tokens=9, **greedy))


def test_loss_and_gradients_match_reference():
    model, ref = model_pair("six_heads")
    model.train(), ref.train()
    ids = random_ids(2, 9, seed=5)
    labels = ids.clone()
    labels[0, :3] = -100
    loss = model(ids, labels=labels).loss
    ref_loss = ref(ids, labels=labels).loss
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    loss.backward(), ref_loss.backward()
    ref_grads = dict(ref.named_parameters())
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, ref_grads[name].grad, atol=1e-4, rtol=1e-3, msg=name)


def test_gradient_checkpointing_gives_the_same_gradients():
    model, _ = model_pair("pow2_heads")
    model.train()
    ids = random_ids(2, 8, seed=6)

    def grads():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert all(block.gradient_checkpointing for block in model.transformer.blocks)
    checkpointed = grads()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_generating_in_training_mode_with_checkpointing_keeps_the_cache():
    """Sampling a completion inside a training loop, without model.eval(): generate runs without gradients, so
    checkpointing has nothing to replay and the cache stays (without it each token was decoded with no context).
    A training step with checkpointing still keeps no cache."""
    model, ref = model_pair("pow2_heads")
    ids = random_ids(2, 8, seed=7)
    mask = left_padding_mask([8, 5], 8)
    greedy = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=2)
    expected = ref.generate(ids, **greedy)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    assert torch.equal(model.generate(ids, **greedy), expected)
    assert torch.equal(model.generate(ids, cache_implementation="static", **greedy), expected)
    assert model(ids, attention_mask=mask, use_cache=True).past_key_values is None


def test_float16_eager_attention_keeps_left_padded_rows_finite():
    """The eager computation (output_attentions, attn_implementation="eager") adds the hidden keys' bias, the
    dtype's minimum, to the scores in float32: in float16, scores below about -16 overflowed to -inf on a padding
    row, whose NaNs then reached the real tokens through the next layer's keys. Weights scaled up so that the
    scores are large; float16 logits within 2% of float32 at every real position."""
    model, _ = model_pair("pow2_heads", n_layers=4)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and "wte" not in name:
                param.mul_(3.3)
    ids = random_ids(2, 9, seed=15)
    mask = left_padding_mask([9, 5], 9)
    real = mask.bool()
    model.set_attn_implementation("eager")
    expected = model(ids, attention_mask=mask).logits[real]
    got = model.half()(ids, attention_mask=mask, output_attentions=True)
    assert all(torch.isfinite(weights).all() for weights in got.attentions)
    error = (got.logits[real].float() - expected).norm() / expected.norm()
    assert error < 0.02, error


def test_inputs_embeds_equal_input_ids():
    model, _ = model_pair("pow2_heads")
    ids = random_ids(2, 7, seed=8)
    embeds = model.get_input_embeddings()(ids)
    torch.testing.assert_close(model(inputs_embeds=embeds).logits, model(ids).logits, atol=0, rtol=0)


def test_logits_to_keep():
    model, _ = model_pair("pow2_heads")
    ids = random_ids(2, 7, seed=9)
    full = model(ids).logits
    last = model(ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, VOCAB)
    torch.testing.assert_close(last, full[:, -1:], atol=1e-5, rtol=0)


def test_hidden_states_and_attentions_match_reference():
    model, ref = model_pair("six_heads")
    ids = random_ids(2, 6, seed=10)
    mask = left_padding_mask([6, 4], 6)
    ours = model(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    theirs = ref(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    assert len(ours.hidden_states) == len(theirs.hidden_states) == model.config.n_layers + 1
    for a, b in zip(ours.hidden_states, theirs.hidden_states):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    for a, b in zip(ours.attentions, theirs.attentions):
        real_rows = mask.bool()[:, None, :, None].expand_as(a)
        torch.testing.assert_close(a[real_rows], b[real_rows], atol=1e-5, rtol=0)
    # The weights path and the fused (SDPA) path agree.
    torch.testing.assert_close(ours.logits, model(ids, attention_mask=mask).logits, atol=ATOL, rtol=0)


def test_return_dict_false_gives_tuples():
    model, _ = model_pair("pow2_heads")
    ids = random_ids(1, 4, seed=14)
    loss, logits, cache = model(ids, labels=ids, use_cache=True, return_dict=False)
    assert loss.dim() == 0 and logits.shape == (1, 4, VOCAB) and cache.get_seq_length() == 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_on_cpu_is_as_accurate_as_the_reference(dtype):
    """bf16/fp16 weights run on the CPU (LayerNorm included). Their logits' relative error against float32
    (norm of the difference over the norm) is at most 1.25x that of MptForCausalLM in the same dtype, and under
    5% (bf16 keeps an 8-bit mantissa; these weights are large on purpose)."""
    ids = random_ids(2, 9, seed=15)
    mask = left_padding_mask([9, 5], 9)
    real = mask.bool()
    errors = []
    for model in model_pair("pow2_heads"):
        expected = model(ids, attention_mask=mask).logits[real]
        got = model.to(dtype)(ids, attention_mask=mask).logits
        assert got.dtype == dtype
        if isinstance(model, ReplitLM):  # the ALiBi slopes stay float32: 2**-0.25 is no bfloat16
            torch.testing.assert_close(model.transformer._slopes, alibi_slopes(4), atol=0, rtol=0)
        errors.append(((got[real].float() - expected).norm() / expected.norm()).item())
    ours, reference = errors
    assert ours <= 1.25 * reference and ours < 0.05, errors
    generated = model_pair("pow2_heads")[0].to(dtype).generate(
        ids, attention_mask=mask, max_new_tokens=3, do_sample=False, eos_token_id=None
    )
    assert generated.shape == (2, 12)


def test_bf16_autocast_training_step_on_cpu():
    model, _ = model_pair("pow2_heads")
    model.train()
    ids = random_ids(2, 8, seed=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and model.transformer.wte.weight.grad is not None


def random_mask_with_holes(batch, length, seed):
    """A random 0/1 mask whose rows have padding between real tokens; the last position is real in every row."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.randint(0, 2, (batch, length), generator=generator)
    mask[:, -1] = 1
    mask[:, length // 2] = 0
    return mask


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_masks_with_holes_match_reference(seed, attn_implementation):
    """The torch path takes any 0/1 mask, as MptForCausalLM does: at every real position the logits are the
    reference's, and so are the next token's against a cache filled under that mask."""
    model, ref = model_pair("six_heads")
    model.set_attn_implementation(attn_implementation)
    ids, mask = random_ids(4, 12, seed=seed), random_mask_with_holes(4, 12, seed=seed)
    real = mask.bool()
    torch.testing.assert_close(
        model(ids, attention_mask=mask).logits[real], ref(ids, attention_mask=mask).logits[real], atol=ATOL, rtol=0
    )
    cache = model(ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True).past_key_values
    step = model(ids[:, -1:], attention_mask=mask, past_key_values=cache).logits[:, 0]
    torch.testing.assert_close(step, ref(ids, attention_mask=mask).logits[:, -1], atol=ATOL, rtol=0)


def test_attn_implementation_selects_the_backend():
    """"sdpa" and "eager" are two computations of the torch path that agree; "triton" is attn_impl='triton'; other
    values are refused by name."""
    model, _ = model_pair("pow2_heads")
    ids, mask = random_ids(2, 9, seed=30), left_padding_mask([9, 5], 9)
    assert model.config._attn_implementation == "sdpa"
    sdpa = model(ids, attention_mask=mask).logits
    calls = []
    with mock.patch.dict(attention.ATTENTION_BACKENDS, eager=lambda *a: calls.append(1) or attention.eager_attention(*a)):
        model.set_attn_implementation("eager")
        eager = model(ids, attention_mask=mask).logits
    assert model.config._attn_implementation == "eager" and len(calls) == model.config.n_layers
    torch.testing.assert_close(eager, sdpa, atol=ATOL, rtol=0)
    model.set_attn_implementation("triton")
    assert model.config.attn_impl == "triton"
    model.set_attn_implementation("sdpa")
    assert (model.config.attn_impl, model.config._attn_implementation) == ("torch", "sdpa")
    with pytest.raises(ValueError, match="Flash Attention"):
        model.set_attn_implementation("flash_attention_2")
    assert model.config.attn_impl == "torch"
    config = replit_config(attn_implementation="triton")
    assert ReplitLM(config).config.attn_impl == "triton"


def test_triton_path_names_a_mask_with_holes():
    model, _ = model_pair("pow2_heads")
    model.config.attn_impl = "triton"
    with pytest.raises(ValueError, match="padding between real tokens.*attn_impl='torch'"):
        model(random_ids(1, 5, seed=0), attention_mask=torch.tensor([[1, 0, 1, 1, 1]]))


def test_loss_takes_transformers_loss_arguments():
    """shift_labels replace the shifted labels, num_items_in_batch turns the mean into a sum over that many targets,
    ignore_index is honoured, and padding positions still predict nothing."""
    model, _ = model_pair("pow2_heads")
    ids, mask = random_ids(2, 10, seed=31), left_padding_mask([10, 6], 10)
    labels = ids.masked_fill(mask == 0, -100)
    mean = model(ids, attention_mask=mask, labels=labels).loss
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    torch.testing.assert_close(model(ids, attention_mask=mask, labels=labels, shift_labels=shifted).loss, mean)
    other = torch.randint(3, VOCAB, shifted.shape, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(model(ids, attention_mask=mask, labels=labels, shift_labels=other).loss, mean)
    # num_items_in_batch as transformers' Trainer counts it: the targets of labels[:, 1:], here 9 + 6, the first real
    # token of the left-padded row among them, which a pad position would predict and the model leaves out (9 + 5);
    # transformers 4 counts the first label of the full row too (10 + 6).
    counted = (labels[:, 1:] if TRANSFORMERS_5 else labels).ne(-100).sum()
    assert counted == (9 + 6 if TRANSFORMERS_5 else 10 + 6)
    total = model(ids, attention_mask=mask, labels=labels, num_items_in_batch=2 * counted).loss
    torch.testing.assert_close(total, mean / 2)
    # Padding positions predict nothing even where their labels are real ids.
    torch.testing.assert_close(model(ids, attention_mask=mask, labels=ids).loss, mean)
    ignored = labels.masked_fill(labels == labels[0, 3], -7)
    torch.testing.assert_close(
        model(ids, attention_mask=mask, labels=ignored, ignore_index=-7).loss,
        model(ids, attention_mask=mask, labels=ignored.masked_fill(ignored == -7, -100)).loss,
    )


def test_init_follows_the_original_recipe():
    config = replit_config(d_model=256, n_heads=4, n_layers=4, vocab_size=512)
    torch.manual_seed(0)
    model = ReplitLM(config)
    block = model.transformer.blocks[0]
    kaiming = (2.0 / config.d_model) ** 0.5  # kaiming_normal_, relu gain, fan_in = d_model
    residual = kaiming / (2 * config.n_layers) ** 0.5
    assert block.attn.Wqkv.weight.std().item() == pytest.approx(kaiming, rel=0.05)
    assert block.ffn.up_proj.weight.std().item() == pytest.approx(kaiming, rel=0.05)
    assert block.attn.out_proj.weight.std().item() == pytest.approx(residual, rel=0.05)
    # down_proj's fan-in is mlp_ratio * d_model.
    down = (2.0 / (config.mlp_ratio * config.d_model)) ** 0.5 / (2 * config.n_layers) ** 0.5
    assert block.ffn.down_proj.weight.std().item() == pytest.approx(down, rel=0.05)
    assert model.transformer.wte.weight.std().item() == pytest.approx(kaiming, rel=0.05)
    assert torch.equal(block.norm_1.weight, torch.ones(config.d_model))
    assert model.lm_head.weight is model.transformer.wte.weight


def test_init_scales_the_residual_projections_whatever_the_mlp_ratio():
    """With mlp_ratio=3, up_proj has Wqkv's shape: the layers are told apart by what they are, not by shape."""
    config = replit_config(d_model=256, n_heads=4, n_layers=8, vocab_size=512, mlp_ratio=3)
    torch.manual_seed(0)
    block = ReplitLM(config).transformer.blocks[0]
    kaiming = (2.0 / config.d_model) ** 0.5
    assert block.ffn.up_proj.weight.std().item() == pytest.approx(kaiming, rel=0.05)
    down = (2.0 / (3 * config.d_model)) ** 0.5 / (2 * config.n_layers) ** 0.5
    assert block.ffn.down_proj.weight.std().item() == pytest.approx(down, rel=0.05)
    assert block.attn.out_proj.weight.std().item() == pytest.approx(kaiming / (2 * config.n_layers) ** 0.5, rel=0.05)


# --- bad input ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(d_model=50, n_heads=4), "divisible"),
        (dict(attn_impl="flash"), "attn_impl"),
        (dict(n_layers=0), "n_layers"),
        (dict(vocab_size=-1), "vocab_size"),
        (dict(alibi=False), "alibi"),
        (dict(prefix_lm=True), "prefix_lm"),
        (dict(attn_qk_ln=True), "attn_qk_ln"),
        (dict(attn_uses_sequence_id=True), "attn_uses_sequence_id"),
        (dict(no_bias=False), "no_bias"),
        (dict(attn_pdrop=1.5), "attn_pdrop"),
        (dict(param_init_fn="xavier_uniform_"), "param_init_fn"),
        (dict(norm_type="rmsnorm"), "norm_type"),
        (dict(attn_config={"attn_type": "multiquery_attention"}), "multiquery"),
        (dict(weight_quantization="int3"), "weight_quantization"),
        (dict(layer_norm_epsilon=-1.0), "layer_norm_epsilon"),
        (dict(layer_norm_epsilon=0), "layer_norm_epsilon"),
        (dict(layer_norm_epsilon="1e-5"), "layer_norm_epsilon"),
        (dict(init_std=0.0), "init_std"),
        (dict(init_std=float("nan")), "init_std"),
        (dict(alibi_bias_max="8"), "alibi_bias_max"),
        (dict(alibi_bias_max=-8), "alibi_bias_max"),
        (dict(attn_pdrop="0.1"), "attn_pdrop"),
        (dict(softmax_scale=True), "softmax_scale"),
        (dict(emb_init_std=-0.1), "emb_init_std"),
        (dict(emb_init_uniform_lim=[0.1, -0.1]), "emb_init_uniform_lim"),
        (dict(logit_scale="large"), "logit_scale"),
        (dict(logit_scale=0), "logit_scale must be a positive number"),
        (dict(logit_scale=-1.0), "logit_scale must be a positive number"),
        # MPT features this model does not compute: refused, not dropped.
        (dict(attn_config={"rope": True}), "attn_config.rope=True is not supported"),
        (dict(attn_config={"sliding_window_size": 512}), "sliding_window_size"),
        (dict(attn_config={"attn_logit_softcapping": 30.0}), "attn_logit_softcapping"),
        (dict(ffn_config={"ffn_type": "mptglu"}), "ffn_config.ffn_type='mptglu' is not supported"),
        (dict(ffn_config={"ffn_act_fn": {"name": "silu"}}), "ffn_act_fn"),
        (dict(ffn_config={"ffn_hidden_size": 100}), "ffn_hidden_size"),
        # transformers 5's own checks of the base class read head_dim: these must not reach them first.
        (dict(n_heads=0), "n_heads must be a positive integer"),
        (dict(n_heads="8"), "n_heads must be a positive integer"),
        (dict(d_model=None), "d_model must be a positive integer"),
        (dict(eos_token_id=99999), "eos_token_id must be a token id"),
        (dict(pad_token_id=-3), "pad_token_id must be a token id"),
        # A field written in both schemas with two values: one of them was dropped without a word.
        (dict(attn_impl="triton", attn_config={"attn_impl": "torch"}), "attn_impl='triton' contradicts 'torch'"),
        (dict(mlp_ratio=2, expansion_ratio=3), "mlp_ratio=2 contradicts 3"),
        (dict(low_precision_layernorm=False, norm_type="low_precision_layernorm"), "low_precision_layernorm=False"),
        (dict(param_init_fn="normal_", init_config={"name": "kaiming_normal_"}), "param_init_fn='normal_' contradicts"),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        replit_config(**overrides)


def test_model_rechecks_config_changed_after_construction():
    config = replit_config()
    config.attn_impl = "cuda"
    with pytest.raises(ValueError, match="attn_impl"):
        ReplitLM(config)


def test_bad_inputs_raise_clear_errors():
    model, _ = model_pair("pow2_heads")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[1, 2, VOCAB]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model(random_ids(1, model.config.max_seq_len + 1, seed=0))
    with pytest.raises(ValueError, match="empty"):
        model(torch.zeros((0, 4), dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        model(torch.zeros((2, 0), dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        model(random_ids(2, 5, seed=0), attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(ValueError, match="tuple caches"):
        model(random_ids(1, 2, seed=0), past_key_values=((torch.zeros(1),),))
    with pytest.raises(ValueError, match="labels must have shape"):
        model(random_ids(1, 5, seed=0), labels=random_ids(1, 4, seed=0))
    for bad in (VOCAB, -1):
        with pytest.raises(ValueError, match=f"labels contains {bad}, outside the vocabulary"):
            model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, -100, bad]]))
    with pytest.raises(ValueError, match="labels must be token ids"):
        model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1.0, 2.0, 3.0]]))
    # An additive mask (0 visible, -inf hidden) would be read the other way round; a half is neither.
    for mask in (torch.tensor([[float("-inf"), 0.0, 0.0]]), torch.full((1, 3), 0.5), torch.tensor([[1, 2, 1]])):
        with pytest.raises(ValueError, match="attention_mask must hold 1 .* and 0"):
            model(torch.tensor([[1, 2, 3]]), attention_mask=mask)
    with pytest.raises(TypeError, match="input_ids must be a torch.Tensor"):
        model([[1, 2, 3]])
    with pytest.raises(TypeError, match="attention_mask must be a torch.Tensor"):
        model(torch.tensor([[1, 2, 3]]), attention_mask=[[1, 1, 1]])


def test_ids_labels_embeddings_and_caches_of_other_kinds():
    """Integer ids of any width are ids (uint8's range check wrapped vocab_size to 0 before; int16 failed in the
    embedding), int32 labels are labels; embeddings of another dtype and a cache that cannot take the input are
    errors that say so, not failures deep in torch or in the cache."""
    model, _ = model_pair("pow2_heads")
    ids = random_ids(1, 8, seed=34) % 100
    expected = model(ids, labels=ids)
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32):
        torch.testing.assert_close(model(ids.to(dtype)).logits, expected.logits, atol=0, rtol=0)
    torch.testing.assert_close(model(ids, labels=ids.int()).loss, expected.loss, atol=0, rtol=0)
    with pytest.raises(ValueError, match="input_ids must be token ids .* got torch.bool"):
        model(ids > 50)
    with pytest.raises(ValueError, match="labels must be token ids .* got torch.bool"):
        model(ids, labels=ids > 50)
    embeds = model.get_input_embeddings()(ids)
    with pytest.raises(ValueError, match=r"inputs_embeds are torch.bfloat16 and the model is torch.float32"):
        model(inputs_embeds=embeds.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast the layers cast as they go
        model(inputs_embeds=embeds.bfloat16())
    cache = model(ids.repeat(2, 1), use_cache=True).past_key_values
    with pytest.raises(ValueError, match="the cache holds 2 sequences and the input 1"):
        model(ids[:, :1], past_key_values=cache)
    static = StaticCache(config=model.config, max_cache_len=10)
    model(ids, past_key_values=static)
    with pytest.raises(ValueError, match="room for 10 tokens and holds 8: 3 more do not fit"):
        model(ids[:, :3], past_key_values=static)
    assert model(ids[:, :2], past_key_values=static).logits.shape[1] == 2


def test_float_token_ids():
    """The card casts its ids to the model's dtype: whole numbers that the dtype holds exactly are taken as ids;
    fractions, and numbers from where the dtype starts rounding integers, are refused by name."""
    model, _ = model_pair("pow2_heads")
    ids = random_ids(1, 10, seed=32)
    expected = model(ids).logits
    torch.testing.assert_close(model(ids.to(torch.bfloat16)).logits, expected, atol=0, rtol=0)
    with pytest.raises(ValueError, match="integers.*2.5"):
        model(torch.tensor([[1.0, 2.5]], dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="bfloat16.*256"):
        model(torch.tensor([[1.0, 300.0]], dtype=torch.bfloat16))
    big = ReplitLM(replit_config(vocab_size=4096)).eval()
    assert big(torch.tensor([[1000.0, 2047.0]], dtype=torch.float16)).logits.shape == (1, 2, 4096)
    with pytest.raises(ValueError, match="float16.*2048"):
        big(torch.tensor([[1.0, 2048.0]], dtype=torch.float16))


def test_generate_checks_the_length_and_the_mask_before_starting():
    model, _ = model_pair("pow2_heads")
    ids = random_ids(1, 60, seed=33)
    forward = mock.Mock(wraps=model.forward)
    with mock.patch.object(model, "forward", forward):
        with pytest.raises(ValueError, match="60 tokens with max_new_tokens=5 reaches 65.*max_seq_len=64"):
            model.generate(ids, max_new_tokens=5)
        with pytest.raises(ValueError, match="max_length=70.*max_seq_len=64"):
            model.generate(ids, max_length=70)
        # max_new_tokens of the generation config wins over a max_length argument, as in transformers.
        model.generation_config.max_new_tokens = 10
        with pytest.raises(ValueError, match="max_new_tokens=10 reaches 70"):
            model.generate(ids, max_length=64)
        model.generation_config.max_new_tokens = None
        with pytest.raises(ValueError, match="prompt_lookup_num_tokens=10 tokens ahead.*reach 73 tokens"):
            model.generate(ids[:, :50], max_new_tokens=14, prompt_lookup_num_tokens=10)
        mask = torch.ones(2, 60, dtype=torch.long)
        mask[1] = 0
        with pytest.raises(ValueError, match="row 1 of attention_mask is all padding"):
            model.generate(ids.repeat(2, 1), attention_mask=mask, max_new_tokens=2)
        # Without a mask, generate makes one from pad_token_id: a row of pad tokens alone is the same mistake.
        padded = ids.repeat(2, 1)
        padded[0] = model.config.pad_token_id
        with pytest.raises(ValueError, match=r"row 0 of input_ids \(pad 2\) is all padding"):
            model.generate(padded, max_new_tokens=2)
        with pytest.raises(ValueError, match=r"input_ids must be \(batch, seq_len\), got shape \(60,\)"):
            model.generate(ids[0], max_new_tokens=2)
    assert not forward.called
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 64)
    # Within the bound, prompt lookup decoding is greedy decoding made faster: the same tokens.
    repeating, greedy = ids[:, :10].repeat(1, 4), dict(max_new_tokens=14, do_sample=False, pad_token_id=2)
    looked_up = model.generate(repeating, prompt_lookup_num_tokens=10, **greedy)
    assert torch.equal(looked_up, model.generate(repeating, **greedy))
    # No length asked for, as a plain generate(ids): transformers' 20 new tokens, stopping at max_seq_len.
    assert model.generate(ids, do_sample=False).shape == (1, 64)
    assert model.generate(ids[:, :10], do_sample=False, eos_token_id=None).shape == (1, 30)


@pytest.mark.parametrize("asked", [dict(max_new_tokens=2.5), dict(max_new_tokens="5"), dict(max_length=8.0)])
def test_generate_refuses_token_counts_that_are_not_whole_numbers(asked):
    """They size the static cache: 2.5 failed deep in torch.zeros, and on transformers 5 every later generate of
    the same model failed the same way (the size is kept on the model)."""
    model, _ = model_pair("pow2_heads")
    ids = random_ids(1, 6, seed=35)
    name, value = next(iter(asked.items()))
    with pytest.raises(ValueError, match=f"{name} must be a whole number of tokens, got {value!r}"):
        model.generate(ids, **asked)
    assert model.generate(ids, max_new_tokens=2, do_sample=False).shape == (1, 8)


def test_long_sequences_with_a_raised_max_seq_len():
    """ALiBi extrapolates: the same weights run past the trained length once max_seq_len is raised."""
    model, _ = model_pair("pow2_heads")
    longer = ReplitLM(replit_config(max_seq_len=128)).eval()
    longer.load_state_dict(model.state_dict())
    ids = random_ids(1, 100, seed=17)
    assert longer(ids).logits.shape == (1, 100, VOCAB)
    torch.testing.assert_close(longer(ids[:, :50]).logits, model(ids[:, :50]).logits, atol=ATOL, rtol=0)


def test_config_attribute_map():
    config = ReplitLMConfig()
    assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers) == (2560, 32, 32)
    assert config.max_position_embeddings == 2048


def test_beam_search_matches_reference():
    model, ref = model_pair("pow2_heads")
    ids = random_ids(2, 6, seed=18)
    mask = left_padding_mask([6, 3], 6)
    kwargs = dict(attention_mask=mask, max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=2, eos_token_id=None)
    assert torch.equal(model.generate(ids, **kwargs), ref.generate(ids, **kwargs))
