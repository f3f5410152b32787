"""The command lines of serve.py, export.py and evaluate.py, importable without torch: `--help` and a bad command
line answer at once, before the seconds torch and transformers take to import (generate.py's are in options.py)."""

import argparse
import math
import os
import urllib.parse
from pathlib import Path

from . import DEMO_MODEL
from .cli import unescape
from .options import SAMPLING_TEMPERATURE_FROM, SEEDS, OneLineErrorParser, Settings, add_model_arguments
from .sandbox import Limits

# ----- export.py ---------------------------------------------------------------------------------------------------

FORMATS = {"mpt": ("f32", "bf16"), "gguf": ("f32", "bf16", "q8_0", "q4_0")}
DEFAULT_TYPE = {"mpt": "f32", "gguf": "bf16"}


def export_arguments(argv=None) -> argparse.Namespace:
    parser = OneLineErrorParser(
        error_status=1,
        description="Export replit-code-v1-3b as a transformers MPT folder (vLLM, TGI) or a GGUF file (llama.cpp).",
        epilog="Exit status: 0 on success, 1 on any error (one line on stderr). See docs/export.md.",
    )
    parser.add_argument(
        "--model",
        default=str(DEMO_MODEL),
        help="a model folder as generate.py --model takes it (either checkpoint layout), or a Hub id "
        "(default: the embedded demo model)",
    )
    parser.add_argument("--to", required=True, choices=sorted(FORMATS), help="mpt: a folder; gguf: one file")
    parser.add_argument("output", type=Path, help="the folder (mpt) or file (gguf) to write; must not exist")
    parser.add_argument(
        "--type",
        help="weights: f32 or bf16 for mpt (default f32); f32, bf16, q8_0 or q4_0 for gguf (default bf16)",
    )
    args = parser.parse_args(argv)
    if not str(args.output).strip() or str(args.output) == ".":  # Path("") is ".", which "already exists"
        parser.error("the output path is empty: name the folder (mpt) or file (gguf) to write")
    args.type = (DEFAULT_TYPE[args.to] if args.type is None else args.type).lower()
    if args.type not in FORMATS[args.to]:
        parser.error(f"--type {args.type} is not available for {args.to}: use one of {', '.join(FORMATS[args.to])}")
    return args


# ----- serve.py ----------------------------------------------------------------------------------------------------

API_KEY_ENV = "REPLIT_API_KEY"
SERVER_DESCRIPTION = (
    "An OpenAI-compatible completion server for replit-code-v1-3b: POST /v1/completions (plain and streaming), "
    "GET /v1/models and GET /health, on FastAPI and uvicorn."
)


def server_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=SERVER_DESCRIPTION)
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port)")
    parser.add_argument("--served-model-name", help="the model's id in the API (default: --model's last part)")
    access = parser.add_argument_group("access")
    access.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV) or None,
        help=f"require 'Authorization: Bearer KEY' on /v1/ (default: the environment variable {API_KEY_ENV})",
    )
    access.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="listen beyond localhost without an API key (anyone who reaches the port can use the model)",
    )
    access.add_argument(
        "--cors-origin",
        action="append",
        metavar="ORIGIN",
        help="let web pages of ORIGIN (scheme://host[:port], e.g. http://localhost:5173) call the API from a "
        "browser; repeatable, or '*' for any page (default: none)",
    )
    limits = parser.add_argument_group("limits")
    limits.add_argument("--max-batch-size", type=int, default=16, help="most completions in one batch (16)")
    limits.add_argument(
        "--max-queued", type=int, default=256, help="most requests waiting for the model; more get HTTP 429 (256)"
    )
    limits.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body; HTTP 413 (1 MiB)")
    limits.add_argument(
        "--read-timeout",
        type=float,
        default=30,
        help="seconds for a client to send a whole request, headers and body (30); then HTTP 408 and closed",
    )
    limits.add_argument(
        "--timeout-keep-alive", type=int, default=5, help="seconds an idle keep-alive connection stays open (5)"
    )
    limits.add_argument("--backlog", type=int, default=2048, help="connections waiting to be accepted (2048)")
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="uvicorn's log on standard error (info: one line per request)",
    )
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:  # socket.bind raises OverflowError, which is no OSError: a traceback
        parser.error(f"--port must be 0 to 65535 (0: any free port), got {args.port}")
    for name in ("max_batch_size", "max_queued", "max_body_bytes", "read_timeout", "timeout_keep_alive", "backlog"):
        if not 0 < getattr(args, name) < math.inf:  # NaN too
            parser.error(f"--{name.replace('_', '-')} must be positive")
    for origin in args.cors_origin or []:
        parts = urllib.parse.urlsplit(origin)
        # A browser's Origin has no path, not even "/": an origin written with one would silently never match.
        exact = parts.scheme in ("http", "https") and parts.netloc and origin == f"{parts.scheme}://{parts.netloc}"
        if origin != "*" and not exact:
            parser.error(f"--cors-origin {origin!r} is not an origin: scheme://host[:port] without a path, or '*'")
    key = args.api_key
    # An empty key would be matched by a bare "Bearer"; a header carries printable ASCII only, without the ends'
    # whitespace, so any other key could never be matched (and the openai client could not even send it).
    if key is not None and not (key and key.isascii() and key.isprintable() and key == key.strip()):
        parser.error(f"--api-key (or {API_KEY_ENV}) must be printable ASCII, not empty and not starting or ending "
                     "with a space")  # fmt: skip
    return args


