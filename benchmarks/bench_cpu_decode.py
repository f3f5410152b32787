"""CPU generation speed of ReplitLM against transformers' MptForCausalLM, on the same random weights, in one run.

Random weights of the real replit-code-v1-3b shape (2.6B parameters, 32 layers; `--layers N` for a quicker run),
batch 1 and 8, prompts of 64, 512 and 1024 tokens. For every model it prints the time to first token, the decode speed,
the peak memory, and the weight bandwidth that decoding achieved (the bytes of every matrix a decode step reads,
times steps per second) against a memory-read bandwidth measured in the same run.

    python benchmarks/bench_cpu_decode.py                       # full size: about an hour on 2 cores
    python benchmarks/bench_cpu_decode.py --layers 4 --batch 1 --prompt 64 --new-tokens 16
    python benchmarks/bench_cpu_decode.py --accuracy demo        # int8/int4 vs bfloat16 on a trained model

With --llama-cpp (llama-cpp-python installed) it runs llama.cpp beside ReplitLM and MptForCausalLM instead, in the
same run, on the same random weights exported to GGUF (bf16, q8_0, q4_0; export.py's writer): batch 1, decode after
each prompt length, time to first token, and top-1 agreement with float32 ReplitLM over teacher-forced random ids,
each llama.cpp format paired with ours (bf16 with bfloat16, q8_0 with int8, q4_0 with int4).

    LLAMA_NO_EXTRA_BUFTS=1 python benchmarks/bench_cpu_decode.py --llama-cpp --layers 4 --prompt 64 1024
    LLAMA_NO_EXTRA_BUFTS=1 python benchmarks/bench_cpu_decode.py --llama-cpp --layers 4 --without-amx   # no AMX
    REPLIT_LM_NATIVE_FLAGS=-mno-avx512f ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 REPLIT_LM_ROUTE_CACHE=off \
        python benchmarks/bench_cpu_decode.py --layers 4 --batch 1 --models bfloat16   # an AVX2 laptop CPU, emulated

(LLAMA_NO_EXTRA_BUFTS=1: llama.cpp without its AMX repacking, which crashes where a VM reports AMX it does not grant.)

With --accuracy MODEL_DIR it measures instead how far weight_quantization moves a trained model: the relative
error of the logits and the agreement of the top-1 token against bfloat16 (and float32's, for scale), with the
teacher forcing over windows of held-out code: this repository's own Python files, which neither the demo model
(trained on the standard library) nor replit-code-v1-3b has seen.

Models, in two groups that each share one set of weights (so that only one float32 or one bfloat16 copy is in memory
at a time): MptForCausalLM and ReplitLM in float32; MptForCausalLM and ReplitLM in bfloat16, and ReplitLM with those
bfloat16 weights quantized to int8 and int4 (weight_quantization). Within a group every scenario runs the models
interleaved, `--repeats` times, and keeps each model's best time to first token and best decode speed, so that a
burst of load from another process hurts one sample rather than one model. Speeds are `generate` as a user calls
it: greedy, each model with its own defaults, every sequence generating `--new-tokens` tokens.
"""

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import LogitsProcessor, LogitsProcessorList, MptForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from replit_tools.mpt_reference import mpt_config  # noqa: E402  (also registers the package `replit_lm`)
from replit_lm.configuration_replit_lm import ReplitLMConfig  # noqa: E402
from replit_lm.modeling_replit_lm import ReplitLM  # noqa: E402
from replit_lm import quantization  # noqa: E402
from replit_tools.options import at_least  # noqa: E402
from replit_lm.quantization import (  # noqa: E402
    ROUTE_CACHE_ENV,
    ROUTES,
    ROW_BUCKETS,
    QuantizedLinear,
    cpu_flags,
    cpu_model,
)

GB = 1e9


# --- measuring -------------------------------------------------------------------------------------------------


def read_bandwidth(gib: float = 1.0, passes: int = 5) -> float:
    """Bytes per second that a streaming read reaches: the best of a few reductions over a buffer far larger than
    any cache, each timed `passes` times."""
    data = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    reads = (lambda: torch.dot(data, data), lambda: data.sum(), lambda: data.view(torch.uint8).amax())
    best = float("inf")
    for read in reads:
        for _ in range(passes):
            start = time.perf_counter()
            read()
            best = min(best, time.perf_counter() - start)
    return data.numel() * 4 / best


