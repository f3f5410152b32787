"""Build the embedded demo model in demo/ from scratch: a few-million-parameter ReplitLM trained on this machine.

    python3 -m replit_tools.demo                 # tokenizer + model + evaluation (docs/demo.md: how long it takes)
    python3 -m replit_tools.demo --steps 50      # a quick smoke run

The data is the standard library of the running Python (freely licensed, present on every machine), split by file
into train and held-out parts. The tokenizer is a SentencePiece Unigram model trained with the real model's recipe
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
from .corpus import read_text, stdlib_sources
from .evaluation import evaluate
from .sentencepiece_recipe import RECIPE, train_sentencepiece
from replit_lm.configuration_replit_lm import ReplitLMConfig
from replit_lm.modeling_replit_lm import ReplitLM
from replit_lm.replit_lm_tokenizer import ReplitLMTokenizer

DEMO_SHAPE = dict(d_model=256, n_heads=8, n_layers=4, vocab_size=4096, max_seq_len=1024)


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


def random_windows(stream: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - seq_len, (batch_size,), generator=generator)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])  # (batch, seq_len)


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, stream, steps, batch_size, seq_len, peak_lr, seed) -> None:
    """A plain PyTorch loop: AdamW, bf16 autocast on the CPU, gradient clipping; progress with loss and tokens/s."""
    generator = torch.Generator().manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.dim() == 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=peak_lr,
        betas=(0.9, 0.95),
    )
    model.train()
    progress = tqdm(range(steps), desc="training", unit="step")
    start, tokens, smoothed = time.perf_counter(), 0, None
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, peak_lr, warmup=min(200, steps // 10 + 1))
        batch = random_windows(stream, batch_size, seq_len, generator)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += batch.numel()
        smoothed = loss.item() if smoothed is None else 0.98 * smoothed + 0.02 * loss.item()
        progress.set_postfix(loss=f"{smoothed:.3f}", tok_s=f"{tokens / (time.perf_counter() - start):.0f}")
    model.eval()


def write_demo_folder(model, tokenizer, out: Path) -> None:
    """A complete model repository: weights, config, tokenizer, and links to the root's code (never copies)."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model.config.auto_map = json.loads((ROOT / "config.json").read_text())["auto_map"]
    model.save_pretrained(out, safe_serialization=True)
    # save_pretrained names the class (ReplitLM), which tools outside transformers' Auto classes cannot find
    # (`transformers serve` builds getattr(transformers, architectures[0])); the Auto class finds it via auto_map.
    config = json.loads((out / "config.json").read_text())
    config["architectures"] = json.loads((ROOT / "config.json").read_text())["architectures"]
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(out)
    # The root's tokenizer_config.json carries the auto_map and the real model's settings; keep them.
    tokenizer_config = json.loads((ROOT / "tokenizer_config.json").read_text())
    tokenizer_config["model_max_length"] = model.config.max_seq_len
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    shutil.copy(ROOT / "generation_config.json", out / "generation_config.json")
    for name in CODE_FILES:
        (out / name).symlink_to(os.path.relpath(ROOT / name, out.resolve()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEMO_MODEL, help="folder to write (replaced)")
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    train_files, held_out_files = stdlib_sources()
    print(f"data: {len(train_files)} train and {len(held_out_files)} held-out files of {sysconfig.get_paths()['stdlib']}")
    work = args.out.with_name(args.out.name + ".build")
    work.mkdir(parents=True, exist_ok=True)
    spiece = train_sentencepiece(
        sentences(train_files), work / "spiece", DEMO_SHAPE["vocab_size"], seed=args.seed, input_sentence_size=300_000
    )
    tokenizer = ReplitLMTokenizer(vocab_file=str(spiece))
    train_stream = encode_files(tokenizer, train_files)
    print(f"tokens: {len(train_stream):,} for training")

    model = ReplitLM(ReplitLMConfig(**DEMO_SHAPE))
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    train(model, train_stream, args.steps, args.batch_size, args.seq_len, args.lr, args.seed)
    write_demo_folder(model, tokenizer, args.out)
    shutil.rmtree(work)

    report = evaluate(args.out, held_out_files, seed=args.seed)
    report.update(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, train_tokens=len(train_stream))
    (args.out / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