# ----- evaluate.py -------------------------------------------------------------------------------------------------

HUMANEVAL_DESCRIPTION = (
    "HumanEval pass@k for a model folder: `python3 evaluate.py humaneval --model PATH` (docs/evaluation.md)."
)
HUMANEVAL_MAX_NEW_TOKENS = 384
# The options of the model and its generation: what --canonical does not use.
CANONICAL_IGNORES = ("model", "device", "dtype", "attn_impl", "weight_quantization", "samples", "greedy", "temperature",
                     "top_p", "top_k", "max_new_tokens", "stop", "batch_size", "seed")  # fmt: skip


def humaneval_arguments(argv=None) -> argparse.Namespace:
    parser = OneLineErrorParser(prog="evaluate.py humaneval", description=HUMANEVAL_DESCRIPTION,
                                 epilog="Exit status: 0 when the evaluation ran (whatever the score), 1 when it "
                                        "could not run, 2 for a bad command line.")  # fmt: skip
    add_model_arguments(parser)
    card = Settings()
    generation = parser.add_argument_group("generation (defaults: the model card's sampling settings)")
    generation.add_argument("-n", "--samples", type=int, default=1, metavar="N",
                            help="completions per problem: pass@k is reported for k in 1, 10, 100 up to N "
                                 "(default 1)")  # fmt: skip
    generation.add_argument("--greedy", action="store_true", help="greedy decoding (then -n must be 1)")
    generation.add_argument("--temperature", type=float, default=card.temperature, help=f"default {card.temperature}")
    generation.add_argument("--top-p", type=float, default=card.top_p, help=f"default {card.top_p}")
    generation.add_argument("--top-k", type=int, default=card.top_k, help=f"default {card.top_k}")
    generation.add_argument("--max-new-tokens", type=int, default=HUMANEVAL_MAX_NEW_TOKENS, metavar="N",
                            help="token budget of a completion; most stop earlier, at a stop sequence (default "
                                 f"{HUMANEVAL_MAX_NEW_TOKENS})")  # fmt: skip
    generation.add_argument("--stop", action="append", default=[], metavar="TEXT",
                            help="a stop sequence to add to the card's defaults (repeatable; \\n, \\t, \\r, \\\\ "
                                 "are read as the characters they name)")  # fmt: skip
    generation.add_argument("--batch-size", type=int, default=16, metavar="N",
                            help="sequences per generate call: several problems with all their samples "
                                 "(default 16)")  # fmt: skip
    generation.add_argument("--seed", type=int, default=0, help="generate call i is seeded with seed + i (default 0)")
    subset = parser.add_argument_group("problems (default: all 164)")
    subset.add_argument("--limit", type=int, metavar="N", help="the first N problems only")
    subset.add_argument("--problems", type=lambda text: [t.strip() for t in text.split(",") if t.strip()],
                        metavar="IDS", help="these problems only, e.g. HumanEval/0,HumanEval/5 (or 0,5)")  # fmt: skip
    subset.add_argument("--canonical", action="store_true",
                        help="run the problems' canonical solutions instead of a model: the harness's own check, "
                             "which scores 100%%")  # fmt: skip
    execution = parser.add_argument_group("execution (replit_tools/sandbox.py)")
    execution.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                           help="programs run at a time (default: the number of CPUs)")  # fmt: skip
    execution.add_argument("--timeout", type=float, default=Limits.timeout,
                           help="seconds of wall-clock and CPU time per program "
                                f"(default {Limits.timeout:g})")  # fmt: skip
    execution.add_argument("--memory-mb", type=int, default=Limits.memory_mb,
                           help=f"address-space limit per program, MB (default {Limits.memory_mb})")  # fmt: skip
    output = parser.add_argument_group("output")
    output.add_argument("--output", metavar="PATH", help="write the JSON report there")
    output.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    args = parser.parse_args(argv)
    for name, value, least in (("-n", args.samples, 1), ("--batch-size", args.batch_size, 1),
                               ("--workers", args.workers, 1), ("--limit", args.limit, 1)):  # fmt: skip
        if value is not None and value < least:
            parser.error(f"{name} must be at least {least}")
    for option, limit in (("--timeout", dict(timeout=args.timeout)), ("--memory-mb", dict(memory_mb=args.memory_mb))):
        try:
            Limits(**limit)
        except ValueError as error:
            parser.error(f"{option}: {error}")
    if not 0 <= args.seed < SEEDS:
        parser.error(f"--seed must be 0 to 2**32 - 1, got {args.seed}")
    if args.canonical:
        # The canonical solutions are run as they are: a model option would be read and silently do nothing.
        ignored = [action.option_strings[0] for action in parser._actions if action.dest in CANONICAL_IGNORES
                   and getattr(args, action.dest) != action.default]  # fmt: skip
        if ignored:
            parser.error(f"--canonical runs no model: {', '.join(ignored)} would do nothing")
    if args.samples > 1 and (args.greedy or 0 <= args.temperature < SAMPLING_TEMPERATURE_FROM or args.top_k == 1):
        # n identical completions: the pass@k of n > 1 would be a pass@1 that claims more.
        parser.error(f"-n {args.samples} with greedy decoding (--greedy, --temperature 0 or --top-k 1) gives "
                     f"{args.samples} identical completions: use -n 1")  # fmt: skip
    if args.problems == []:
        parser.error("--problems names no problem: give ids such as HumanEval/0,HumanEval/5 (or 0,5)")
    if args.output is not None:
        if not args.output.strip():
            parser.error("--output is empty: name the file to write the report to")
        # Checked now rather than after an evaluation of many minutes.
        output = Path(args.output)
        if output.is_dir() or not output.parent.is_dir():
            parser.error(f"--output {args.output}: " + ("a folder" if output.is_dir() else "no such folder"))
    args.stop = [unescape(text) for text in args.stop]
    return args


