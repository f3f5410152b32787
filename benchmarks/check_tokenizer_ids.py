"""Compare the ids of ReplitLMTokenizer and ReplitLMTokenizerFast with those of sentencepiece 0.1.99, the release the
model was trained with, on thousands of real source files.

sentencepiece 0.1.99 runs in its own Python (it cannot share a process with a newer release):

    python3 -m venv /tmp/sp099 && /tmp/sp099/bin/pip install sentencepiece==0.1.99
    python benchmarks/check_tokenizer_ids.py --reference-python /tmp/sp099/bin/python [--files 10000] [--no-fast]

It prints the machine, the library versions, and for each class how many files (and tokens) differ from 0.1.99.
The files are a fixed sample of the `.py` files of the Python standard library and of the installed packages (so
the sample changes when packages are installed). `--also old/replit_lm_tokenizer.py` checks another version of the
module on the same files, e.g. to compare before and after a change.
"""

import argparse
import importlib.util
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from replit_tools.options import at_least  # noqa: E402
DEFAULT_SPIECE = ROOT.parent / "shared" / "replit-code-v1-3b" / "spiece.model"
SOURCE_DIRS = [Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])]
MAX_FILE_BYTES = 1_000_000


def find_files(count, seed=0):
    """A fixed sample of `count` non-empty UTF-8 `.py` files (whole files, up to 1 MB each)."""
    paths = []
    for directory in SOURCE_DIRS:
        for dirpath, dirnames, filenames in os.walk(directory):
            dirnames.sort()
            paths += [Path(dirpath, name) for name in sorted(filenames) if name.endswith(".py")]
    random.Random(seed).shuffle(paths)
    texts = []
    for path in paths:
        try:
            if path.stat().st_size > MAX_FILE_BYTES:
                continue
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text.strip():
            texts.append((str(path), text))
            if len(texts) == count:
                break
    return texts


def emit_reference(spiece):
    """Run under sentencepiece 0.1.99: read a JSON list of texts on stdin, write their ids as JSON."""
    import sentencepiece as spm

    texts = json.load(sys.stdin)
    sp = spm.SentencePieceProcessor(model_file=spiece)
    json.dump({"sentencepiece": spm.__version__, "ids": [sp.encode(text) for text in texts]}, sys.stdout)


def reference_ids(python, spiece, texts):
    result = subprocess.run(
        [python, __file__, "--emit-reference", "--spiece", spiece],
        input=json.dumps(texts),
        capture_output=True,
        text=True,
        check=True,
    )
    reference = json.loads(result.stdout)
    if reference["sentencepiece"] != "0.1.99":
        sys.exit(f"{python} has sentencepiece {reference['sentencepiece']}, not 0.1.99")
    return reference["ids"]


def compare(name, encode, texts, expected):
    start = time.perf_counter()
    ids = [encode(text) for text in texts]
    seconds = time.perf_counter() - start
    differing = [i for i, (got, want) in enumerate(zip(ids, expected)) if got != want]
    tokens = sum(map(len, expected))
    # Tokens that differ: the length of the two id lists outside their common prefix and suffix.
    changed = 0
    for i in differing:
        got, want = ids[i], expected[i]
        prefix = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        suffix = 0
        while suffix < min(len(got), len(want)) - prefix and got[-1 - suffix] == want[-1 - suffix]:
            suffix += 1
        changed += len(want) - prefix - suffix
    print(
        f"{name:24}\n    {len(differing):6} of {len(texts)} files differ ({100 * len(differing) / len(texts):.2f}%), "
        f"spans of {changed} of {tokens} tokens; {seconds:.1f} s"
    )
    return differing


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spiece", default=str(DEFAULT_SPIECE))
    parser.add_argument("--reference-python", help="a Python with sentencepiece 0.1.99")
    parser.add_argument("--files", type=at_least(1), default=10_000)
    parser.add_argument("--no-fast", action="store_true", help="check only ReplitLMTokenizer")
    parser.add_argument("--also", metavar="FILE", help="another replit_lm_tokenizer.py to check on the same files")
    parser.add_argument("--show", type=int, default=0, help="print the paths of up to this many differing files")
    parser.add_argument("--emit-reference", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.emit_reference:
        return emit_reference(args.spiece)
    if not args.reference_python:
        parser.error("--reference-python is required")
    if not shutil.which(args.reference_python):
        parser.error(f"--reference-python {args.reference_python}: no such program")

    import sentencepiece as spm
    import tokenizers
    import transformers

    from quantization import cpu_model
    from replit_lm_tokenizer import ReplitLMTokenizer, ReplitLMTokenizerFast

    files = find_files(args.files)
    paths, texts = [path for path, _ in files], [text for _, text in files]
    size = sum(len(text.encode("utf-8")) for text in texts)
    print(f"{cpu_model()}, {os.cpu_count()} logical CPUs; Python {platform.python_version()}")
    print(
        f"sentencepiece {spm.__version__}, tokenizers {tokenizers.__version__}, transformers {transformers.__version__}"
    )
    print(f"{len(texts)} files, {size / 1e6:.1f} MB, from {', '.join(map(str, SOURCE_DIRS))}")
    expected = reference_ids(args.reference_python, args.spiece, texts)
    tokenizers_to_check = [("ReplitLMTokenizer", ReplitLMTokenizer(vocab_file=args.spiece))]
    if not args.no_fast:
        tokenizers_to_check.append(("ReplitLMTokenizerFast", ReplitLMTokenizerFast(vocab_file=args.spiece)))
    if args.also:
        spec = importlib.util.spec_from_file_location("other_replit_lm_tokenizer", args.also)
        other = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(other)
        tokenizers_to_check.append((f"{args.also}: ReplitLMTokenizer", other.ReplitLMTokenizer(vocab_file=args.spiece)))
        if not args.no_fast:
            fast = other.ReplitLMTokenizerFast(vocab_file=args.spiece)
            tokenizers_to_check.append((f"{args.also}: ReplitLMTokenizerFast", fast))
    raw = spm.SentencePieceProcessor(model_file=args.spiece)
    compare(f"raw sentencepiece {spm.__version__}", raw.encode, texts, expected)
    for name, tokenizer in tokenizers_to_check:
        differing = compare(name, lambda text: tokenizer.encode(text, split_special_tokens=True), texts, expected)
        for i in differing[: args.show]:
            print("   ", paths[i])


if __name__ == "__main__":
    main()
