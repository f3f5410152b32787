"""Build the embedded demo model in demo/ from scratch: a few-million-parameter ReplitLM trained on this machine.

    python3 -m replit_tools.demo                 # tokenizer + model + evaluation (docs/demo.md: how long it takes)
    python3 -m replit_tools.demo --steps 50 --stage2-steps 20     # a quick smoke run

The data is the standard library of the running Python (freely licensed, present on every machine), split by file
into train and held-out parts. Training has two stages: the first on random windows of the training files (each
followed by <|endoftext|>); the second, shorter, mostly on windows that start where a document starts, the
documents being every function, method and class of the training files moved to column 0 and ending in
<|endoftext|> (corpus.definition_documents), so that a `def` line at the start of a prompt gets a four-space
body that ends. The rest of the second stage's windows keep training on the files (random windows, and windows at
a file's start, where imports are).

The tokenizer is a SentencePiece Unigram model trained with the real model's recipe
(replit_tools/sentencepiece_recipe.py); the model is a small ReplitLM in the exact format of replit-code-v1-3b. Everything is
seeded (the tokenizer's sampling, the initialisation, the data order); another Python (another standard library),
torch or sentencepiece gives another model of about the same quality.
"""

import argparse
import json
import math
import os
import shutil
import sysconfig
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import CODE_FILES, DEMO_MODEL, ROOT
from .corpus import PACKAGE_LIST, definition_documents, package_sources, read_text, stdlib_sources
from .evaluation import evaluate
from .options import OneLineErrorParser
from .sentencepiece_recipe import RECIPE, train_sentencepiece
from .unlikelihood import LoopPenalty, file_first_lines, first_lines
from replit_lm.configuration_replit_lm import AUTO_MAP, ReplitLMConfig
from replit_lm.modeling_replit_lm import ReplitLM
from replit_lm.replit_lm_tokenizer import ReplitLMTokenizer

DEMO_SHAPE = dict(d_model=256, n_heads=8, n_layers=4, vocab_size=4096, max_seq_len=1024)
STAGE2 = dict(steps=3000, lr=1e-3, definitions=10, file_starts=2, docstrings="strip")
DOCSTRING_MODES = {"keep": (True,), "both": (True, False), "strip": (False,)}
"""The second stage's definition documents: as written, also without their docstrings, or only without them."""