class StepClock(LogitsProcessor):
    """Records when each generation step's logits are ready (called once per step, after the forward pass)."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def rss_bytes(field: str) -> int:
    """VmRSS or VmHWM (the peak since the last reset) of this process, from /proc (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: writing 5 to clear_refs); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct tensors (tied weights counted once)."""
    seen, total = set(), 0
    for t in tensors:
        key = (t.data_ptr(), t.numel()) if not t.is_mkldnn else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def model_bytes(model) -> int:
    return tensor_bytes([*model.parameters(), *model.buffers()])


def decode_bytes(model) -> int:
    """Bytes a decode step reads from weights: every matrix multiplied (the LM head included), not the embedding
    table, from which a step gathers a few rows."""
    tensors = []
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, QuantizedLinear)):
            tensors += [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    return tensor_bytes(tensors)


def run_generate(model, ids, mask, new_tokens: int) -> dict:
    """One greedy generate: time to first token, median decode step, and the peak RSS above the RSS before."""
    clock = StepClock()
    gc.collect()
    before = rss_bytes("VmRSS")
    peak_tracked = reset_peak_rss()
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=2,
            logits_processor=LogitsProcessorList([clock]),
        )
    steps = [b - a for a, b in zip(clock.times, clock.times[1:])]
    return {
        "ttft": clock.times[0] - start,
        "step": statistics.median(steps) if steps else float("nan"),
        "extra": rss_bytes("VmHWM") - before if peak_tracked else float("nan"),
    }


# --- models ----------------------------------------------------------------------------------------------------


def replit_config(layers: int) -> ReplitLMConfig:
    return ReplitLMConfig(n_layers=layers)  # every other field is replit-code-v1-3b's


def random_replit(config: ReplitLMConfig, dtype: torch.dtype, seed: int = 0) -> ReplitLM:
    """ReplitLM with random weights made directly in `dtype` (no float32 copy of a bfloat16 model)."""
    with torch.device("meta"):
        model = ReplitLM(config)
    model.to_empty(device="cpu").to(dtype)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                # The init's scale (std ~ 1/sqrt(fan_in)) keeps activations finite through 32 layers.
                param.normal_(0.0, param.shape[1] ** -0.5, generator=generator)
    model.tie_weights()
    return model.eval()


def mpt_sharing(model: ReplitLM) -> MptForCausalLM:
    """transformers' MptForCausalLM holding the same tensors as `model` (no copy)."""
    with torch.device("meta"):
        mpt = MptForCausalLM(mpt_config(model.config))
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    missing, unexpected = mpt.load_state_dict(state, strict=False, assign=True)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    mpt.lm_head.weight = mpt.transformer.wte.weight
    return mpt.eval()


def replit_sharing(model: ReplitLM, weight_quantization: str) -> ReplitLM:
    """Another ReplitLM on the same tensors as `model`, its Linear layers then quantized (new tensors)."""
    with torch.device("meta"):
        other = ReplitLM(model.config)
    other.load_state_dict(model.state_dict(), assign=True)
    other.tie_weights()
    return other.quantize_weights(weight_quantization).eval()


# --- the run ---------------------------------------------------------------------------------------------------


# The instruction-set extensions that decide which CPU kernels are fast.
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


EMULATION_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", quantization.NATIVE_FLAGS_ENV)


def machine_description() -> str:
    flags = cpu_flags()
    present = " ".join(flag for flag in KERNEL_FLAGS if flag in flags) or "unknown"
    off = "; AMX turned off (--without-amx)" if amx_turned_off() else ""
    # An emulated smaller CPU: torch and oneDNN capped (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA), the native kernels
    # built with other flags (REPLIT_LM_NATIVE_FLAGS, e.g. -mno-avx512f).
    capped = [f"{name}={os.environ[name]}" for name in EMULATION_ENV if os.environ.get(name)]
    emulated = f"; emulating: {' '.join(capped)}" if capped else ""
    return (
        f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads; flags: {present}{off}; "
        f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}{emulated}"
    )


