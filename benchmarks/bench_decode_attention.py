"""The attention of one decoding step on the CPU: the native one-query kernel against PyTorch's SDPA and the eager
formula (MptForCausalLM's way: matmul, softmax in float32, matmul), and what it does to a whole decode step.

1. Per cache length, the attention of `--layers` layers (32 heads x 80, the real shape) over caches of random
   keys and values, each the first positions of a longer buffer as a preallocated cache hands them over: the best
   of `--repeats` runs per backend, and the rate at which the kernel read the cache.
2. Per prompt length, greedy decoding of a `--layers`-layer model of the real width (random bfloat16 weights)
   through each backend, and transformers' MptForCausalLM in bfloat16 on the same weights: the median decode step,
   best of `--repeats` interleaved runs.

    python benchmarks/bench_decode_attention.py
    python benchmarks/bench_decode_attention.py --dtype float32 --keys 64 1024 --prompt 64 1024
"""

import argparse
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_cpu_decode import machine_description, mpt_sharing, random_replit, replit_config, run_generate  # noqa: E402

from replit_lm import attention  # noqa: E402
from replit_tools.options import at_least  # noqa: E402
from replit_lm.attention import AttentionMask, alibi_bias_table, alibi_slopes  # noqa: E402

HEADS, HEAD_DIM = 32, 80


def time_attention(backend: str, layers, q, kv_len: int, dtype: torch.dtype, repeats: int) -> float:
    slopes = alibi_slopes(HEADS)
    bias = alibi_bias_table(slopes, kv_len).view(1, HEADS, 1, kv_len)
    mask = AttentionMask(q_len=1, kv_len=kv_len, slopes=slopes, backend=backend)
    mask.additive = bias if backend == "native_decode" else bias.to(dtype)
    attend = attention.ATTENTION_BACKENDS[backend]
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms up
        start = time.perf_counter()
        for k, v in layers:
            attend(q, k[:, :, :kv_len], v[:, :, :kv_len], mask, HEAD_DIM**-0.5, 0.0, False)
        best = min(best, time.perf_counter() - start)
    return best


def attention_table(args, dtype: torch.dtype):
    print(f"\n## One query, {args.layers} layers x {HEADS} heads x {HEAD_DIM}, {str(dtype)[6:]} cache: ms\n")
    print("| keys | eager (MPT's) | SDPA | native | native vs SDPA | native read |")
    print("|---:|---:|---:|---:|---:|---:|")
    longest = max(args.keys)
    generator = torch.Generator().manual_seed(0)
    layers = [
        tuple(torch.randn(1, HEADS, longest + 16, HEAD_DIM, generator=generator).to(dtype) for _ in range(2))
        for _ in range(args.layers)
    ]
    q = torch.randn(1, HEADS, 1, HEAD_DIM, generator=generator).to(dtype)
    for kv_len in args.keys:
        seconds = {
            b: time_attention(b, layers, q, kv_len, dtype, args.repeats) for b in ("eager", "sdpa", "native_decode")
        }
        cache_bytes = args.layers * 2 * HEADS * kv_len * HEAD_DIM * dtype.itemsize
        print(
            f"| {kv_len} | {seconds['eager'] * 1e3:.2f} | {seconds['sdpa'] * 1e3:.2f} | "
            f"{seconds['native_decode'] * 1e3:.2f} | {seconds['sdpa'] / seconds['native_decode']:.1f}x | "
            f"{cache_bytes / seconds['native_decode'] / 1e9:.0f} GB/s |"
        )


def decode_table(args, dtype: torch.dtype):
    print(f"\n## Decode step, {args.layers}-layer model of the real width, {str(dtype)[6:]}: ms (median step)\n")
    print("| prompt | MptForCausalLM | ReplitLM, SDPA | ReplitLM, native | native vs SDPA | native vs MPT |")
    print("|---:|---:|---:|---:|---:|---:|")
    ours = random_replit(replit_config(args.layers), dtype)
    models = {"mpt": mpt_sharing(ours), "sdpa": ours, "native": ours}
    for prompt in args.prompt:
        ids = torch.randint(3, ours.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(prompt))
        mask = torch.ones_like(ids)
        best = {name: float("inf") for name in models}
        for _ in range(args.repeats):
            for name, model in models.items():
                with mock.patch.object(attention, "native_decode_is_faster", lambda *shape: name == "native"):
                    best[name] = min(best[name], run_generate(model, ids, mask, args.new_tokens)["step"])
        print(
            f"| {prompt} | {best['mpt'] * 1e3:.1f} | {best['sdpa'] * 1e3:.1f} | {best['native'] * 1e3:.1f} | "
            f"{best['sdpa'] / best['native']:.2f}x | {best['mpt'] / best['native']:.2f}x |"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--layers", type=at_least(1), default=4)
    parser.add_argument("--keys", type=at_least(1), nargs="+", default=[64, 512, 1024, 2048],
                        help="cache lengths (part 1)")  # fmt: skip
    parser.add_argument("--prompt", type=at_least(1), nargs="+", default=[64, 1024], help="prompt lengths (part 2)")
    parser.add_argument("--new-tokens", type=at_least(2), default=16, help="a step is timed between two tokens")
    parser.add_argument("--repeats", type=at_least(1), default=3)
    args = parser.parse_args()
    context = replit_config(1).max_seq_len
    if max(args.keys) > context or max(args.prompt) + args.new_tokens > context:
        parser.error(f"--keys, and --prompt with --new-tokens, must stay within the model's {context} tokens")
    kept_sdpa = not attention.native_decode_is_faster(HEADS, HEAD_DIM, getattr(torch, args.dtype),
                                                      torch.get_num_threads())  # fmt: skip
    if kept_sdpa:
        kernels = attention.native_kernels()
        if kernels is None or not kernels.decode_attention_available():
            sys.exit("the native decode attention is not built here (it needs a C compiler and AVX2 or AVX512)")
    print(f"# Decode attention on the CPU\n\n- machine: {machine_description()}")
    print(f"- python {sys.version.split()[0]}, torch {torch.__version__}")
    if kept_sdpa:
        print("- on this machine the model keeps SDPA: the native kernel was not timed faster")
    dtype = getattr(torch, args.dtype)
    attention_table(args, dtype)
    decode_table(args, dtype)


if __name__ == "__main__":
    main()
