"""Post-processing of code completions, as the replit-code-v1-3b model card recommends: stop at the end-of-text token,
truncate at stop sequences, trim trailing whitespace, bound the number of new tokens.

One module for every caller: the command line (generate.py), the HTTP server (serve.py) and the evaluation. It
gives the same answer whether a completion is finished in one go (`finish_completion`), streamed piece by piece
(`StreamingPostprocessor`), or cut short while it is being generated (`StopSequenceCriteria`, a transformers
StoppingCriteria, so that no compute is spent past a stop sequence).

Stop sequences, and the rules that keep them from cutting the code being completed:
- The defaults (`DEFAULT_STOP_SEQUENCES`) mark the start of the next top-level Python statement that begins a new
  unit: `def`, `async def`, `class`, a decorator, the `if __name__` guard, a top-level `print(` and a top-level
  `# ` comment. Each starts with a newline and has its first character in column 0, so nested functions, methods
  and indented code never match, whatever the indentation (spaces or tabs). `# ` has its space on purpose: C
  preprocessor lines (`#ifdef` inside a function body) and shebangs do not stop a completion.
- A stop sequence counts only once the completion has begun: matches in its leading whitespace are skipped, so a
  prompt that ends with a finished function (`...return x\n`) still gets the next definition instead of nothing.
- A stop sequence inside a string literal or a comment does not count (a column-0 `# Heading` in a docstring, a
  `class ` in a block comment). Strings and comments are found by a small lexer that knows the quotes and comment
  markers common to the languages the model was trained on; it reads the prompt as well, so a completion that
  starts inside a docstring opened by the prompt is known to be inside it. An unterminated multi-line string stays
  open to the end: the safe failure is a completion that runs to its token budget, never one cut mid-code.
"""

import bisect
import re
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria

from .options import DEFAULT_STOP_SEQUENCES

# How a completion ended: the end-of-text token, a stop sequence, or the token budget.
STOP_EOS, STOP_SEQUENCE, STOP_LENGTH = "eos", "stop_sequence", "length"

# Strings and comments, matched left to right (the leftmost match wins, so a quote inside a comment and a comment
# marker inside a string are read as what they are). Single-line strings end at their line's end even when
# unterminated; multi-line strings and block comments run to the end of the text when unterminated. A backslash that
# ends the text, escaping nothing yet, belongs to its string: without `\\\Z` the string would not match at all, and a
# completion streamed up to that backslash would be read as code only then, its stop sequences found in text shown.
_STRING_OR_COMMENT = re.compile(
    r"""
      (?P<triple>\"\"\"|''')(?:\\.|\\\Z|[^\\])*?(?:(?P=triple)|\Z)   # Python, Kotlin, Swift triple-quoted string
    | `(?:\\.|\\\Z|[^`\\])*(?:`|\Z)                                  # JavaScript template literal, Go raw string
    | /\*.*?(?:\*/|\Z)                                                # block comment
    | (?:\#|//)[^\n]*                                                  # line comment (and C preprocessor lines)
    | "(?:\\.|\\\Z|[^"\\\n])*(?:"|$)                                  # one-line strings
    | '(?:\\.|\\\Z|[^'\\\n])*(?:'|$)
    """,
    re.DOTALL | re.MULTILINE | re.VERBOSE,
)


@dataclass(frozen=True)
class StopMatch:
    index: int  # where the stop sequence starts in the completion
    sequence: str


@dataclass(frozen=True)
class FinishedCompletion:
    text: str
    stop_reason: str  # STOP_EOS, STOP_SEQUENCE or STOP_LENGTH
    stop_sequence: str | None  # the stop sequence that ended it, for STOP_SEQUENCE
    completion_tokens: int  # tokens the model generated for it (its end-of-text token included)


class _CodeRegions:
    """Which positions of a text are code, as opposed to inside a string literal or a comment."""

    def __init__(self, text: str):
        # (start, end) of each string or comment; their opening delimiter is code (that is where they start).
        spans = [m.span() for m in _STRING_OR_COMMENT.finditer(text)]
        self._starts = [start for start, _ in spans]
        self._ends = [end for _, end in spans]

    def is_code(self, position: int) -> bool:
        i = bisect.bisect_left(self._starts, position) - 1
        return i < 0 or position >= self._ends[i]


def find_stop(completion: str, stop_sequences, prompt: str = "") -> StopMatch | None:
    """The earliest stop sequence in `completion` that starts in code and at or after its first non-blank
    character, or None. `prompt` is the text before the completion: it tells whether the completion starts inside
    a string or a comment."""
    text = prompt + completion
    content_start = len(text) - len(completion.lstrip())
    if content_start == len(text) or not stop_sequences:
        return None
    regions = _CodeRegions(text)
    earliest = None
    for sequence in stop_sequences:
        start = text.find(sequence, content_start)
        while start != -1 and not regions.is_code(start):
            start = text.find(sequence, start + 1)
        if start != -1 and (earliest is None or start < earliest.index):
            earliest = StopMatch(start, sequence)
    return None if earliest is None else StopMatch(earliest.index - len(prompt), earliest.sequence)


