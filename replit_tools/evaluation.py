"""Measure a model on code it never saw: held-out loss, and how often its completions of Python function headers
parse as Python after the card's post-processing.

    python3 evaluate.py held-out                   # the demo model, on its held-out standard-library files
    python3 evaluate.py held-out --model PATH      # any model folder (the real weights too)
    python3 evaluate.py held-out --original-code   # the same measure for the code that follows each header
    python3 evaluate.py held-out --headers-only    # 20 headers alone as prompts, greedy: what a newcomer tries first

`held-out` is also what `python3 evaluate.py` runs without a command (with the same options), as it did before
evaluate.py had commands; HumanEval is `python3 evaluate.py humaneval` (replit_tools/humaneval.py).

The held-out files are those the demo's training (demo.py) set aside. Each prompt is the header of one module-level function
(its `def` line(s)) after the module-level statements of its file that start at most CONTEXT_CHARS before it (whole
statements, so that a prompt never starts inside a string), as an editor would send it; the model completes it
with the card's sampling settings and post-processing (stop at <|endoftext|>, truncate at stop sequences, trim
trailing whitespace); the result counts when `ast.parse(header + completion)` accepts it.

With --original-code the completions are instead the code that really follows each header in its file, cut at the
same token budget and post-processed the same way: how high the measure can go at that budget.

With --headers-only each prompt is the header alone, without the code before it and without its final newline, as a
newcomer types it (`python3 generate.py "def fibonacci(n):"`), completed greedily (the first completion anyone
sees) unless --sample is given; the report adds how many completions indent the body by four spaces and how many
repeat a line (the two ways the demo failed such prompts). It is also part of the demo's evaluation.json.
"""

import argparse
import ast
import io
import json
import math
import random
from pathlib import Path
from typing import NamedTuple

import torch
import transformers

from .completion import Completer, Settings
from .corpus import read_text, stdlib_sources
from .loading import load_completer, model_source, run_quietly
from .commands import held_out_arguments
from .postprocessing import finish_completion
from replit_lm.replit_lm_tokenizer import ReplitLMTokenizer

CONTEXT_CHARS = 1000


class FunctionPrompt(NamedTuple):
    prompt: str  # the code before the function (CONTEXT_CHARS at most), then its header
    header: str  # the function's `def` line(s), ending in a newline
    original: str  # the rest of the file after the header: the completion its author wrote, and more


def function_prompts(files: list[Path], count: int, seed: int) -> list[FunctionPrompt]:
    """`count` prompts for module-level functions of `files`: the header, after the module-level statements that
    start at most CONTEXT_CHARS before it (with decorators, the function's own statement starts before its header)."""
    prompts = []
    for path in files:
        source = read_text(path)
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        # Lines as ast numbers them (str.splitlines would also split at form feeds and other separators).
        lines = io.StringIO(source, newline="").readlines()
        line_starts = [0]  # character offset of each line
        for line in lines:
            line_starts.append(line_starts[-1] + len(line))
        # The context begins where a module-level statement (or its first decorator) does: never inside a string,
        # which the post-processing would then take the completion to be part of.
        statement_starts = [
            line_starts[min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))]) - 1]
            for node in tree.body
        ]
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.body[0].lineno > node.lineno:
                header = "".join(lines[node.lineno - 1 : node.body[0].lineno - 1])
                if header.rstrip().endswith(":"):
                    header_start = line_starts[node.lineno - 1]
                    in_reach = [s for s in statement_starts if header_start - CONTEXT_CHARS <= s < header_start]
                    context_start = min(in_reach, default=header_start)
                    original = "".join(lines[node.body[0].lineno - 1 :])
                    prompts.append(FunctionPrompt(source[context_start:header_start] + header, header, original))
    return random.Random(seed).sample(prompts, min(count, len(prompts)))


def header_prompts(files: list[Path], count: int, seed: int) -> list[FunctionPrompt]:
    """The prompts of `function_prompts` (the same functions) with the prompt cut to the header alone, without its
    final newline: `def name(args):` as typed on a command line. The header is the prompt, so that
    `header + completion` is what the user gets."""
    return [
        item._replace(prompt=item.header.rstrip("\r\n"), header=item.header.rstrip("\r\n"))
        for item in function_prompts(files, count, seed)
    ]


def first_body_indent(code: str) -> str | None:
    """The indentation of the first non-blank line after the first line of `code`, or None when there is none."""
    for line in code.splitlines()[1:]:
        if line.strip():
            return line[: len(line) - len(line.lstrip())]
    return None


def repeats_a_block(code: str, max_lines: int = 1, times: int = 3) -> bool:
    """Whether a block of 1 to `max_lines` non-blank lines comes `times` times in a row (blank lines between are
    ignored): the loops of a small model at greedy or near-greedy settings. With `max_lines` 1, a repeated line."""
    lines = [line for line in code.splitlines() if line.strip()]
    for size in range(1, max_lines + 1):
        for start in range(len(lines) - size * times + 1):
            block = lines[start : start + size]
            if all(lines[start + size * k : start + size * (k + 1)] == block for k in range(1, times)):
                return True
    return False


def parses(code: str) -> bool:
    try:
        ast.parse(code)
    except SyntaxError:
        return False
    return True


