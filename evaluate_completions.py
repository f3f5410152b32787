"""Measure a model on code it never saw: held-out loss, and how often its completions of Python function headers
parse as Python after the card's post-processing.

    python evaluate_completions.py                   # the demo model, on its held-out standard-library files
    python evaluate_completions.py --model PATH      # any model folder (the real weights too)

The held-out files are those train_demo.py set aside. Each prompt is the header of one module-level function
(its `def` line(s), decorators dropped) after up to CONTEXT_CHARS of the code before it in its file, as an editor
would send it; the model completes it with the card's sampling settings and post-processing
(stop at <|endoftext|>, truncate at stop sequences, trim trailing whitespace); the result counts when
`ast.parse(header + completion)` accepts it.
"""

import argparse
import ast
import json
import math
import random
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from generate import Completer, Settings
from train_demo import ROOT, read_text, stdlib_sources

CONTEXT_CHARS = 1000


def function_prompts(files: list[Path], count: int, seed: int) -> list[tuple[str, str]]:
    """`count` (prompt, header) pairs for module-level functions of `files`: the header (ending in a newline), and
    the prompt that ends with it, starting at a line boundary at most CONTEXT_CHARS before it."""
    prompts = []
    for path in files:
        source = read_text(path)
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        lines = source.splitlines(keepends=True)
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.body[0].lineno > node.lineno:
                header = "".join(lines[node.lineno - 1 : node.body[0].lineno - 1])
                if header.rstrip().endswith(":"):
                    before = "".join(lines[: node.lineno - 1])
                    if len(before) > CONTEXT_CHARS:
                        before = before[-CONTEXT_CHARS:]
                        before = before[before.find("\n") + 1 :]
                    prompts.append((before + header, header))
    return random.Random(seed).sample(prompts, min(count, len(prompts)))


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


def parse_rate(completer: Completer, prompts, max_new_tokens: int, batch_size: int, seed: int) -> dict:
    """How often header + completion parses, for the (prompt, header) pairs of `function_prompts`, completed as
    generate.py completes: the card's sampling settings (Settings' defaults) and post-processing."""
    settings = Settings(max_new_tokens=max_new_tokens)
    transformers.set_seed(seed)
    parsed, examples = 0, []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        completions = completer.complete([prompt for prompt, _ in batch], settings)
        for (_, header), completion in zip(batch, completions):
            try:
                ast.parse(header + completion.text)
                parsed += 1
            except SyntaxError:
                pass
            if len(examples) < 3:
                examples.append(header + completion.text)
    return {"parse_rate": parsed / len(prompts), "prompts": len(prompts), "examples": examples}


def evaluate(model_path: Path, held_out_files: list[Path], seed: int = 0, prompts: int = 100) -> dict:
    model = AutoModelForCausalLM.from_pretrained(model_path, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=True)
    loss = held_out_loss(model, tokenizer, held_out_files)
    completer = Completer(model, tokenizer)
    report = parse_rate(completer, function_prompts(held_out_files, prompts, seed), max_new_tokens=128, batch_size=16,
                        seed=seed)  # fmt: skip
    return {"held_out_loss": round(loss, 4), "held_out_perplexity": round(math.exp(loss), 2), **report}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "demo")
    parser.add_argument("--prompts", type=int, default=100, help="function headers to complete")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    _, held_out_files = stdlib_sources()
    print(json.dumps(evaluate(args.model, held_out_files, args.seed, args.prompts), indent=2))


if __name__ == "__main__":
    main()
