"""A training step (forward and backward) over sequences packed into one row, as DataCollatorWithFlattening packs
them, against the same sequences as a padded batch, in ReplitLM and in transformers' MptForCausalLM (which has no
packing: its padded batch is the yardstick), and against the alternative ReplitLM takes only for attention maps: a
block-diagonal mask over the whole row.

    python benchmarks/bench_packed_training.py
    python benchmarks/bench_packed_training.py --row 4096 --d-model 512 --layers 2

Random weights, float32, random sequence lengths between --shortest and --longest filling --row tokens; the best
of --repeats steps per way, the ways interleaved.
"""

import argparse
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_cpu_decode import machine_description, mpt_sharing  # noqa: E402

from replit_lm import modeling_replit_lm  # noqa: E402
from replit_lm.configuration_replit_lm import ReplitLMConfig  # noqa: E402
from replit_lm.modeling_replit_lm import ReplitLM, packed_sequences  # noqa: E402
from replit_tools.options import at_least  # noqa: E402


def sequence_lengths(row: int, shortest: int, longest: int, generator: torch.Generator) -> list[int]:
    """Random lengths in [shortest, longest] that add up to `row` (the last one is what is left)."""
    lengths = []
    while row - sum(lengths) > longest:
        lengths.append(int(torch.randint(shortest, longest + 1, (1,), generator=generator)))
    return lengths + [row - sum(lengths)]


def block_diagonal_masks():
    """The mask over the whole row that ReplitLM takes for attention maps, for every pass while active."""
    original = modeling_replit_lm.ReplitLMModel._attention_mask

    def over_the_row(self, x, past_len, attention_mask, output_attentions, position_ids=None):
        mask = original(self, x, past_len, attention_mask, output_attentions, position_ids)
        if mask.unpacking is None:
            return mask
        sequences = packed_sequences(position_ids, attention_mask)
        return self._backend_mask(mask.backend, mask.q_len, mask.kv_len, attention_mask, False, x.dtype, sequences)

    return mock.patch.object(modeling_replit_lm.ReplitLMModel, "_attention_mask", over_the_row)


def step(model, batch: dict) -> float:
    start = time.perf_counter()
    model(**batch).loss.backward()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return seconds


def block_diagonal_step(model, batch: dict) -> float:
    with block_diagonal_masks():
        return step(model, batch)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--row", type=at_least(2), default=2048, help="tokens packed into the row")
    parser.add_argument("--shortest", type=at_least(2), default=64)
    parser.add_argument("--longest", type=at_least(2), default=512)
    parser.add_argument("--d-model", type=at_least(8), default=256)
    parser.add_argument("--heads", type=at_least(1), default=8)
    parser.add_argument("--layers", type=at_least(1), default=4)
    parser.add_argument("--repeats", type=at_least(1), default=3)
    args = parser.parse_args()
    if args.shortest > args.longest:
        parser.error(f"--shortest {args.shortest} is longer than --longest {args.longest}")
    if args.d_model % args.heads:
        parser.error(f"--d-model {args.d_model} is not a multiple of --heads {args.heads}")

    print(f"machine: {machine_description()}")
    torch.manual_seed(0)
    config = ReplitLMConfig(d_model=args.d_model, n_heads=args.heads, n_layers=args.layers, vocab_size=32768,
                            max_seq_len=max(2048, args.longest))  # fmt: skip
    ours = ReplitLM(config).train()
    mpt = mpt_sharing(ours).train()
    generator = torch.Generator().manual_seed(1)
    lengths = sequence_lengths(args.row, args.shortest, args.longest, generator)
    sequences = [torch.randint(3, config.vocab_size, (n,), generator=generator) for n in lengths]
    ids = torch.cat(sequences)[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    labels = ids.clone()
    labels[0, positions[0] == 0] = -100  # as DataCollatorWithFlattening: no target across two sequences
    padded = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones(n, dtype=torch.long) for n in lengths], batch_first=True)
    packed = {"input_ids": ids, "position_ids": positions, "labels": labels}
    batch = {"input_ids": padded, "attention_mask": mask, "labels": padded.masked_fill(mask == 0, -100)}

    ways = {
        "ReplitLM, packed (one row per sequence for the attention)": lambda: step(ours, packed),
        "ReplitLM, packed, a block-diagonal mask over the row": lambda: block_diagonal_step(ours, packed),
        "ReplitLM, padded batch": lambda: step(ours, batch),
        "MptForCausalLM, padded batch": lambda: step(mpt, batch),
    }
    best = dict.fromkeys(ways, float("inf"))
    for _ in range(args.repeats + 1):  # the first round warms up
        for name, run in ways.items():
            best[name] = min(best[name], run())
    print(f"\n{len(lengths)} sequences of {args.shortest}-{args.longest} tokens in a row of {args.row}, float32, "
          f"{args.layers} layers x d_model {args.d_model}: forward and backward, best of {args.repeats}\n")  # fmt: skip
    print("| way | s | vs MptForCausalLM padded |")
    print("|---|---:|---:|")
    reference = best["MptForCausalLM, padded batch"]
    for name, seconds in best.items():
        print(f"| {name} | {seconds:.3f} | {reference / seconds:.2f}x |")


if __name__ == "__main__":
    main()
