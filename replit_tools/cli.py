"""Code completion from the command line: `python3 generate.py` at the repository root runs `main`.

    python3 generate.py "def fibonacci(n):"                   # the embedded demo model (demo/)
    python3 generate.py --model ~/replit-code-v1-3b --greedy --max-new-tokens 64 "def fibonacci(n):"
    python3 generate.py --file snippet.py --stream            # a prompt from a file; --file - reads stdin
    python3 generate.py --json "import os" "def main():"      # several prompts, one batch, machine-readable

The model card's settings are the defaults and its post-processing is applied (see docs/completion.md).
"""

import argparse
import os
import json
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path

# Only what parsing needs is imported here; the model's modules (torch, transformers: seconds) load in `run`.
from .options import (
    DEFAULT_STOP_SEQUENCES,
    CompletionError,
    OneLineErrorParser,
    Settings,
    add_model_arguments,
    one_line,
    reject_empty,
)


def unescape(text: str) -> str:
    """`\\n`, `\\r`, `\\t` and `\\\\` in a stop sequence given on the command line, as the characters they name."""
    escapes = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\"}
    return re.sub(r"\\([nrt\\])", lambda match: escapes[match.group(1)], text)


def read_prompt_file(name: str) -> str:
    """A prompt file (`-`: standard input), bytes for bytes: CRLF and trailing newlines are kept."""
    try:
        data = sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
    except OSError as error:
        raise CompletionError(f"cannot read prompt file {name}: {error.strerror}") from error
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise CompletionError(f"prompt file {name} is not UTF-8 text") from error


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = OneLineErrorParser(
        description="Complete code with replit-code-v1-3b, with the model card's sampling and post-processing.",
        epilog="Exit status: 0 on success, 1 when the completion fails (a one-line error on stderr), "
        "2 for a bad command line.",
    )
    parser.add_argument("prompts", nargs="*", metavar="PROMPT", help="code to complete; several are one batch")
    parser.add_argument("--file", action="append", default=[], metavar="PATH",
                        help="read a prompt from a file, - for standard input (repeatable)")  # fmt: skip
    add_model_arguments(parser)
    card = Settings()  # the model card's settings
    sampling = parser.add_argument_group("generation (defaults: the model card's)")
    sampling.add_argument("--max-new-tokens", type=int, default=card.max_new_tokens, metavar="N",
                          help=f"token budget of each completion (default {card.max_new_tokens})")  # fmt: skip
    sampling.add_argument("--temperature", type=float, default=card.temperature,
                          help=f"default {card.temperature}; 0 means greedy")  # fmt: skip
    sampling.add_argument("--top-p", type=float, default=card.top_p, help=f"nucleus sampling (default {card.top_p})")
    sampling.add_argument("--top-k", type=int, default=card.top_k, help=f"default {card.top_k}; 0 disables top-k")
    sampling.add_argument("--greedy", action="store_true", help="no sampling: always the most likely token")
    sampling.add_argument("-n", "--num-completions", type=int, default=1, metavar="N", help="completions per prompt")
    sampling.add_argument("--seed", type=int, help="seed the sampling, for repeatable completions")
    sampling.add_argument("--stop", action="append", metavar="TEXT",
                          help="stop sequence, replacing the defaults (repeatable; \\n, \\t, \\r escapes); "
                          "default: " + " ".join(repr(s) for s in DEFAULT_STOP_SEQUENCES))  # fmt: skip
    sampling.add_argument("--no-stop", action="store_true", help="no stop sequences: only end-of-text and the budget")
    output = parser.add_argument_group("output")
    output.add_argument("--stream", action="store_true", help="print the completion as it is generated")
    output.add_argument("--json", action="store_true",
                        help="print one JSON object: completions, stop reasons, token counts, timing")  # fmt: skip
    args = parser.parse_args(argv)
    if args.stop and args.no_stop:
        parser.error("--stop and --no-stop exclude each other")
    if args.stream and args.json:
        parser.error("--stream and --json exclude each other")
    return args


def settings_from_arguments(args: argparse.Namespace) -> Settings:
    if args.no_stop:
        stop_sequences = ()
    elif args.stop:
        stop_sequences = tuple(unescape(stop) for stop in args.stop)
    else:
        stop_sequences = DEFAULT_STOP_SEQUENCES
    return Settings(
        max_new_tokens=args.max_new_tokens,
        greedy=args.greedy,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        num_completions=args.num_completions,
        stop_sequences=stop_sequences,
        seed=args.seed,
    )


class _PrintingListener:
    """A completion.StreamListener (all three of its methods), without importing torch to name the base class."""

    def __init__(self, headers: bool):
        self.headers = headers

    def begin(self, prompt_index, index):
        if self.headers:
            print(header(prompt_index, index), flush=True)

    def text(self, piece):
        sys.stdout.write(piece)
        sys.stdout.flush()

    def end(self, completion):
        print(flush=True)


def header(prompt_index: int, index: int) -> str:
    return f"=== prompt {prompt_index + 1}, completion {index + 1} ==="


def run(args: argparse.Namespace):
    prompts = args.prompts + [read_prompt_file(name) for name in args.file]
    reject_empty(prompts)  # before torch and the model load: a bad command line fails at once
    settings = settings_from_arguments(args)
    from .loading import load_from_arguments, quiet_libraries

    quiet_libraries()
    started = time.perf_counter()
    completer = load_from_arguments(args)
    loaded = time.perf_counter()
    several = len(prompts) * settings.num_completions > 1
    if args.stream:
        completer.stream(prompts, settings, _PrintingListener(headers=several))
        return
    completions = completer.complete(prompts, settings)
    finished = time.perf_counter()
    if args.json:
        generated = sum(completion.completion_tokens for completion in completions)
        if not settings.do_sample:  # greedy copies of a completion are computed once: a speed counts them once
            generated //= settings.num_completions
        timing = {
            "load_seconds": round(loaded - started, 3),
            "generate_seconds": round(finished - loaded, 3),
            "tokens_per_second": round(generated / max(finished - loaded, 1e-9), 1),
        }
        result = {"model": args.model, "completions": [asdict(c) for c in completions], "timing": timing}
        print(json.dumps(result, indent=2))
        return
    for completion in completions:
        if several:
            print(header(completion.prompt_index, completion.index))
        print(completion.text)


def main(argv=None) -> int:
    args = parse_arguments(argv)
    try:
        run(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader left (`| head`): no error, and nothing more to write at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a shell reports a process ended by SIGPIPE
    except Exception as error:  # every failure is one line for the user, never a traceback
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 1
    return 0

