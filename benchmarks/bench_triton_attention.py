"""Benchmark the Triton ALiBi FlashAttention kernel against torch SDPA and eager attention (GPU).

    python benchmarks/bench_triton_attention.py                 # seq 512 .. 8192
    python benchmarks/bench_triton_attention.py --seq 2048 4096 --no-check
    python benchmarks/bench_triton_attention.py --tune          # pick launch configs first, then benchmark

Shapes are replit-code-v1-3b's: bf16, 32 heads, head_dim 80, batch = 16384 // seq (~16k tokens).
Providers:
    triton  triton_flash_attn.flash_attn_alibi (ALiBi and causal mask computed in the kernel)
    sdpa    torch.nn.functional.scaled_dot_product_attention with the ALiBi + causal bias passed as
            an additive (1, heads, seq, seq) float mask, built once per shape as a model would
    eager   explicit matmul + float32 softmax + matmul with the same bias
Before timing, each shape checks the kernel (and SDPA, for scale) in bf16 against a float32
reference and prints the max abs error of the output and of dq, dk, dv.
With --tune, each kernel's launch configuration (block sizes, warps, stages) is first chosen among
candidates by timing them at seq 2048, and the benchmark then runs with the winners, printed as the
LAUNCH_CONFIGS dict of triton_flash_attn.py.
Reported: TFLOP/s (causal flops: 4*B*H*S*S*D/2 forward, x2.5 forward+backward) and peak memory
allocated while that provider runs, inputs included (the sdpa/eager bias too); OOM is marked.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton_flash_attn  # noqa: E402
from triton_flash_attn import flash_attn_alibi  # noqa: E402

HEADS, HEAD_DIM, TOKENS = 32, 80, 16384
DTYPE = torch.bfloat16
DEVICE = "cuda"
GIB = 2**30


def alibi_slopes(heads):
    """MPT's slopes for a power-of-two head count (alibi_bias_max 8)."""
    return 2.0 ** (-8.0 * torch.arange(1, heads + 1, dtype=torch.float32, device=DEVICE) / heads)


def alibi_causal_bias(slopes, seq, dtype):
    """(1, heads, seq, seq) additive mask: slope * (j - i), -inf above the diagonal."""
    pos = torch.arange(seq, device=DEVICE)
    distance = pos[None, :] - pos[:, None]  # (seq, seq): j - i
    bias = torch.empty((1, len(slopes), seq, seq), dtype=dtype, device=DEVICE)
    for h, slope in enumerate(slopes):  # per head, so the float32 temporaries stay (seq x seq)
        bias[0, h] = (slope * distance).masked_fill(distance > 0, float("-inf"))
    return bias


def triton_provider(q, k, v, slopes):
    return lambda: flash_attn_alibi(q, k, v, slopes)


def sdpa_provider(q, k, v, slopes):
    bias = alibi_causal_bias(slopes, q.shape[2], q.dtype)
    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def eager_provider(q, k, v, slopes):
    bias = alibi_causal_bias(slopes, q.shape[2], q.dtype)
    scale = q.shape[-1] ** -0.5

    def attention():
        scores = q @ k.transpose(-1, -2) * scale + bias  # (batch, heads, seq, seq)
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v

    return attention


PROVIDERS = {"triton": triton_provider, "sdpa": sdpa_provider, "eager": eager_provider}


def random_inputs(batch, seq, requires_grad):
    return [torch.randn(batch, HEADS, seq, HEAD_DIM, dtype=DTYPE, device=DEVICE, requires_grad=requires_grad)
            for _ in range(3)]


