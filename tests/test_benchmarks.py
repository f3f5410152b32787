"""The benchmark scripts answer a bad option in one line, before any work (they ended in tracebacks deep in torch,
transformers or the standard library, or printed rows of inf and nan)."""

import pytest
from completion_helpers import run_script


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("bench_cpu_decode.py", ["--prompt", "3000"], "--prompt 3000 with --new-tokens 32 exceeds the model's 2048"),
        ("bench_cpu_decode.py", ["--threads", "-2"], "argument --threads: must be at least 1, got -2"),
        ("bench_cpu_decode.py", ["--accuracy", "/nonexistent"], "--accuracy /nonexistent: no such model folder"),
        ("bench_decode_attention.py", ["--layers", "0"], "argument --layers: must be at least 1"),
        ("bench_decode_attention.py", ["--new-tokens", "1"], "argument --new-tokens: must be at least 2"),
        ("bench_decode_attention.py", ["--prompt", "3000"], "must stay within the model's 2048 tokens"),
        ("bench_tokenizer.py", ["--repeat", "0"], "argument --repeat: must be at least 1"),
        ("bench_server.py", ["--clients", "0"], "argument --clients: must be at least 1"),
        ("bench_server.py", ["--repeats", "x"], "argument --repeats: invalid whole_number value: 'x'"),
        ("bench_packed_training.py", ["--shortest", "600"], "--shortest 600 is longer than --longest 512"),
        ("bench_packed_training.py", ["--heads", "3"], "--d-model 256 is not a multiple of --heads 3"),
        ("check_tokenizer_ids.py", ["--files", "0"], "argument --files: must be at least 1"),
        ("check_tokenizer_ids.py", ["--reference-python", "/nonexistent/python"], "no such program"),
    ],
)
def test_a_bad_option_is_one_line(script, args, message):
    result = run_script(f"benchmarks/{script}", *args)
    stderr = result.stderr.decode()
    assert result.returncode == 2 and "Traceback" not in stderr, stderr
    assert message in stderr.strip().splitlines()[-1], stderr