def print_routes():
    """The kernel route each layer shape took per row bucket (quantization.RouteChooser), measured in this run."""
    print("\n| layer | " + " | ".join(f"{bucket} rows" for bucket in ROW_BUCKETS) + " |")
    print("|---|" + "---|" * len(ROW_BUCKETS))
    for key, plan in sorted(ROUTES.choices.items()):
        print(f"| {key} | " + " | ".join(plan[bucket][0][0] for bucket in ROW_BUCKETS) + " |")  # [route, seconds]


def logits_of(model, windows: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """Teacher-forced logits, float32. (windows, window, vocab)"""
    with torch.inference_mode():
        return torch.cat([model(windows[i : i + batch]).logits.float() for i in range(0, len(windows), batch)])


def measure_accuracy(model_dir: str, window: int, count: int):
    """Relative logit error and top-1 agreement of each weight format against bfloat16, printed as a table."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    ids = []
    for path in sorted(ROOT.glob("*.py")) + sorted(ROOT.glob("tests/*.py")):
        ids += tokenizer(path.read_text(encoding="utf-8"))["input_ids"]
    count = min(count, len(ids) // window)
    windows = torch.tensor(ids[: count * window]).view(count, window)

    def load(**kwargs):
        return AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, **kwargs).eval()

    reference = logits_of(load(dtype=torch.bfloat16), windows)
    top1 = reference.argmax(-1)
    print(f"# weight_quantization against bfloat16: {model_dir}, {count} windows of {window} tokens\n")
    print(f"- python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}\n")
    print("| weights | relative logit error | top-1 agreement |")
    print("|---|---:|---:|")
    for name, kwargs in (
        ("float32", dict(dtype=torch.float32)),
        ("int8", dict(weight_quantization="int8")),
        ("int4", dict(weight_quantization="int4")),
    ):
        logits = logits_of(load(**kwargs), windows)
        error = ((logits - reference).norm() / reference.norm()).item()
        agreement = (logits.argmax(-1) == top1).float().mean().item()
        print(f"| {name} | {100 * error:.2f}% | {100 * agreement:.1f}% |")
        del logits
        gc.collect()


# --- llama.cpp beside ReplitLM (--llama-cpp) ----------------------------------------------------------------------

LLAMA_PAIRS = {"bf16": "bfloat16", "q8_0": "int8", "q4_0": "int4"}


def export_gguf_files(model: ReplitLM, folder: Path) -> dict[str, Path]:
    """The model's weights as GGUF files, one per llama.cpp format, with the demo's vocabulary padded to the model's
    (the vocabulary changes nothing in the speed or the logits of given ids)."""
    from replit_lm.replit_lm_tokenizer import ReplitLMTokenizer
    from replit_tools import DEMO_MODEL
    from replit_tools.export import export_gguf

    tokenizer = ReplitLMTokenizer.from_pretrained(DEMO_MODEL)
    files = {}
    for qtype in LLAMA_PAIRS:
        files[qtype] = folder / f"random.{qtype}.gguf"
        export_gguf(model, tokenizer, "random", files[qtype], qtype, files[qtype])
        gc.collect()
    return files


def load_llama(path: Path, n_ctx: int, threads: int, logits_all: bool = False):
    """llama.cpp on `path`; LLAMA_NO_EXTRA_BUFTS=1 switches its AMX repacking off (see export.open_gguf)."""
    from replit_tools.export import open_gguf

    return open_gguf(
        path, extra_buffer_types=os.environ.get("LLAMA_NO_EXTRA_BUFTS") != "1", n_ctx=n_ctx, n_threads=threads,
        n_threads_batch=threads, n_batch=512, logits_all=logits_all,
    )  # fmt: skip


def last_token_argmax(llm) -> int:
    """The greedy next token after llm's last evaluation (without logits_all, llama-cpp-python keeps no scores)."""
    import numpy as np

    logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))
    return int(logits.argmax())


def run_llama(llm, ids: list[int], new_tokens: int) -> dict:
    """Time to first token (the prompt's evaluation) and the median decode step, greedy, batch 1."""
    llm.reset()
    start = time.perf_counter()
    llm.eval(ids)
    ttft = time.perf_counter() - start
    steps, token = [], last_token_argmax(llm)
    for _ in range(new_tokens):
        start = time.perf_counter()
        llm.eval([token])
        steps.append(time.perf_counter() - start)
        token = last_token_argmax(llm)
    return {"ttft": ttft, "step": statistics.median(steps), "extra": float("nan")}


