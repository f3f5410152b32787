"""The demo's unlikelihood stage (replit_tools/unlikelihood.py): which tokens of a completion continue a loop, the
-log(1 - p) loss on them, and the completions it is computed on."""

import copy

import pytest
import torch

from replit_tools import DEMO_MODEL as DEMO
from replit_tools.demo import train
from replit_tools.unlikelihood import (
    LOOP_MAX_PERIOD,
    LOOP_MIN_RUN,
    LoopPenalty,
    loop_positions,
    unlikelihood_loss,
    unseen_tokens_loss,
)
from replit_lm.configuration_replit_lm import ReplitLMConfig
from replit_lm.modeling_replit_lm import ReplitLM
from replit_lm.replit_lm_tokenizer import ReplitLMTokenizer


def loops_read_directly(row: list[int], max_period: int, min_run: int) -> list[bool]:
    """Position t continues a loop of period p when each of the last max(p + 1, min_run) tokens up to t equals the
    token p before it."""
    marks = []
    for t in range(len(row)):
        marks.append(any(
            t - max(p + 1, min_run) + 1 - p >= 0
            and all(row[s] == row[s - p] for s in range(t - max(p + 1, min_run) + 1, t + 1))
            for p in range(1, max_period + 1)
        ))  # fmt: skip
    return marks


@pytest.mark.parametrize("alphabet", [2, 3, 6])
def test_loop_positions_agree_with_a_direct_reading(alphabet):
    generator = torch.Generator().manual_seed(torch.seed())
    rows = torch.randint(0, alphabet, (6, 90), generator=generator)
    # Rows with real loops too: a random block repeated a random number of times inside random tokens.
    for row in rows[3:]:
        period = int(torch.randint(1, 14, (1,), generator=generator))
        copies = int(torch.randint(2, 6, (1,), generator=generator))
        block = torch.randint(0, alphabet, (period,), generator=generator)
        start = int(torch.randint(0, 90 - period * copies, (1,), generator=generator))
        row[start : start + period * copies] = block.repeat(copies)
    for max_period, min_run in ((LOOP_MAX_PERIOD, LOOP_MIN_RUN), (5, 3)):
        marks = loop_positions(rows, max_period, min_run)
        for row, row_marks in zip(rows.tolist(), marks.tolist()):
            assert row_marks == loops_read_directly(row, max_period, min_run), row


def test_the_third_copy_of_a_block_is_marked_from_its_first_token():
    distinct = torch.randperm(4000)[:60] + 3
    before, block, after = distinct[:12], distinct[12:22], distinct[22:34]
    three = torch.cat([before, block, block, block, after])[None]
    marks = loop_positions(three)[0]
    third = slice(len(before) + 2 * len(block), len(before) + 3 * len(block))
    assert marks[third].all() and marks.sum() == len(block)
    assert not loop_positions(torch.cat([before, block, block, after])[None]).any(), "two copies are not a loop"
    closing = torch.tensor([5] * (LOOP_MIN_RUN - 1))  # `)))`: short runs of one token are code, not a loop
    assert not loop_positions(torch.cat([before, closing, after])[None]).any()


def test_unlikelihood_loss_is_minus_log_one_minus_p_on_the_marked_positions():
    logits = torch.randn(3, 7, 50, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (3, 7))
    mask = torch.rand(3, 7) < 0.4
    mask[0, 0] = True
    p = torch.softmax(logits, dim=-1).gather(-1, targets[..., None])[..., 0]
    expected = -(torch.log(1 - p) * mask).sum() / mask.sum()
    loss = unlikelihood_loss(torch.log_softmax(logits.float(), dim=-1), targets, mask)
    torch.testing.assert_close(loss, expected.float(), rtol=1e-5, atol=1e-6)

    loss.backward()
    assert (logits.grad[~mask] == 0).all(), "unmarked positions get no gradient"
    with torch.no_grad():
        stepped = torch.softmax(logits - 0.5 * logits.grad, dim=-1).gather(-1, targets[..., None])[..., 0]
    assert (stepped[mask] < p[mask]).all(), "a step against the loss makes the marked tokens less likely"

    nothing = unlikelihood_loss(torch.log_softmax(logits.float(), dim=-1), targets, torch.zeros_like(mask))
    assert nothing.item() == 0 and nothing.requires_grad


