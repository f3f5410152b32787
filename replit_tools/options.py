"""What the tools' command lines need before a model loads, importable without torch: the completion settings
(the model card's by default), the default stop sequences, the model options and the errors shown to the user. So
`python3 generate.py --help` and a bad command line answer at once, not after the seconds torch takes to import."""

import argparse
import math
from dataclasses import dataclass

from . import DEMO_MODEL

# Where the next top-level unit of Python starts (the rules that keep them from cutting code: postprocessing.py).
DEFAULT_STOP_SEQUENCES = ("\ndef ", "\nasync def ", "\nclass ", "\n@", "\nif __name__", "\nprint(", "\n# ")

DTYPE_NAMES = ("float32", "bfloat16", "float16")


class CompletionError(Exception):
    """A request that cannot be served as given; the message tells the user what to change."""


SAMPLING_TEMPERATURE_FROM = 1e-5
"""Below this a temperature means greedy: sampling is then the argmax but for logits within about 1e-4 of it, and
dividing float32 logits by a temperature below about 1e-37 overflows (sampling from the infinities fails)."""


SEEDS = 2**32  # seeds 0 .. 2**32 - 1: transformers.set_seed seeds numpy too, which takes no others


@dataclass(frozen=True)
class Settings:
    """How to complete: the model card's sampling settings by default. A temperature of 0 (below
    SAMPLING_TEMPERATURE_FROM) means greedy."""

    max_new_tokens: int = 128
    greedy: bool = False
    temperature: float = 0.2
    top_p: float = 0.95
    top_k: int = 4
    num_completions: int = 1
    stop_sequences: tuple[str, ...] = DEFAULT_STOP_SEQUENCES
    seed: int | None = None

    def __post_init__(self):
        checks = (
            (self.max_new_tokens >= 1, "max new tokens must be at least 1"),
            (self.num_completions >= 1, "the number of completions must be at least 1"),
            (
                math.isfinite(self.temperature) and self.temperature >= 0,
                f"temperature must be a finite number, 0 (greedy) or more, got {self.temperature}",
            ),
            (0 < self.top_p <= 1, f"top-p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, "top-k must be 0 (no top-k filtering) or more"),
            (all(self.stop_sequences), "a stop sequence cannot be empty"),
            (self.seed is None or 0 <= self.seed < SEEDS, f"the seed must be 0 to 2**32 - 1, got {self.seed}"),
        )
        for passed, message in checks:
            if not passed:
                raise CompletionError(message)
        # JSON's 2 is an int, which transformers' temperature check refuses ("has to be a strictly positive float").
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))

    @property
    def do_sample(self) -> bool:
        return not self.greedy and self.temperature >= SAMPLING_TEMPERATURE_FROM


def reject_empty(prompts: list[str]):
    """Raise CompletionError unless there are prompts and each has some code."""
    if not prompts:
        raise CompletionError("no prompt: give PROMPT, --file PATH, or --file - to read standard input")
    for number, prompt in enumerate(prompts, start=1):
        if not prompt.strip():
            which = "the prompt" if len(prompts) == 1 else f"prompt {number}"
            raise CompletionError(f"{which} is empty or only whitespace: give the code to complete")


def at_least(least: int):
    """An argparse type: a whole number of at least `least`; anything else is the option's one-line error."""

    def whole_number(text: str) -> int:
        value = int(text)  # a ValueError: argparse's "invalid whole_number value"
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
        return value

    return whole_number


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, its errors one line ("error: ..."), exiting with `error_status` (argparse's own: 2)."""

    def __init__(self, *args, error_status: int = 2, **kwargs):
        super().__init__(*args, **kwargs)
        self.error_status = error_status

    def error(self, message):
        self.exit(self.error_status, f"error: {message}\n")


def add_model_arguments(parser: argparse.ArgumentParser):
    """The options that choose and load the model, shared with serve.py."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=str(DEMO_MODEL),
        help="a model folder laid out like the Hub repository, a downloaded snapshot of replit/replit-code-v1-3b, "
        "or a Hub id (default: the embedded demo model, demo/ beside this script)",
    )
    group.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N or mps")
    group.add_argument("--dtype", default="auto", choices=["auto", *DTYPE_NAMES],
                       help="auto: bfloat16 on CUDA, or float32")  # fmt: skip
    group.add_argument("--attn-impl", choices=["torch", "triton"], help="attention implementation (default: config's)")
    group.add_argument("--weight-quantization", choices=["int8", "int4"], help="quantize the weights as they load")


def one_line(error: BaseException) -> str:
    """An exception's message on one line (transformers' messages often span several)."""
    return " ".join(str(error).split()) or type(error).__name__