HELD_OUT_DESCRIPTION = (
    "Measure a model on code it never saw: held-out loss, and how often its completions of Python function headers "
    "parse as Python after the card's post-processing."
)


def held_out_arguments(argv=None) -> argparse.Namespace:
    parser = OneLineErrorParser(prog="evaluate.py held-out", description=HELD_OUT_DESCRIPTION)
    parser.add_argument("--model", type=Path, default=DEMO_MODEL)
    parser.add_argument("--prompts", type=int,
                        help="function headers to complete (default 100; 20 with --headers-only; the plain "
                             "report's headers-only part always takes 20)")  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=128, help="the token budget of a completion")
    parser.add_argument("--original-code", action="store_true",
                        help="measure the code that follows each header in its file instead of the model (with the "
                             "model's tokenizer)")  # fmt: skip
    parser.add_argument("--headers-only", action="store_true",
                        help="each prompt the header alone (no code before it, no final newline), greedy; prints "
                             "every completion")  # fmt: skip
    parser.add_argument("--sample", action="store_true",
                        help="with --headers-only: the card's sampling settings instead of greedy")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.prompts is None:
        args.prompts = 20 if args.headers_only else 100
    for name, value in (("--prompts", args.prompts), ("--max-new-tokens", args.max_new_tokens)):
        if value < 1:
            parser.error(f"{name} must be at least 1")
    if not 0 <= args.seed < SEEDS:  # transformers.set_seed refuses others, after the model and prompts are ready
        parser.error(f"--seed must be 0 to 2**32 - 1, got {args.seed}")
    if args.original_code and args.headers_only:
        parser.error("--original-code and --headers-only are two measures: give one")
    if args.sample and not args.headers_only:
        parser.error("--sample goes with --headers-only (the other measures sample with the card's settings)")
    return args