def test_unseen_tokens_loss_is_minus_log_one_minus_their_total_probability():
    logits = torch.randn(2, 5, 40, dtype=torch.float64, requires_grad=True)
    unseen = torch.rand(40) < 0.3
    unseen[0] = True
    mask = torch.rand(2, 5) < 0.6
    mask[1, 4] = True
    total = torch.softmax(logits, dim=-1)[..., unseen].sum(dim=-1)
    expected = -(torch.log(1 - total) * mask).sum() / mask.sum()
    loss = unseen_tokens_loss(torch.log_softmax(logits.float(), dim=-1), unseen, mask)
    torch.testing.assert_close(loss, expected.float(), rtol=1e-5, atol=1e-6)
    loss.backward()
    with torch.no_grad():
        stepped = torch.softmax(logits - 0.5 * logits.grad, dim=-1)[..., unseen].sum(dim=-1)
    assert (stepped[mask] < total[mask]).all()


def test_loop_penalty_completes_greedily_and_knows_where_the_completions_are():
    tokenizer = ReplitLMTokenizer.from_pretrained(DEMO)
    model = ReplitLM.from_pretrained(DEMO, dtype=torch.float32).eval()
    headers = ["def test_pdb_where_command():", "def f(x):", "class Stack:"]
    penalty = LoopPenalty(tokenizer, headers, ["import os"], headers=3, files=1, max_new_tokens=40)
    prompts = penalty.prompts(torch.Generator().manual_seed(0))
    assert len(prompts) == 4 and set(prompts[:3]) <= set(headers) and prompts[3] == "import os"
    ids, in_completion = penalty.complete(model, prompts)
    prompt_len = ids.shape[1] - 40
    for row, row_in_completion, prompt in zip(ids, in_completion, prompts):
        # Left padding changes nothing: each row is the prompt's own greedy completion, up to its end of text.
        alone = tokenizer(prompt, return_tensors="pt")["input_ids"]
        expected = model.generate(alone, do_sample=False, max_new_tokens=40, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)[0, alone.shape[1] :]  # fmt: skip
        if tokenizer.eos_token_id in expected.tolist():
            expected = expected[: expected.tolist().index(tokenizer.eos_token_id) + 1]
        assert row[prompt_len : prompt_len + len(expected)].tolist() == expected.tolist(), prompt
        assert row_in_completion.tolist() == [prompt_len <= t < prompt_len + len(expected) for t in range(len(row))]


def test_loop_penalty_is_a_differentiable_loss_that_counts_its_completions():
    tokenizer = ReplitLMTokenizer.from_pretrained(DEMO)
    model = ReplitLM(ReplitLMConfig(d_model=32, n_heads=2, n_layers=1, vocab_size=4096, max_seq_len=64))
    unseen = torch.zeros(4096, dtype=torch.bool)
    unseen[3:103] = True
    penalty = LoopPenalty(tokenizer, ["def f(x):"], ["import os"], unseen=unseen, headers=2, files=1,
                          max_new_tokens=12)  # fmt: skip
    loss = penalty(model.train(), torch.Generator().manual_seed(0))
    assert model.training, "completing for the penalty leaves the model in training mode"
    assert loss.ndim == 0 and loss.item() > 0  # random weights give the unseen tokens some probability
    loss.backward()
    assert model.transformer.wte.weight.grad.abs().sum() > 0
    assert penalty.rows == 3 and 0 <= penalty.looping_rows <= 3


def test_training_adds_the_extra_loss_of_each_step():
    """train(..., extra_loss=...) adds the term to every step's loss: here one that pulls the final norm's weight
    down, which plain training on the same batches does not do as much (Adam moves each weight by at most about the
    learning rate a step, which the pull reaches everywhere: plain training reaches it at some weights at most)."""
    model = ReplitLM(ReplitLMConfig(d_model=32, n_heads=2, n_layers=1, vocab_size=64, max_seq_len=16))
    batch = torch.randint(0, 64, (2, 16))
    plain, pulled = copy.deepcopy(model), copy.deepcopy(model)
    calls = []

    def pull_down(model, generator):
        calls.append(generator)
        return 10 * model.transformer.norm_f.weight.sum()

    train(plain, lambda generator: batch, steps=3, peak_lr=1e-2, seed=0)
    train(pulled, lambda generator: batch, steps=3, peak_lr=1e-2, seed=0, extra_loss=pull_down)
    assert len(calls) == 3 and all(isinstance(g, torch.Generator) for g in calls)
    pulled_weight, plain_weight = pulled.transformer.norm_f.weight, plain.transformer.norm_f.weight
    assert (pulled_weight <= plain_weight + 1e-6).all() and pulled_weight.sum() < plain_weight.sum() - 0.05