def max_errors(provider, batch, seq, slopes):
    """Max abs error of `provider` in bf16 (output, dq, dk, dv) against a float32 reference."""
    torch.manual_seed(0)
    q, k, v = random_inputs(batch, seq, requires_grad=True)
    d_out = torch.randn_like(q)
    out = PROVIDERS[provider](q, k, v, slopes)()
    out.backward(d_out)
    errors = dict.fromkeys(("out", "dq", "dk", "dv"), 0.0)
    # float32 reference a few heads at a time, so that its (seq x seq) scores stay <= 2 GiB.
    chunk = max(1, 2**29 // (batch * seq * seq))
    for h0 in range(0, HEADS, chunk):
        heads = slice(h0, h0 + chunk)
        ref_inputs = [t.detach()[:, heads].float().requires_grad_() for t in (q, k, v)]
        ref_q, ref_k, ref_v = ref_inputs
        scores = ref_q @ ref_k.transpose(-1, -2) * HEAD_DIM**-0.5 + alibi_causal_bias(slopes[heads], seq, torch.float32)
        ref_out = torch.softmax(scores, dim=-1) @ ref_v
        ref_out.backward(d_out[:, heads].float())
        pairs = [(out.detach(), ref_out.detach())] + [(t.grad, r.grad) for t, r in zip((q, k, v), ref_inputs)]
        for name, (got, ref) in zip(errors, pairs):
            errors[name] = max(errors[name], (got[:, heads].float() - ref).abs().max().item())
        del scores, ref_out, ref_inputs, ref_q, ref_k, ref_v  # free before the next chunk allocates
    return errors


def measure(provider, batch, seq, mode, slopes):
    """(TFLOP/s, peak GiB) of one provider in mode 'fwd' or 'fwd+bwd', or None when it runs out of memory."""
    torch.cuda.empty_cache()
    try:
        q, k, v = random_inputs(batch, seq, requires_grad=mode == "fwd+bwd")
        attention = PROVIDERS[provider](q, k, v, slopes)
        if mode == "fwd":
            step = attention
        else:
            d_out = torch.randn_like(q)

            def step():
                attention().backward(d_out)

        step()  # compile / warm up outside the memory measurement
        for t in (q, k, v):
            t.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / GIB
        ms = triton.testing.do_bench(step, grad_to_none=[q, k, v], return_mode="median")
    except torch.cuda.OutOfMemoryError:
        return None
    flops = 4 * batch * HEADS * seq * seq * HEAD_DIM / 2 * (2.5 if mode == "fwd+bwd" else 1.0)
    return flops / (ms * 1e-3) / 1e12, peak


# (BLOCK_M, BLOCK_N, warps, stages) candidates per kernel; ones that need too much shared memory are skipped.
TUNE_CANDIDATES = {
    "fwd": [(128, 64, 8, 3), (128, 64, 4, 3), (128, 64, 8, 4), (128, 128, 8, 2), (128, 32, 4, 4),
            (64, 64, 4, 3), (64, 128, 4, 3), (128, 128, 8, 3)],
    "bwd_dkdv": [(32, 128, 8, 3), (32, 128, 4, 3), (64, 128, 8, 3), (64, 128, 8, 2), (64, 64, 4, 3),
                 (32, 64, 4, 3), (16, 128, 4, 3)],
    "bwd_dq": [(128, 32, 8, 3), (128, 32, 4, 3), (128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3),
               (64, 32, 4, 3)],
}


def tune(seq=2048):
    """Choose LAUNCH_CONFIGS greedily, one kernel at a time, by the median time of forward (fwd) or of the whole
    backward (bwd_*) at `seq`."""
    batch = max(1, TOKENS // seq)
    q, k, v = random_inputs(batch, seq, requires_grad=False)
    d_out = torch.randn_like(q)
    slopes = alibi_slopes(HEADS) * triton_flash_attn._LOG2E
    bounds = [torch.full((batch,), value, dtype=torch.int32, device=DEVICE) for value in (0, seq)]
    scale = HEAD_DIM**-0.5
    out, lse = triton_flash_attn._forward(q, k, v, slopes, *bounds, scale)
    runs = {
        "fwd": lambda: triton_flash_attn._forward(q, k, v, slopes, *bounds, scale),
        "bwd_dkdv": lambda: triton_flash_attn._backward(d_out, q, k, v, out, lse, slopes, *bounds, scale),
    }
    runs["bwd_dq"] = runs["bwd_dkdv"]
    print(f"\ntuning launch configs at seq {seq}, batch {batch} (median ms; BLOCK_M, BLOCK_N, warps, stages)")
    for kernel, candidates in TUNE_CANDIDATES.items():
        timings = {}
        for config in candidates:
            triton_flash_attn.LAUNCH_CONFIGS[kernel] = config
            try:
                timings[config] = triton.testing.do_bench(runs[kernel], return_mode="median")
            except Exception as err:  # noqa: BLE001  (out of shared memory, or a config the compiler rejects)
                print(f"  {kernel:<9} {config}: skipped ({type(err).__name__})")
                continue
            print(f"  {kernel:<9} {config}: {timings[config]:.3f} ms")
        triton_flash_attn.LAUNCH_CONFIGS[kernel] = min(timings, key=timings.get)
    print(f"LAUNCH_CONFIGS = {triton_flash_attn.LAUNCH_CONFIGS}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--no-check", action="store_true", help="skip the accuracy check against float32")
    parser.add_argument("--tune", action="store_true", help="choose the kernels' launch configs first")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: this benchmark times CUDA kernels, and there is no CUDA GPU here")

    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"{DTYPE}, heads {HEADS}, head_dim {HEAD_DIM}, ~{TOKENS} tokens per batch")
    slopes = alibi_slopes(HEADS)
    if args.tune:
        tune()
    print(f"launch configs: {triton_flash_attn.LAUNCH_CONFIGS}")

    if not args.no_check:
        print("\nmax abs error vs float32 reference (bf16 inputs)")
        print(f"{'seq':>6} {'batch':>5}  {'provider':<8} {'out':>9} {'dq':>9} {'dk':>9} {'dv':>9}")
        for seq in args.seq:
            batch = max(1, TOKENS // seq)
            for provider in ("triton", "sdpa"):
                errors = max_errors(provider, batch, seq, slopes)
                print(f"{seq:>6} {batch:>5}  {provider:<8} " + " ".join(f"{e:>9.2e}" for e in errors.values()))
            torch.cuda.empty_cache()

    print("\nTFLOP/s | peak GiB (inputs included)")
    header = f"{'seq':>6} {'batch':>5} {'mode':<8}" + "".join(f" | {p:>7} TFLOP/s {'GiB':>6}" for p in PROVIDERS)
    print(header)
    for seq in args.seq:
        batch = max(1, TOKENS // seq)
        for mode in ("fwd", "fwd+bwd"):
            row = f"{seq:>6} {batch:>5} {mode:<8}"
            for provider in PROVIDERS:
                result = measure(provider, batch, seq, mode, slopes)
                row += f" | {'OOM':>15} {'':>6}" if result is None else f" | {result[0]:>15.1f} {result[1]:>6.2f}"
            print(row, flush=True)


if __name__ == "__main__":
    main()
