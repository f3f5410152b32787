"""Whole-model speed on a GPU: ReplitLM with attn_impl 'triton' and 'torch' against transformers' MptForCausalLM,
bfloat16, the same random weights of the real replit-code-v1-3b shape (2.6B parameters; `--layers N` for less).

    python benchmarks/bench_gpu_model.py
    python benchmarks/bench_gpu_model.py --layers 8 --seq 1024

Prints, per model: forward and forward+backward tokens/s over a batch of full-length sequences (what prefill and
training cost), greedy generate tokens/s for batch 1 and 8 after a 512-token prompt, and peak GPU memory. Before
timing, the logits of each ReplitLM variant are compared with MptForCausalLM's on the same input.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import MptForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from replit_tools.mpt_reference import mpt_config  # noqa: E402  (also registers the package `replit_lm`)
from replit_lm.configuration_replit_lm import ReplitLMConfig  # noqa: E402
from replit_lm.modeling_replit_lm import ReplitLM  # noqa: E402

DEVICE, DTYPE = "cuda", torch.bfloat16
GIB = 2**30


def build_models(layers: int) -> dict:
    """MptForCausalLM with random weights, and ReplitLM twins holding the same tensors' values."""
    config = ReplitLMConfig.from_dict({**json.loads((ROOT / "config.json").read_text()), "n_layers": layers})
    torch.manual_seed(0)
    with torch.device(DEVICE):
        mpt = MptForCausalLM(mpt_config(config)).to(DTYPE).eval()
    models = {"MptForCausalLM": mpt}
    for attn_impl in ("torch", "triton"):
        with torch.device(DEVICE):
            model = ReplitLM(ReplitLMConfig(**{**config.to_dict(), "attn_impl": attn_impl})).to(DTYPE).eval()
        model.load_state_dict(mpt.state_dict(), strict=False)
        model.tie_weights()
        models[f"ReplitLM {attn_impl}"] = model
    return models


def median_seconds(step, repeats: int = 5) -> float:
    step()  # warm up (and compile the Triton kernels)
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_gib(step) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / GIB


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--seq", type=int, default=2048, help="sequence length of the forward passes")
    parser.add_argument("--batch", type=int, default=4, help="sequences per forward pass")
    parser.add_argument("--prompt", type=int, default=512, help="prompt length for generate")
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: this benchmark times CUDA kernels, and there is no CUDA GPU here")
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | {args.layers} layers, bf16")
    models = build_models(args.layers)
    ids = torch.randint(3, 32768, (args.batch, args.seq), device=DEVICE)
    prompts = torch.randint(3, 32768, (8, args.prompt), device=DEVICE)

    with torch.no_grad():
        reference = models["MptForCausalLM"](ids[:1, :512]).logits.float()
        for name, model in models.items():
            if name != "MptForCausalLM":
                logits = model(ids[:1, :512]).logits.float()
                error = ((logits - reference).norm() / reference.norm()).item()
                agreement = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
                print(f"{name}: relative logit error vs MptForCausalLM {error:.2%}, top-1 agreement {agreement:.1%}")

    header = f"{'model':<16} {'fwd tok/s':>10} {'fwd GiB':>8} {'fwd+bwd tok/s':>14} {'GiB':>6}"
    header += "".join(f" {f'gen b{b} tok/s':>13}" for b in (1, 8))
    print(header)
    for name, model in models.items():
        tokens = args.batch * args.seq

        def forward():
            with torch.no_grad():
                model(ids, logits_to_keep=1)

        def forward_backward():
            model(ids[:, :-1], labels=ids[:, :-1]).loss.backward()
            model.zero_grad(set_to_none=True)

        row = f"{name:<16} {tokens / median_seconds(forward):>10.0f} {peak_gib(forward):>8.1f}"
        try:
            row += f" {tokens / median_seconds(forward_backward, repeats=3):>14.0f} {peak_gib(forward_backward):>6.1f}"
        except torch.cuda.OutOfMemoryError:
            row += f" {'OOM':>14} {'':>6}"
        torch.cuda.empty_cache()
        for batch in (1, 8):
            prompt = prompts[:batch]

            def generate():
                with torch.no_grad():
                    model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, eos_token_id=None,
                                   max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=2)  # fmt: skip

            row += f" {batch * args.new_tokens / median_seconds(generate, repeats=2):>13.0f}"
        print(row, flush=True)


if __name__ == "__main__":
    main()