TOP1_WINDOWS = 64
"""Windows of 128 random ids over which top-1 agreement is counted: 8192 positions. With 2048, the same int8 weights
through routes that differ only in the order of their float32 sums gave 94.7% to 95.1% (q8_0: 94.9%), and each
quarter of the 8192 moves by up to 2 points."""


def top1_agreement(reference: torch.Tensor, logits: torch.Tensor) -> float:
    return (reference.argmax(-1) == logits.argmax(-1)).float().mean().item()


def llama_cpp_comparison(args, config: ReplitLMConfig, bandwidth: float):
    """ReplitLM (bfloat16, int8, int4), MptForCausalLM bfloat16 and llama.cpp (bf16, q8_0, q4_0) on one set of
    weights, batch 1; then top-1 agreement of each with float32 ReplitLM. The GGUF files (1.4 GB at 4 layers of the
    real width) are deleted when it ends, however it ends."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as folder:
        compare_on_gguf_files(args, config, bandwidth, Path(folder))


def compare_on_gguf_files(args, config: ReplitLMConfig, bandwidth: float, folder: Path):
    threads = torch.get_num_threads()
    base = random_replit(config, torch.bfloat16)
    ours = {"MptForCausalLM bfloat16": mpt_sharing(base), "ReplitLM bfloat16": base}
    for name in ("int8", "int4"):
        ours[f"ReplitLM {name}"] = replit_sharing(base, name)
    with torch.inference_mode():
        for model in ours.values():
            model(torch.tensor([[5]]))  # the kernel routes are measured on first use
    files = export_gguf_files(base, folder)
    import llama_cpp

    # What llama.cpp was built with (e.g. AVX2 without AVX512, for an emulated laptop CPU), beside the CPU's flags.
    print(f"- llama-cpp-python {llama_cpp.__version__}: {llama_cpp.llama_print_system_info().decode().strip()}")
    n_ctx = max(args.prompt) + args.new_tokens + 8
    rows = []
    for prompt in args.prompt:
        ids = torch.randint(3, config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(prompt))
        mask = torch.ones_like(ids)
        best = {}
        for _ in range(args.repeats):
            results = {name: run_generate(model, ids, mask, args.new_tokens) for name, model in ours.items()}
            for qtype, path in files.items():
                llm = load_llama(path, n_ctx, threads)
                results[f"llama.cpp {qtype}"] = run_llama(llm, ids[0].tolist(), args.new_tokens)
                del llm
            for name, result in results.items():
                prev = best.setdefault(name, result)
                best[name] = {key: min(prev[key], result[key]) for key in ("ttft", "step")} | {"extra": float("nan")}
                print(f"  {name:24s} prompt {prompt:5d}: ttft {result['ttft']:7.2f} s, {1 / result['step']:7.2f} tok/s",
                      file=sys.stderr, flush=True)  # fmt: skip
        for name, result in best.items():
            rows.append((name, 1, prompt, result))

    # Top-1 agreement with float32 ReplitLM, teacher-forced over random ids.
    generator = torch.Generator().manual_seed(7)
    windows = torch.randint(3, config.vocab_size, (TOP1_WINDOWS, 128), generator=generator)
    agreement = {}
    with torch.inference_mode():
        reference = logits_of(random_replit(config, torch.float32), windows)
        for name, model in ours.items():
            agreement[name] = top1_agreement(reference, logits_of(model, windows))
    for qtype, path in files.items():
        llm = load_llama(path, 256, threads, logits_all=True)
        logits = []
        for window in windows:
            llm.reset()
            llm.eval(window.tolist())
            logits.append(torch.from_numpy(llm.scores[: len(window)].copy()))
        agreement[f"llama.cpp {qtype}"] = top1_agreement(reference, torch.stack(logits)[..., : config.vocab_size])
        del llm
    print_llama_table(rows, agreement, bandwidth)


def print_llama_table(rows, agreement: dict, bandwidth: float):
    speed = {(name, prompt): result for name, _, prompt, result in rows}
    print("| format | ours | prompt | decode tok/s ours / llama.cpp | ours / llama.cpp | ours vs MPT bf16 "
          "| TTFT s ours / llama.cpp / MPT bf16 | TTFT ours vs MPT bf16 | top-1 vs float32 ours / llama.cpp |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for prompt in sorted({prompt for _, prompt in speed}):
        mpt = speed[("MptForCausalLM bfloat16", prompt)]
        for qtype, our_format in LLAMA_PAIRS.items():
            ours, theirs = speed[(f"ReplitLM {our_format}", prompt)], speed[(f"llama.cpp {qtype}", prompt)]
            print(
                f"| {qtype} | {our_format} | {prompt} | {1 / ours['step']:.2f} / {1 / theirs['step']:.2f} "
                f"| {theirs['step'] / ours['step']:.2f}x | {mpt['step'] / ours['step']:.2f}x "
                f"| {ours['ttft']:.2f} / {theirs['ttft']:.2f} / {mpt['ttft']:.2f} | {mpt['ttft'] / ours['ttft']:.2f}x "
                f"| {100 * agreement[f'ReplitLM {our_format}']:.1f}% / {100 * agreement[f'llama.cpp {qtype}']:.1f}% |"
            )
    print(f"\nMptForCausalLM bfloat16 top-1 vs float32: {100 * agreement['MptForCausalLM bfloat16']:.1f}%; "
          f"memory read bandwidth {bandwidth / GB:.1f} GB/s.")  # fmt: skip


WITHOUT_AMX_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16", "LLAMA_NO_EXTRA_BUFTS": "1", ROUTE_CACHE_ENV: "off"}


def amx_turned_off() -> bool:
    """Whether this process runs with --without-amx's variables."""
    return all(os.environ.get(name) == value for name, value in WITHOUT_AMX_ENV.items())