@torch.no_grad()
def held_out_loss(model, tokenizer, files: list[Path], seq_len: int = 256, max_windows: int = 200) -> float:
    """Mean next-token loss over consecutive windows of the held-out files joined by <|endoftext|>."""
    ids = []
    for path in files:
        ids += tokenizer.encode(read_text(path)) + [tokenizer.eos_token_id]
        if len(ids) >= seq_len * max_windows:
            break
    stream = torch.tensor(ids[: (len(ids) // seq_len) * seq_len]).view(-1, seq_len)[:max_windows]
    losses = [model(window[None], labels=window[None]).loss.item() for window in stream]
    return sum(losses) / len(losses)


def complete_all(completer: Completer, prompts, max_new_tokens: int, batch_size: int, seed: int,
                 greedy: bool = False) -> list[str]:  # fmt: skip
    """header + completion for each prompt, completed as generate.py completes: the card's sampling settings
    (Settings' defaults) or greedy, and the card's post-processing."""
    settings = Settings(max_new_tokens=max_new_tokens, greedy=greedy)
    transformers.set_seed(seed)
    results = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        completions = completer.complete([item.prompt for item in batch], settings)
        results += [item.header + completion.text for item, completion in zip(batch, completions)]
    return results


def parse_rate(completer: Completer, prompts, max_new_tokens: int, batch_size: int, seed: int,
               greedy: bool = False) -> dict:  # fmt: skip
    """How often header + completion parses, for the prompts of `function_prompts`, completed as generate.py
    completes: the card's sampling settings (Settings' defaults) and post-processing."""
    results = complete_all(completer, prompts, max_new_tokens, batch_size, seed, greedy)
    parsed = sum(parses(code) for code in results)
    return {"parse_rate": parsed / len(prompts), "prompts": len(prompts), "examples": results[:3]}


def headers_only(completer: Completer, files: list[Path], prompts: int = 20, seed: int = 0,
                 max_new_tokens: int = 128, greedy: bool = True) -> dict:  # fmt: skip
    """The header-alone measure (`header_prompts`): how many completions parse, indent the body by four spaces
    (the header is at column 0), and repeat a line; with every completion, for reading."""
    items = header_prompts(files, prompts, seed)
    results = complete_all(completer, items, max_new_tokens, batch_size=16, seed=seed, greedy=greedy)
    return {
        "parsed": sum(parses(code) for code in results),
        "four_space_bodies": sum(first_body_indent(code) == "    " for code in results),
        "repeating": sum(repeats_a_block(code) for code in results),
        # A loop of two or three lines can stop at a line's end and parse; this counts only loop-free code.
        "parsed_without_loops": sum(parses(code) and not repeats_a_block(code, max_lines=3) for code in results),
        "prompts": len(items),
        "greedy": greedy,
        "completions": results,
    }


def original_code_parse_rate(tokenizer, prompts, max_new_tokens: int) -> float:
    """`parse_rate` with each function's own code as the completion: the file's tokens after the header, cut at
    `max_new_tokens` and post-processed like a generated completion."""
    parsed = 0
    for item in prompts:
        # A few characters per token at least: encoding the rest of a long file is not needed.
        ids = tokenizer.encode(item.original[: 16 * max_new_tokens])
        completion = finish_completion(tokenizer, ids, prompt=item.prompt, max_new_tokens=max_new_tokens)
        parsed += parses(item.header + completion.text)
    return parsed / len(prompts)


def evaluate(model_path: Path, held_out_files: list[Path], seed: int = 0, prompts: int = 100,
             max_new_tokens: int = 128) -> dict:  # fmt: skip
    completer = load_completer(model_path, device="cpu")
    loss = held_out_loss(completer.model, completer.tokenizer, held_out_files)
    report = parse_rate(completer, function_prompts(held_out_files, prompts, seed), max_new_tokens=max_new_tokens,
                        batch_size=16, seed=seed)  # fmt: skip
    alone = headers_only(completer, held_out_files, seed=seed, max_new_tokens=max_new_tokens)
    alone.pop("completions")
    return {"held_out_loss": round(loss, 4), "held_out_perplexity": round(math.exp(loss), 2), **report,
            "headers_only": alone}  # fmt: skip


def main(argv=None) -> int:
    return run_command(held_out_arguments(argv))


def run_command(args: argparse.Namespace) -> int:
    """evaluate.py held-out after its command line was read (commands.held_out_arguments)."""
    report = run_quietly(run, args)
    if report is None:
        return 1
    print(json.dumps(report, indent=2))
    return 0


def run(args: argparse.Namespace) -> dict:
    _, held_out_files = stdlib_sources()
    if args.headers_only:
        completer = load_completer(args.model, device="cpu")
        report = headers_only(completer, held_out_files, args.prompts, args.seed, args.max_new_tokens,
                              greedy=not args.sample)  # fmt: skip
        for number, code in enumerate(report["completions"], start=1):
            print(f"--- {number} ({'parses' if parses(code) else 'does not parse'})\n{code}")
        report["completions"] = len(report["completions"])
    elif args.original_code:
        tokenizer = ReplitLMTokenizer.from_pretrained(model_source(args.model))
        prompts = function_prompts(held_out_files, args.prompts, args.seed)
        rate = original_code_parse_rate(tokenizer, prompts, args.max_new_tokens)
        report = {"original_code_parse_rate": rate, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens}
    else:
        report = evaluate(args.model, held_out_files, args.seed, args.prompts, args.max_new_tokens)
    return report

