"""The whole model with attn_impl='triton' against attn_impl='torch' in float32: on a GPU when there is one
(compiled kernels), else in Triton's interpreter on the CPU.

Tolerances: logits within 1e-4 absolute, gradients within 1e-4 absolute / 1e-3 relative, as for the reference
tests; the kernel accumulates in float32 in another order than SDPA. On a GPU also the card's path, bfloat16 with
attn_impl='triton', against float32: see test_card_bf16_gpu_path_matches_float32.
"""

import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from model_helpers import model_pair
from test_model import left_padding_mask, random_ids

pytest.importorskip("triton")

ATOL = 1e-4
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def on_device(*tensors):
    return [t.to(DEVICE) for t in tensors]


def triton_twin(model):
    """A copy of `model` that runs the triton kernel; switching the config field switches every layer."""
    twin = type(model)(model.config.__class__(**model.config.to_dict())).eval().to(DEVICE)
    twin.load_state_dict(model.state_dict())
    twin.config.attn_impl = "triton"
    return twin


@pytest.fixture(scope="module")
def models():
    # head_dim 16 and a non-power-of-two head count: 48 / 3.
    model, _ = model_pair("six_heads", d_model=48, n_heads=3, n_layers=2)
    model.to(DEVICE)
    return model, triton_twin(model)


def test_logits_and_padded_batch(models):
    model, triton_model = models
    ids, mask = on_device(random_ids(3, 13, seed=21), left_padding_mask([13, 8, 2], 13))
    real = mask.bool()
    torch.testing.assert_close(triton_model(ids).logits, model(ids).logits, atol=ATOL, rtol=0)
    got = triton_model(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[real], model(ids, attention_mask=mask).logits[real], atol=ATOL, rtol=0)
    right = mask.flip(1)
    got = triton_model(ids, attention_mask=right).logits
    torch.testing.assert_close(got[right.bool()], model(ids, attention_mask=right).logits[right.bool()], atol=ATOL, rtol=0)


def test_cached_decoding_and_greedy_generate(models):
    model, triton_model = models
    ids, mask, new_id = on_device(random_ids(2, 7, seed=22), left_padding_mask([7, 4], 7), random_ids(2, 1, seed=23))
    longer_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=2, eos_token_id=None)
    assert torch.equal(triton_model.generate(**kwargs, inputs=ids), model.generate(**kwargs, inputs=ids))
    first = triton_model(ids, attention_mask=mask, use_cache=True)
    step = triton_model(new_id, attention_mask=longer_mask, past_key_values=first.past_key_values)
    full = model(torch.cat([ids, new_id], 1), attention_mask=longer_mask).logits[:, -1:]
    torch.testing.assert_close(step.logits, full, atol=ATOL, rtol=0)


def test_loss_gradients_match_the_torch_path(models):
    model, triton_model = models
    ids, mask = on_device(random_ids(2, 11, seed=24), left_padding_mask([11, 6], 11))
    grads = []
    for m in (model, triton_model):
        m.zero_grad()
        m.train()
        m(ids, attention_mask=mask, labels=ids).loss.backward()
        m.eval()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("case", ["one row", "padded rows"])
def test_packed_sequences_match_the_torch_path(models, case):
    """Sequences packed into rows (position_ids restarting at 0): the kernel masks one range of keys per row, so each
    sequence is laid out in a row of its own for it (attention.Unpacking); logits and gradients as the torch path's
    block-diagonal mask gives them."""
    model, triton_model = models
    if case == "one row":  # as DataCollatorWithFlattening makes it: no attention_mask
        ids, mask = random_ids(1, 16, seed=25), None
        positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7]])
    else:  # left padding, whose positions transformers writes as 1
        ids, mask = random_ids(2, 12, seed=26), torch.tensor([[1] * 12, [0, 0] + [1] * 10])
        positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3], [1, 1, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3]])
    ids, positions = on_device(ids, positions)
    mask = None if mask is None else mask.to(DEVICE)
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    outputs, grads = [], []
    for m in (model, triton_model):
        m.zero_grad()
        out = m.train()(ids, attention_mask=mask, position_ids=positions, labels=ids)
        out.loss.backward()
        m.eval()
        outputs.append(out.logits[real])
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    torch.testing.assert_close(outputs[1], outputs[0], atol=ATOL, rtol=0)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-4, rtol=1e-3, msg=name)


def test_unsupported_combinations_raise(models):
    model, triton_model = models
    with pytest.raises(ValueError, match="output_attentions"):
        triton_model(random_ids(1, 4, seed=0).to(DEVICE), output_attentions=True)
    dropout = triton_twin(model)
    dropout.config.attn_pdrop = 0.1
    with pytest.raises(ValueError, match="(?i)dropout"):
        dropout.train()(random_ids(1, 4, seed=0).to(DEVICE))


@pytest.mark.skipif(DEVICE != "cuda", reason="the interpreter cannot multiply bfloat16 (see test_triton_kernel.py)")
def test_card_bf16_gpu_path_matches_float32(models):
    """The card's GPU recipe, attn_impl='triton' then .to('cuda', torch.bfloat16), against the float32 torch path
    as truth: relative logit error under 10% and no worse than 1.25x that of the torch path in bfloat16, for a
    padded batch in one pass and for its last token decoded against the KV cache of the others."""
    model, _ = models
    ids, mask = on_device(random_ids(3, 40, seed=25), left_padding_mask([40, 31, 9], 40))
    real = mask.bool()
    truth = model(ids, attention_mask=mask).logits

    def relative_error(got, expected):
        return ((got.float() - expected).norm() / expected.norm()).item()

    errors = {}
    for attn_impl in ("torch", "triton"):
        bf16 = triton_twin(model).to(dtype=torch.bfloat16)
        bf16.config.attn_impl = attn_impl
        whole = bf16(ids, attention_mask=mask).logits
        cache = bf16(ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True).past_key_values
        step = bf16(ids[:, -1:], attention_mask=mask, past_key_values=cache).logits
        errors[attn_impl] = (relative_error(whole[real], truth[real]), relative_error(step, truth[:, -1:]))
    for triton_error, torch_error in zip(errors["triton"], errors["torch"]):
        assert triton_error < 0.1 and triton_error <= 1.25 * torch_error, errors


def test_cpu_without_the_interpreter_names_the_problem():
    script = (
        "import sys; sys.path.insert(0, 'tests'); import conftest, torch\n"
        "from model_helpers import replit_config\n"
        "from replit_lm.modeling_replit_lm import ReplitLM\n"
        "model = ReplitLM(replit_config(attn_impl='triton'))\n"
        "model(torch.tensor([[3, 4, 5]]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_INTERPRET"] = "0"
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert "needs a CUDA device" in result.stderr, result.stderr[-2000:]