def without_amx():
    """--without-amx: oneDNN reads its ISA cap once, when torch first uses it, so the run starts again in a process
    with the variables set (the route cache off too: its key does not know that AMX was turned off); then
    ReplitLM's AMX routes are taken off the offer."""
    if not amx_turned_off():
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **WITHOUT_AMX_ENV})
    quantization._has_amx = quantization._has_amx_bf16 = lambda: False


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=at_least(1), default=32, help="transformer blocks (32: the real model)")
    parser.add_argument("--batch", type=at_least(1), nargs="+", default=[1, 8])
    parser.add_argument("--prompt", type=at_least(1), nargs="+", default=[64, 512, 1024],
                        help="prompt lengths in tokens")  # fmt: skip
    # A decode step is timed between two tokens.
    parser.add_argument("--new-tokens", type=at_least(2), default=32, help="tokens generated per sequence")
    parser.add_argument("--repeats", type=at_least(1), default=2, help="interleaved runs per model; the best is kept")
    parser.add_argument("--threads", type=at_least(1), default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--models", nargs="+", default=["float32", "bfloat16", "int8", "int4"],
        choices=["float32", "bfloat16", "int8", "int4"],
        help="which of float32, bfloat16, int8, int4 to run (MptForCausalLM runs in float32 and bfloat16)",
    )  # fmt: skip
    parser.add_argument("--llama-cpp", action="store_true", help="run llama.cpp beside ReplitLM (batch 1)")
    parser.add_argument("--accuracy", metavar="MODEL_DIR", help="measure int8/int4 accuracy of this trained model")
    parser.add_argument("--window", type=at_least(2), default=256, help="--accuracy: tokens per window")
    parser.add_argument("--windows", type=at_least(1), default=32, help="--accuracy: number of windows")
    parser.add_argument(
        "--without-amx", action="store_true",
        help="AMX out of every engine, a stand-in on an AMX CPU for AVX512 CPUs without it (AMD EPYC): oneDNN capped "
        "at AVX512-BF16, ReplitLM's AMX routes not offered, llama.cpp without its AMX buffers, routes not cached",
    )  # fmt: skip
    args = parser.parse_args()
    context = replit_config(1).max_seq_len
    if max(args.prompt) + args.new_tokens > context:
        parser.error(
            f"--prompt {max(args.prompt)} with --new-tokens {args.new_tokens} exceeds the model's {context} tokens"
        )
    if args.accuracy and not Path(args.accuracy).is_dir():
        parser.error(f"--accuracy {args.accuracy}: no such model folder")
    if args.without_amx:
        without_amx()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.accuracy:
        measure_accuracy(args.accuracy, args.window, args.windows)
        return

    config = replit_config(args.layers)
    bandwidth = read_bandwidth()
    print(f"# ReplitLM vs MptForCausalLM: CPU generation, random weights, {args.layers} layers\n")
    print(f"- machine: {machine_description()}")
    print(f"- python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"- memory read bandwidth (measured): {bandwidth / GB:.1f} GB/s")
    print(f"- greedy generate, {args.new_tokens} new tokens per sequence, best of {args.repeats} interleaved runs\n")

    if args.llama_cpp:
        llama_cpp_comparison(args, config, bandwidth)
        return

    groups = []
    if "float32" in args.models:
        groups.append((torch.float32, ["float32"]))
    low = [m for m in ("bfloat16", "int8", "int4") if m in args.models]
    if low:
        groups.append((torch.bfloat16, low))

    rows = []
    for dtype, ours in groups:
        base = random_replit(config, dtype)
        models = {}
        if dtype == torch.float32 or "bfloat16" in ours:
            models[f"MptForCausalLM {str(dtype)[6:]}"] = mpt_sharing(base)
        for name in ours:
            models[f"ReplitLM {name}"] = base if name in ("float32", "bfloat16") else replit_sharing(base, name)
        for name, model in models.items():
            if name.startswith("ReplitLM"):  # the kernel routes are measured on first use: not in the timings
                started = time.perf_counter()
                with torch.inference_mode():
                    model(torch.tensor([[5]]))
                print(f"  {name}: kernel routes measured in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        for batch in args.batch:
            for prompt in args.prompt:
                generator = torch.Generator().manual_seed(batch * 10_000 + prompt)
                ids = torch.randint(3, config.vocab_size, (batch, prompt), generator=generator)
                mask = torch.ones_like(ids)
                best = {}
                for _ in range(args.repeats):
                    for name, model in models.items():
                        result = run_generate(model, ids, mask, args.new_tokens)
                        prev = best.setdefault(name, result)
                        best[name] = {
                            "ttft": min(prev["ttft"], result["ttft"]),
                            "step": min(prev["step"], result["step"]),
                            "extra": max(prev["extra"], result["extra"]),
                        }
                        print(
                            f"  {name:24s} batch {batch} prompt {prompt:5d}: ttft {result['ttft']:7.2f} s, "
                            f"{batch / result['step']:7.2f} tok/s",
                            file=sys.stderr,
                            flush=True,
                        )
                for name, model in models.items():
                    rows.append((name, batch, prompt, best[name], model_bytes(model), decode_bytes(model)))
        del base, models
        gc.collect()

    print_table(rows, bandwidth)
    print_routes()


def print_table(rows, bandwidth: float):
    # float32 is compared with MptForCausalLM float32 (the goal's pairing), every other format with its bfloat16.
    reference = {(name, b, p): r for name, b, p, r, *_ in rows if name.startswith("MptForCausalLM")}
    print(
        "| model | batch | prompt | time to first token (s) | decode tok/s | decode vs MPT | TTFT vs MPT "
        "| weight GB/s (% of read) | weights GB | peak GB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, batch, prompt, r, weights, per_step in sorted(rows, key=lambda row: (row[1], row[2])):
        speed = batch / r["step"]
        paired = "MptForCausalLM float32" if name.endswith("float32") else "MptForCausalLM bfloat16"
        mpt = reference.get((paired, batch, prompt), {"step": float("nan"), "ttft": float("nan")})
        ratio, ttft_ratio = mpt["step"] / r["step"], mpt["ttft"] / r["ttft"]
        achieved = per_step / r["step"]
        print(
            f"| {name} | {batch} | {prompt} | {r['ttft']:.2f} | {speed:.2f} | {ratio:.2f}x | {ttft_ratio:.2f}x "
            f"| {achieved / GB:.1f} ({100 * achieved / bandwidth:.0f}%) | {weights / GB:.2f} "
            f"| {(weights + r['extra']) / GB:.2f} |"
        )
    print(
        "\ndecode tok/s: tokens of all sequences per second, from the median step; vs MPT: against MptForCausalLM "
        "float32 for the float32 rows, bfloat16 for the others; weight GB/s: the bytes of the matrices a step reads "
        "(not the KV cache) per second; peak GB: the weights plus the most memory a run added."
    )


if __name__ == "__main__":
    main()