def sentences(files: list[Path], max_chars: int = RECIPE["max_sentence_length"] // 4):
    """The files as SentencePiece training sentences: runs of whole lines (line breaks kept), each short enough for
    the trainer, which silently skips any sentence longer than max_sentence_length bytes (4 bytes a character at
    most in UTF-8)."""
    for path in files:
        chunk = ""
        for line in read_text(path).splitlines(keepends=True):
            if chunk and len(chunk) + len(line) > max_chars:
                yield chunk
                chunk = ""
            chunk += line[:max_chars]
        if chunk:
            yield chunk


def encode_files(tokenizer, files: list[Path]) -> torch.Tensor:
    """All files as one stream of ids, each followed by <|endoftext|> as documents were in training the original."""
    ids = []
    for path in tqdm(files, desc="tokenizing", unit="file", leave=False):
        ids.extend(tokenizer.encode(read_text(path)))
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def encode_documents(tokenizer, documents: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The documents as one stream of ids, each followed by <|endoftext|>, and where each document starts in it."""
    ids, starts = [], []
    for text in tqdm(documents, desc="tokenizing", unit="doc", leave=False):
        starts.append(len(ids))
        ids.extend(tokenizer.encode(text))
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(starts, dtype=torch.long)


def random_windows(stream: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - seq_len, (batch_size,), generator=generator)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])  # (batch, seq_len)


def windows_at(stream: torch.Tensor, starts: torch.Tensor, count: int, seq_len: int, generator) -> list[torch.Tensor]:
    """`count` windows that each begin where a randomly chosen document begins (one with a full window after it)."""
    starts = starts[starts <= len(stream) - seq_len]
    chosen = starts[torch.randint(0, len(starts), (count,), generator=generator)]
    return [stream[s : s + seq_len] for s in chosen.tolist()]


class StageTwoBatches:
    """The second stage's batches: `definitions` of each batch's windows start at a definition document's start,
    `file_starts` at a training file's start, and the rest are random windows of the training files."""

    def __init__(self, files, file_starts, defs, def_starts, batch_size, seq_len, definitions, file_starts_count):
        self.files, self.file_starts, self.defs, self.def_starts = files, file_starts, defs, def_starts
        self.batch_size, self.seq_len = batch_size, seq_len
        self.definitions, self.file_starts_count = definitions, file_starts_count

    def __call__(self, generator: torch.Generator) -> torch.Tensor:
        rows = windows_at(self.defs, self.def_starts, self.definitions, self.seq_len, generator)
        rows += windows_at(self.files, self.file_starts, self.file_starts_count, self.seq_len, generator)
        rest = self.batch_size - len(rows)
        if rest > 0:
            rows += list(random_windows(self.files, rest, self.seq_len, generator))
        return torch.stack(rows)


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, batches, steps, peak_lr, seed, desc="training", extra_loss=None) -> None:
    """A plain PyTorch loop: AdamW, bf16 autocast on the CPU, gradient clipping; progress with loss and tokens/s.
    `batches(generator)` gives each step's (batch, seq_len) ids, drawn with a generator seeded with `seed`;
    `extra_loss(model, generator)`, when given, is added to each step's loss (the unlikelihood stage's)."""
    generator = torch.Generator().manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.dim() == 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=peak_lr,
        betas=(0.9, 0.95),
    )
    model.train()
    progress = tqdm(range(steps), desc=desc, unit="step")
    start, tokens, smoothed, smoothed_extra = time.perf_counter(), 0, None, None
    smooth = lambda previous, value: value if previous is None else 0.98 * previous + 0.02 * value  # noqa: E731
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, peak_lr, warmup=min(200, steps // 10 + 1))
        batch = batches(generator)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(batch, labels=batch).loss
            extra = extra_loss(model, generator) if extra_loss is not None else None
        (loss if extra is None else loss + extra).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += batch.numel()
        smoothed = smooth(smoothed, loss.item())
        shown = dict(loss=f"{smoothed:.3f}", tok_s=f"{tokens / (time.perf_counter() - start):.0f}")
        if extra is not None:
            smoothed_extra = smooth(smoothed_extra, extra.item())
            shown["unlikelihood"] = f"{smoothed_extra:.3f}"
        progress.set_postfix(shown)
    model.eval()


@torch.no_grad()
def average_with(model, earlier: list[torch.Tensor]) -> None:
    """Set each parameter to the mean of its value and the earlier one (`earlier` in `model.parameters()` order).
    parameters() gives the tied embedding once; state_dict would name it twice and average it twice."""
    for param, before in zip(model.parameters(), earlier, strict=True):
        param.add_(before).div_(2)


def write_demo_folder(model, tokenizer, out: Path, training: list[dict]) -> None:
    """A complete model repository: weights, config, tokenizer, links to the root's code (never copies), and
    training.json: the stages that made the weights, oldest first. It is written beside `out` and then replaces it,
    so that `out` may be the folder the model came from (--from-model demo) and an interrupted write leaves it whole."""
    staging = out.with_name(out.name + ".new")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    model.config.auto_map = dict(AUTO_MAP)
    model.save_pretrained(staging, safe_serialization=True)
    # save_pretrained names the class (ReplitLM), which tools outside transformers' Auto classes cannot find
    # (`transformers serve` builds getattr(transformers, architectures[0])); the Auto class finds it via auto_map.
    config = json.loads((staging / "config.json").read_text())
    config["architectures"] = json.loads((ROOT / "config.json").read_text())["architectures"]
    (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(staging)
    # The root's tokenizer_config.json carries the auto_map and the real model's settings; keep them.
    tokenizer_config = json.loads((ROOT / "tokenizer_config.json").read_text())
    tokenizer_config["model_max_length"] = model.config.max_seq_len
    (staging / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    shutil.copy(ROOT / "generation_config.json", staging / "generation_config.json")
    (staging / "training.json").write_text(json.dumps(training, indent=2) + "\n")
    for name in CODE_FILES:
        (staging / name).unlink(missing_ok=True)  # a copy save_pretrained made (the tokenizer copies its module)
        (staging / name).symlink_to(os.path.relpath(ROOT / name, out.resolve()))
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)


def earlier_training(folder: Path) -> list[dict]:
    """The stages recorded in a model folder's training.json, to be continued; one unknown stage where it has none."""
    record = folder / "training.json"
    if record.is_file():
        return json.loads(record.read_text())
    return [dict(stage="unrecorded", model=str(folder))]


def file_starts(tokenizer, stream: torch.Tensor) -> torch.Tensor:
    """Where each file starts in a stream of `encode_files`: at 0 and after each <|endoftext|>."""
    ends = (stream == tokenizer.eos_token_id).nonzero().flatten() + 1
    return torch.cat([torch.zeros(1, dtype=torch.long), ends[ends < len(stream)]])


def stage_two_batches(tokenizer, train_files, held_out_files, train_stream, args):
    """The second stage's batch maker, with the definition documents and their number of tokens."""
    versions = DOCSTRING_MODES[args.stage2_docstrings]
    documents = [definition_documents(train_files, held_out_files, docstrings=keep) for keep in versions]
    # A function without a docstring is the same document in both versions: once.
    documents = list(dict.fromkeys(document for part in documents for document in part))
    defs, def_starts = encode_documents(tokenizer, documents)
    batches = StageTwoBatches(train_stream, file_starts(tokenizer, train_stream), defs, def_starts, args.batch_size,
                              args.seq_len, args.stage2_definitions, args.stage2_file_starts)  # fmt: skip
    return batches, documents, len(defs)


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """Refuse, before any work, what would fail or mislead later: folders that hold no model, counts out of range,
    an --average-with model of another shape or vocabulary."""
    def is_model_folder(folder: Path) -> bool:
        return (folder / "config.json").is_file() and (folder / "spiece.model").is_file()

    for flag in ("from_model", "average_with"):
        folder = getattr(args, flag)
        if folder is not None and not is_model_folder(folder):
            parser.error(f"--{flag.replace('_', '-')} {folder}: not a model folder (no config.json and spiece.model)")
    if (args.out.exists() or args.out.is_symlink()) and not is_model_folder(args.out):
        parser.error(f"--out {args.out}: exists and is not a model folder, which --out replaces; choose another name")
    for flag, least in (("threads", 1), ("batch_size", 1), ("seq_len", 2), ("steps", 0), ("stage2_steps", 0),
                        ("unlikelihood_steps", 0), ("stage2_definitions", 0), ("stage2_file_starts", 0)):  # fmt: skip
        if getattr(args, flag) < least:
            parser.error(f"--{flag.replace('_', '-')} must be at least {least}")
    if args.stage2_definitions + args.stage2_file_starts > args.batch_size:
        parser.error("--stage2-definitions plus --stage2-file-starts must fit in --batch-size (the rows of a batch)")
    mine = ReplitLMConfig.from_pretrained(args.from_model) if args.from_model else ReplitLMConfig(**DEMO_SHAPE)
    if args.seq_len > mine.max_seq_len:
        parser.error(f"--seq-len {args.seq_len} exceeds the model's max_seq_len ({mine.max_seq_len})")
    if args.average_with:
        theirs = ReplitLMConfig.from_pretrained(args.average_with)
        if any(getattr(mine, name) != getattr(theirs, name) for name in DEMO_SHAPE):
            parser.error(f"--average-with {args.average_with}: not a model of the same shape as the one trained here")
        # Known only now where --from-model gives the vocabulary; a model trained from scratch is checked at the end.
        start = ReplitLMTokenizer.from_pretrained(args.from_model) if args.from_model else None
        if start is not None and not same_vocabulary(start, args.average_with):
            parser.error(f"--average-with {args.average_with}: its vocabulary is not --from-model's")


def same_vocabulary(tokenizer, folder) -> bool:
    """Whether `tokenizer` and a model folder's map the same pieces to the same ids."""
    return tokenizer.get_vocab() == ReplitLMTokenizer.from_pretrained(folder).get_vocab()


def main():
    parser = OneLineErrorParser(prog="python3 -m replit_tools.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=DEMO_MODEL, help="folder to write (a model folder there is replaced)"
    )
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps of the first stage (the files)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of the first stage")
    parser.add_argument("--stage2-steps", type=int, default=STAGE2["steps"],
                        help="optimizer steps of the second stage (definitions at column 0); 0: none")  # fmt: skip
    parser.add_argument("--stage2-lr", type=float, default=STAGE2["lr"],
                        help="peak learning rate of the second stage")  # fmt: skip
    parser.add_argument("--stage2-definitions", type=int, default=STAGE2["definitions"],
                        help="windows of each second-stage batch that start at a definition's start")  # fmt: skip
    parser.add_argument("--stage2-file-starts", type=int, default=STAGE2["file_starts"],
                        help="windows of each second-stage batch that start at a file's start (the rest: random "
                             "windows of the files)")  # fmt: skip
    parser.add_argument("--stage2-docstrings", choices=sorted(DOCSTRING_MODES), default=STAGE2["docstrings"],
                        help="the definitions as written (keep), also without their docstrings (both), or only "
                             "without them (strip)")  # fmt: skip
    parser.add_argument("--save-stage1", type=Path, metavar="DIR",
                        help="also write the model after stage 1 there (a model folder), for --from-model")  # fmt: skip
    parser.add_argument("--from-model", type=Path, metavar="DIR",
                        help="skip stage 1: take the tokenizer and model of a model folder (a --save-stage1 folder, "
                             "or a finished demo) and run stage 2 on it; its training.json is carried on")  # fmt: skip
    parser.add_argument("--average-with-start", action="store_true",
                        help="end stage 2 with the mean of the weights it started from and those it ended with (a "
                             "checkpoint average; the current demo's last step averaged two folders instead, "
                             "with --average-with)")  # fmt: skip
    parser.add_argument("--unlikelihood-steps", type=int, default=0,
                        help="optimizer steps of a third stage: stage 2's batches plus unlikelihood training "
                             "against the loops of the model's own greedy completions (replit_tools/unlikelihood.py); "
                             "0: none")  # fmt: skip
    parser.add_argument("--unlikelihood-lr", type=float, default=3e-4, help="peak learning rate of the third stage")
    parser.add_argument("--no-unseen-penalty", dest="unseen_penalty", action="store_false",
                        help="in the third stage, only the loops' unlikelihood: no penalty on the tokens that never "
                             "occur in the training data")  # fmt: skip
    parser.add_argument("--average-with", type=Path, metavar="DIR",
                        help="end with the mean of the weights and those of another model folder of the same shape "
                             "(another run of the same stage from the same start)")  # fmt: skip
    parser.add_argument("--packages", action="store_true",
                        help="also train on the sources of the permissively licensed packages pinned in "
                             "replit_tools/demo_packages.json, fetched by pip into --package-cache")  # fmt: skip
    parser.add_argument("--package-cache", type=Path, default=Path.home() / ".cache" / "replit_lm_demo",
                        help="where --packages keeps the wheels and their unpacked sources")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    check_arguments(parser, args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    train_files, held_out_files = stdlib_sources()
    print(f"data: {len(train_files)} train and {len(held_out_files)} held-out files of {sysconfig.get_paths()['stdlib']}")
    packages = json.loads(PACKAGE_LIST.read_text()) if args.packages else []
    if packages:
        package_files = package_sources(args.package_cache, packages)
        train_files += package_files
        print(f"data: {len(package_files)} more train files of {len(packages)} packages ({PACKAGE_LIST.name})")
    work = args.out.with_name(args.out.name + ".build")
    work.mkdir(parents=True, exist_ok=True)
    if args.from_model:
        tokenizer = ReplitLMTokenizer.from_pretrained(args.from_model)
        train_stream = encode_files(tokenizer, train_files)
        model = ReplitLM.from_pretrained(args.from_model, dtype=torch.float32)
        training = earlier_training(args.from_model)
        print(f"stage 1: skipped, continuing from {args.from_model}")
    else:
        spiece = train_sentencepiece(
            sentences(train_files), work / "spiece", DEMO_SHAPE["vocab_size"], seed=args.seed,
            input_sentence_size=300_000,
        )  # fmt: skip
        tokenizer = ReplitLMTokenizer(vocab_file=str(spiece))
        train_stream = encode_files(tokenizer, train_files)
        print(f"tokens: {len(train_stream):,} for training")
        model = ReplitLM(ReplitLMConfig(**DEMO_SHAPE))
        print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
        stage1 = lambda generator: random_windows(train_stream, args.batch_size, args.seq_len, generator)  # noqa: E731
        train(model, stage1, args.steps, args.lr, args.seed, desc="stage 1")
        training = [dict(stage=1, steps=args.steps, lr=args.lr, seed=args.seed, batch_size=args.batch_size,
                         seq_len=args.seq_len, file_tokens=len(train_stream), packages=packages)]  # fmt: skip
        if args.save_stage1:
            write_demo_folder(model, tokenizer, args.save_stage1, training)
    if args.stage2_steps or args.unlikelihood_steps:
        stage2, documents, def_tokens = stage_two_batches(tokenizer, train_files, held_out_files, train_stream, args)
        def_count = len(documents)
        print(f"stage 2: {def_count:,} definitions at column 0, {def_tokens:,} tokens")
    if args.stage2_steps:
        start = [param.detach().clone() for param in model.parameters()] if args.average_with_start else None
        train(model, stage2, args.stage2_steps, args.stage2_lr, args.seed + 1, desc="stage 2")
        if start is not None:
            average_with(model, start)
        training.append(dict(stage=2, steps=args.stage2_steps, lr=args.stage2_lr, seed=args.seed + 1,
                             batch_size=args.batch_size, seq_len=args.seq_len, file_tokens=len(train_stream),
                             definitions=args.stage2_definitions, file_starts=args.stage2_file_starts,
                             docstrings=args.stage2_docstrings, definition_documents=def_count,
                             definition_tokens=def_tokens, averaged_with_start=args.average_with_start,
                             packages=packages))  # fmt: skip
    if args.unlikelihood_steps:
        unseen = torch.bincount(torch.cat([stage2.files, stage2.defs]), minlength=model.config.vocab_size) == 0
        unseen_count = int(unseen.sum())
        penalty = LoopPenalty(tokenizer, first_lines(documents), file_first_lines(train_files),
                              unseen=unseen if args.unseen_penalty else None)  # fmt: skip
        print(f"stage 3: prompts from {len(penalty.header_prompts):,} headers and {len(penalty.file_prompts):,} "
              f"files; {unseen_count} tokens never seen in training")  # fmt: skip
        train(model, stage2, args.unlikelihood_steps, args.unlikelihood_lr, args.seed + 2, desc="stage 3",
              extra_loss=penalty)  # fmt: skip
        print(f"stage 3: {penalty.looping_rows:,} of {penalty.rows:,} completions looped "
              f"({penalty.marked_tokens:,} tokens penalized)")  # fmt: skip
        training.append(dict(stage=3, unlikelihood=True, steps=args.unlikelihood_steps, lr=args.unlikelihood_lr,
                             seed=args.seed + 2, batch_size=args.batch_size, seq_len=args.seq_len,
                             definitions=args.stage2_definitions, file_starts=args.stage2_file_starts,
                             docstrings=args.stage2_docstrings, completions_per_step=penalty.headers + penalty.files,
                             header_prompts=penalty.headers, file_prompts=penalty.files,
                             max_new_tokens=penalty.max_new_tokens, unseen_penalty=args.unseen_penalty,
                             unseen_tokens=unseen_count,
                             looping_completions=penalty.looping_rows,
                             completions=penalty.rows, packages=packages))  # fmt: skip
    if args.average_with:
        if not args.from_model and not same_vocabulary(tokenizer, args.average_with):  # (--from-model's: checked)
            raise SystemExit(f"error: --average-with {args.average_with}: its vocabulary is not this model's")
        other = ReplitLM.from_pretrained(args.average_with, dtype=torch.float32)
        average_with(model, [param.detach() for param in other.parameters()])
        theirs = earlier_training(args.average_with)
        shared = next((i for i, (a, b) in enumerate(zip(training, theirs)) if a != b), min(len(training), len(theirs)))
        training.append(dict(stage="average", model=str(args.average_with), its_own_stages=theirs[shared:]))
    write_demo_folder(model, tokenizer, args.out, training)
    shutil.rmtree(work)

    report = evaluate(args.out, held_out_files)  # the same prompts whatever the training seed: comparable builds
    (args.out / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