def truncate(completion: str, stop_sequences, prompt: str = "") -> tuple[str, StopMatch | None]:
    """The completion cut before its first stop sequence (see `find_stop`), trailing whitespace removed."""
    stop = find_stop(completion, stop_sequences, prompt)
    if stop is not None:
        completion = completion[: stop.index]
    return completion.rstrip(), stop


def completion_ids(tokenizer, generated_ids, max_new_tokens: int | None = None) -> list[int]:
    """The ids the model generated for a completion: at most `max_new_tokens`, up to the first end-of-text token
    (kept), without the padding that batched generation puts after a sequence that finished early."""
    ids = generated_ids.tolist() if isinstance(generated_ids, torch.Tensor) else list(generated_ids)
    ids = ids[:max_new_tokens]
    if tokenizer.eos_token_id in ids:
        return ids[: ids.index(tokenizer.eos_token_id) + 1]
    while ids and ids[-1] == tokenizer.pad_token_id:
        ids.pop()
    return ids


def decode(tokenizer, ids) -> str:
    """Text of token ids as the model card decodes it: special tokens dropped, spaces exactly as generated."""
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def finish_completion(
    tokenizer,
    generated_ids,
    stop_sequences=DEFAULT_STOP_SEQUENCES,
    prompt: str = "",
    max_new_tokens: int | None = None,
) -> FinishedCompletion:
    """The card's post-processing of one generated sequence (the new tokens only, without the prompt): stop at
    end-of-text, bound the token count, truncate at a stop sequence, remove trailing whitespace."""
    ids = completion_ids(tokenizer, generated_ids, max_new_tokens)
    text, stop = truncate(decode(tokenizer, ids), stop_sequences, prompt)
    if stop is not None:
        reason = STOP_SEQUENCE
    elif ids and ids[-1] == tokenizer.eos_token_id:
        reason = STOP_EOS
    else:
        reason = STOP_LENGTH
    return FinishedCompletion(text, reason, stop and stop.sequence, len(ids))


def _rstrip_undecided(text: str) -> str:
    """`text` without its tail of whitespace and U+FFFD (what a partly decoded multi-byte character shows as)."""
    return re.sub(r"[\s\ufffd]+\Z", "", text)


class StreamingPostprocessor:
    """Post-processing for a completion shown while it is generated. Each `update` takes the whole completion so
    far and returns the new text that is safe to show: text that the post-processing of the finished completion
    keeps. Held back until more text decides: trailing whitespace (trimmed if the completion ends there), a tail
    that could be the start of a stop sequence, and a tail of U+FFFD (an incomplete multi-byte character). With
    `finish`, the pieces add up to exactly the post-processed completion."""

    def __init__(self, stop_sequences=DEFAULT_STOP_SEQUENCES, prompt: str = ""):
        self.stop_sequences = tuple(stop_sequences)
        self.prompt = prompt
        self.shown = ""
        self.stopped = False

    def update(self, completion: str) -> str:
        if self.stopped:
            return ""
        stop = find_stop(completion, self.stop_sequences, self.prompt)
        if stop is not None:
            self.stopped = True
            return self._show(completion[: stop.index].rstrip())
        safe = _rstrip_undecided(completion)
        return self._show(_rstrip_undecided(safe[: len(safe) - self._possible_stop_start(safe)]))

    def finish(self, final_text: str) -> str:
        """The rest of the finished completion, given its post-processed text (`finish_completion(...).text`)."""
        return self._show(final_text)

    def _possible_stop_start(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper beginning of a stop sequence."""
        return max(
            (k for stop in self.stop_sequences for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0
        )

    def _show(self, safe: str) -> str:
        if len(safe) <= len(self.shown):
            return ""
        if not safe.startswith(self.shown):
            raise AssertionError(f"streamed text {self.shown!r} is not a prefix of the completion {safe!r}")
        piece, self.shown = safe[len(self.shown) :], safe
        return piece


class StopSequenceCriteria(StoppingCriteria):
    """Stops each sequence of a batch as soon as its completion holds a stop sequence (with the rules of
    `find_stop`), so that no compute is spent past it. Sequences are prompt (left-padded to `prompt_length`)
    followed by generated tokens."""

    def __init__(self, tokenizer, prompt_length: int, stop_sequences=DEFAULT_STOP_SEQUENCES):
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length
        self.stop_sequences = tuple(stop_sequences)
        self._prompts = None  # decoded on the first call, once per row

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        if self._prompts is None:
            self._prompts = [decode(self.tokenizer, row) for row in input_ids[:, : self.prompt_length].tolist()]
        done = [
            find_stop(self._completion(row), self.stop_sequences, prompt) is not None
            for row, prompt in zip(input_ids[:, self.prompt_length :].tolist(), self._prompts)
        ]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    def _completion(self, generated_ids: list[int]) -> str:
        return decode(self.tokenizer, completion_ids(self.tokenizer, generated_ids))
