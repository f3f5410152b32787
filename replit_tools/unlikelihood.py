"""Unlikelihood training against the demo's loops (docs/demo.md, issue 16).

A model of a few million parameters, completing greedily, falls into loops: a line, a pair of lines or a phrase
repeated until the token budget runs out (`self.check('abc', 'abc')` eight times, `import socket` to the end). More
steps of likelihood training lower the loss but do not remove them. Sequence-level unlikelihood training (Welleck et
al. 2019, "Neural text generation with unlikelihood training") does: the model completes prompts of its own training
data greedily, the tokens that continue a loop in those completions are found, and their probability is pushed down
with -log(1 - p); a likelihood loss on the training data is kept beside it so that the model stays a language model.

The prompts are what a newcomer types: the first line of a training definition (`def name(args):`, `class Name:`)
and the first line of a training file (`import os`), both without the final newline.
"""

from pathlib import Path

import torch

from .corpus import read_text

LOOP_MAX_PERIOD = 48  # tokens: about three lines of code
LOOP_MIN_RUN = 8  # a loop of a short period counts only once it has repeated this many tokens (not `)))`)


def loop_positions(ids: torch.Tensor, max_period: int = LOOP_MAX_PERIOD, min_run: int = LOOP_MIN_RUN) -> torch.Tensor:
    """(batch, seq) bool: the positions that continue a loop. A position t continues one of period p when the tokens
    up to t repeat the tokens p before them for at least max(p + 1, min_run) positions in a row: a block of p tokens
    twice, and t starts its third copy or is further in. The third copy (and every later one) is marked from its
    first token, the one where the loop could have been left."""
    batch, seq = ids.shape
    positions = torch.arange(seq).expand(batch, seq)
    marked = torch.zeros_like(ids, dtype=torch.bool)
    for period in range(1, min(max_period, seq - 1) + 1):
        same = torch.zeros_like(marked)
        same[:, period:] = ids[:, period:] == ids[:, :-period]
        # How many positions in a row, ending at t, equal the token `period` before them.
        last_different = torch.where(same, -1, positions).cummax(dim=1).values
        marked |= positions - last_different >= max(period + 1, min_run)
    return marked


def minus_log_one_minus(log_p: torch.Tensor) -> torch.Tensor:
    """-log(1 - p) from log p, as log1p(-exp(log p)); p is clamped below 1, so that a certain token costs a large,
    finite loss."""
    return -torch.log1p(-log_p.exp().clamp(max=1 - 1e-6))


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the masked positions; 0 (with a gradient graph) when none is masked."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def unlikelihood_loss(log_probs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of -log(1 - p(target)) over the masked positions. log_probs: (batch, seq, vocab) log-probabilities
    predicting `targets` (batch, seq) at the same positions."""
    target_log_probs = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return masked_mean(minus_log_one_minus(target_log_probs), mask)


def unseen_tokens_loss(log_probs: torch.Tensor, unseen: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of -log(1 - p(any token of `unseen`)) over the masked positions; `unseen` (vocab,) bool: the tokens
    that never occur in the training data. Pushing a loop's token down sends its probability to every other token,
    and a model of this size then also reaches for tokens it never saw (the `<extra_id_N>` sentinels, whose
    embeddings are untrained): this keeps them unlikely where the completions are."""
    return masked_mean(minus_log_one_minus(log_probs[..., unseen].logsumexp(dim=-1)), mask)


def first_lines(documents: list[str]) -> list[str]:
    """The first line of each document, without its newline, where it is a header (`def ...:`, `class ...:`)."""
    lines = (document.split("\n", 1)[0] for document in documents)
    return [line for line in lines if line.rstrip().endswith(":")]


def file_first_lines(files: list[Path]) -> list[str]:
    """The first non-blank line of each file, without its newline: an import, a docstring, a comment."""
    found = []
    for path in files:
        line = next((line for line in read_text(path).splitlines() if line.strip()), None)
        if line is not None:
            found.append(line)
    return found


class LoopPenalty:
    """The unlikelihood terms of one training step: `headers` prompts drawn from `header_prompts` and `files` from
    `file_prompts`, completed greedily by the model (`max_new_tokens`, stopping at <|endoftext|>); the loss is
    `unlikelihood_loss` on the loop positions of the completions, plus `unseen_tokens_loss` on all their positions
    when `unseen` is given. Called as `penalty(model, generator)`."""

    def __init__(self, tokenizer, header_prompts: list[str], file_prompts: list[str], unseen: torch.Tensor = None,
                 headers: int = 12, files: int = 4, max_new_tokens: int = 96):  # fmt: skip
        self.tokenizer = tokenizer
        self.header_prompts, self.file_prompts, self.unseen = header_prompts, file_prompts, unseen
        self.headers, self.files, self.max_new_tokens = headers, files, max_new_tokens
        self.looping_rows = self.marked_tokens = self.rows = 0  # running totals, for the progress bar

    def prompts(self, generator: torch.Generator) -> list[str]:
        picks = []
        for pool, count in ((self.header_prompts, self.headers), (self.file_prompts, self.files)):
            picks += [pool[i] for i in torch.randint(0, len(pool), (count,), generator=generator).tolist()]
        return picks

    @torch.no_grad()
    def complete(self, model, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompts left-padded and completed greedily: ids (batch, prompt + new) and where the completions are
        (each up to and including its first <|endoftext|>; the rest is padding)."""
        tokenizer = self.tokenizer
        encoded = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
        was_training = model.training
        model.eval()
        with torch.autocast("cpu", enabled=False):  # the completions a user gets: float32
            ids = model.generate(**encoded, do_sample=False, max_new_tokens=self.max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
        model.train(was_training)
        prompt_len = encoded["input_ids"].shape[1]
        is_eos = ids == tokenizer.eos_token_id
        is_eos[:, :prompt_len] = False
        in_completion = (is_eos.cumsum(dim=1) - is_eos.long()) == 0  # not yet past an <|endoftext|>
        in_completion[:, :prompt_len] = False
        return ids, in_completion

    def __call__(self, model, generator: torch.Generator) -> torch.Tensor:
        ids, in_completion = self.complete(model, self.prompts(generator))
        loops = loop_positions(ids) & in_completion
        self.rows += len(ids)
        self.looping_rows += loops.any(dim=1).sum().item()
        self.marked_tokens += loops.sum().item()
        attention_mask = (ids != self.tokenizer.pad_token_id).long()
        logits = model(ids, attention_mask=attention_mask).logits[:, :-1]  # at t: the token at t + 1
        log_probs = torch.log_softmax(logits.float(), dim=-1)  # once, for both terms
        loss = unlikelihood_loss(log_probs, ids[:, 1:], loops[:, 1:])
        if self.unseen is not None:
            loss = loss + unseen_tokens_loss(log_probs, self.unseen, in_completion[:, 1:])
        return loss
