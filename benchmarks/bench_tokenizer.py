"""Encode and decode throughput of ReplitLMTokenizer (slow), ReplitLMTokenizerFast and raw SentencePiece.

Two workloads: about 1 MB of real source files found on this machine (Python, C headers, JavaScript, shell, ...)
encoded as one text, and a batch of 1,000 snippets cut from it. Prints the machine, the library versions, the
throughput of each tokenizer side by side, and how often their ids agree.

    python benchmarks/bench_tokenizer.py [--spiece ../shared/replit-code-v1-3b/spiece.model]
"""

import argparse
import os
import platform
import random
import sys
import sysconfig
import time
from collections import Counter
from pathlib import Path

import sentencepiece as spm
import tokenizers
import transformers


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quantization import cpu_model  # noqa: E402
from replit_lm_tokenizer import ReplitLMTokenizer, ReplitLMTokenizerFast  # noqa: E402
from replit_tools.options import at_least  # noqa: E402


SOURCE_DIRS = [Path(sysconfig.get_paths()["purelib"]), Path("/usr/include"), Path("/usr/share"), Path("/usr/lib")]
EXTENSIONS = (".py", ".h", ".c", ".cpp", ".hpp", ".js", ".sh", ".pl", ".go", ".rs", ".html", ".css", ".json", ".md")
MAX_FILE_BYTES = 32_000  # many small pieces of many files rather than a few big ones


def find_sources(per_extension=400):
    """Up to `per_extension` readable UTF-8 files of each extension, in a stable order."""
    found = {extension: [] for extension in EXTENSIONS}
    for directory in SOURCE_DIRS:
        for dirpath, dirnames, filenames in os.walk(directory):
            dirnames.sort()
            for name in sorted(filenames):
                extension = os.path.splitext(name)[1]
                if extension in found and len(found[extension]) < per_extension:
                    try:
                        text = Path(dirpath, name).read_text(encoding="utf-8")
                    except (OSError, UnicodeDecodeError):
                        continue
                    if text.strip():
                        found[extension].append((extension, text[:MAX_FILE_BYTES]))
    return found


def build_corpus(target_bytes):
    """Round-robin over the extensions until `target_bytes` of UTF-8 text."""
    found = find_sources()
    files, size = [], 0
    queues = {extension: iter(texts) for extension, texts in found.items() if texts}
    while queues and size < target_bytes:
        for extension in list(queues):
            item = next(queues[extension], None)
            if item is None:
                del queues[extension]
                continue
            files.append(item)
            size += len(item[1].encode("utf-8"))
            if size >= target_bytes:
                break
    return files


def best_time(function, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spiece", type=Path, default=ROOT.parent / "shared" / "replit-code-v1-3b" / "spiece.model")
    parser.add_argument("--corpus-bytes", type=at_least(1), default=1_000_000)
    parser.add_argument("--snippets", type=at_least(1), default=1000)
    parser.add_argument("--repeat", type=at_least(1), default=5, help="best of this many runs")
    args = parser.parse_args()
    if not args.spiece.is_file():
        parser.error(f"no spiece.model at {args.spiece}: give the real model's with --spiece PATH")
    transformers.logging.set_verbosity_error()  # the corpus is longer than model_max_length, on purpose

    files = build_corpus(args.corpus_bytes)
    text = "".join(content for _, content in files)
    rng = random.Random(0)
    snippets = []
    for _ in range(args.snippets):
        start = rng.randrange(len(text) - 2000)
        snippets.append(text[start : start + rng.randrange(100, 2000)])

    sp = spm.SentencePieceProcessor(model_file=str(args.spiece))
    slow = ReplitLMTokenizer(vocab_file=str(args.spiece))
    fast = ReplitLMTokenizerFast(vocab_file=str(args.spiece))

    print(f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}")
    print(
        f"versions: transformers {transformers.__version__}, tokenizers {tokenizers.__version__}, "
        f"sentencepiece {spm.__version__}"
    )
    mix = Counter(extension for extension, _ in files)
    kinds = ", ".join(f"{count} {extension}" for extension, count in mix.most_common())
    print(f"corpus: {len(text.encode()) / 1e6:.2f} MB from {len(files)} files ({kinds})")
    snippet_mb = sum(len(s.encode()) for s in snippets) / 1e6
    print(f"batch: {len(snippets)} snippets of 100 to 2000 characters, {snippet_mb:.2f} MB in all")

    text_mb = len(text.encode()) / 1e6
    ids = sp.encode(text)
    batch_ids = sp.encode(snippets)
    encoders = {
        "sentencepiece": (lambda: sp.encode(text), lambda: sp.encode(snippets)),
        "ReplitLMTokenizer": (lambda: slow.encode(text), lambda: slow(snippets)["input_ids"]),
        "ReplitLMTokenizerFast": (lambda: fast.encode(text), lambda: fast(snippets)["input_ids"]),
    }
    decoders = {
        "sentencepiece": (lambda: sp.decode(ids), lambda: sp.decode(batch_ids)),
        "ReplitLMTokenizer": (lambda: slow.decode(ids), lambda: slow.batch_decode(batch_ids)),
        "ReplitLMTokenizerFast": (lambda: fast.decode(ids), lambda: fast.batch_decode(batch_ids)),
    }
    results = {}
    for name in encoders:
        (encode_text, encode_batch), (decode_text, decode_batch) = encoders[name], decoders[name]
        results[name] = [
            text_mb / best_time(encode_text, args.repeat),
            snippet_mb / best_time(encode_batch, args.repeat),
            text_mb / best_time(decode_text, args.repeat),
            snippet_mb / best_time(decode_batch, args.repeat),
        ]

    print(f"\nthroughput in MB of text per second (best of {args.repeat}); in brackets, time relative to sentencepiece")
    columns = ["encode 1 MB", "encode batch", "decode 1 MB", "decode batch"]
    print(f"{'':<22}" + "".join(f"{column:>22}" for column in columns))
    baseline = results["sentencepiece"]
    for name, row in results.items():
        cells = [f"{value:8.2f} ({base / value:4.2f}x)" for value, base in zip(row, baseline)]
        print(f"{name:<22}" + "".join(f"{cell:>22}" for cell in cells))

    # sentencepiece >= 0.2.2 scores user-defined pieces and breaks ties unlike the release the model was trained with,
    # which the tokenizers restore (see replit_lm_tokenizer._as_trained): its raw ids are the speed baseline only.
    slow_files = [slow.encode(content) for _, content in files]
    raw_same = sum(ids == sp.encode(content) for ids, (_, content) in zip(slow_files, files))
    fast_same = sum(ids == fast.encode(content) for ids, (_, content) in zip(slow_files, files))
    fast_snippets = sum(a == b for a, b in zip(fast(snippets)["input_ids"], slow(snippets)["input_ids"]))
    print(f"\nReplitLMTokenizer's ids == raw sentencepiece {spm.__version__}'s: {raw_same}/{len(files)} files")
    print(
        f"ReplitLMTokenizerFast's ids == ReplitLMTokenizer's: {fast_same}/{len(files)} files, "
        f"{fast_snippets}/{len(snippets)} snippets (they may differ among equal-score segmentations, see docs/tokenizer.md)"
    )

if __name__ == "__main__":
    main()
