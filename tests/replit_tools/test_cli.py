"""The command line end to end, as a subprocess on tiny model folders: greedy completions equal `model.generate`,
stop sequences truncate and stop generation early, --json parses, --stream prints the same text, published
snapshots load with our classes, and bad input is a one-line error."""

import json
import subprocess
import sys

import pytest
import torch
from completion_helpers import DEMO, SCRIPT_ENV, hub_folder, one_torch_thread, run_script, snapshot_folder  # noqa: F401
from conftest import ROOT

from replit_tools.completion import Completer, Settings, StreamListener
from replit_tools.loading import load_completer
from replit_tools.postprocessing import DEFAULT_STOP_SEQUENCES, find_stop, truncate
import replit_lm.quantization as quantization
from replit_lm.modeling_replit_lm import ReplitLM
from replit_lm.replit_lm_tokenizer import ReplitLMTokenizer

# Two prompts of different lengths, so that the batch is left-padded.
PROMPTS = ["def fibonacci(n):", 'import os\n\n\nclass Config:\n    """Settings read from the environment."""\n']
NEW_TOKENS = "24"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return hub_folder(tmp_path_factory.mktemp("cli") / "tiny")


@pytest.fixture(scope="module")
def reference(tiny):
    return ReplitLM.from_pretrained(tiny).eval(), ReplitLMTokenizer.from_pretrained(tiny)


def generate_alone(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The card's way: `model.generate` on the prompt alone, decoded up to end-of-text, no post-processing."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    output = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    generated = output[0, ids.shape[1] :].tolist()
    if tokenizer.eos_token_id in generated:
        generated = generated[: generated.index(tokenizer.eos_token_id)]
    return tokenizer.decode(generated, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def completed(result) -> str:
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


def test_greedy_batch_equals_model_generate_and_json_parses(tiny, reference):
    args = ["--model", str(tiny), "--greedy", "--no-stop", "--max-new-tokens", NEW_TOKENS, "--json"]
    output = json.loads(completed(run_script("generate.py", *args, *PROMPTS)))
    assert [(c["prompt_index"], c["index"]) for c in output["completions"]] == [(0, 0), (1, 0)]
    for completion, prompt in zip(output["completions"], PROMPTS):
        expected = generate_alone(*reference, prompt, int(NEW_TOKENS))
        assert completion["text"] == expected.rstrip()
        assert completion["prompt_tokens"] == len(reference[1](prompt)["input_ids"])
        assert completion["stop_reason"] in ("eos", "length") and completion["stop_sequence"] is None
        assert 1 <= completion["completion_tokens"] <= int(NEW_TOKENS)
    assert set(output["timing"]) == {"load_seconds", "generate_seconds", "tokens_per_second"}


def test_greedy_copies_count_once_in_the_speed(tiny):
    # Greedy -n 3 computes one completion and prints it three times: a speed over the three would be 3x the real one.
    args = ["--model", str(tiny), "--greedy", "--no-stop", "--max-new-tokens", NEW_TOKENS, "--json", "-n", "3"]
    output = json.loads(completed(run_script("generate.py", *args, PROMPTS[0])))
    tokens = [c["completion_tokens"] for c in output["completions"]]
    assert len(tokens) == 3 and len(set(tokens)) == 1
    timing = output["timing"]
    assert timing["tokens_per_second"] == pytest.approx(tokens[0] / timing["generate_seconds"], rel=0.02, abs=0.2)


def test_plain_output_of_a_prompt_read_from_stdin(tiny, reference):
    args = ["--model", str(tiny), "--greedy", "--no-stop", "--max-new-tokens", NEW_TOKENS, "--file", "-"]
    expected = generate_alone(*reference, PROMPTS[1], int(NEW_TOKENS))
    assert completed(run_script("generate.py", *args, stdin=PROMPTS[1])) == expected.rstrip() + "\n"


def mid_completion_stop(model, tokenizer, budget: int) -> tuple[str, str, str, int]:
    """(prompt, unstopped greedy completion, a 3-character stop sequence taken from its middle, where it matches)
    for the first of a few prompts whose random-weight completion has such a place (not inside a string or a
    comment, where stop sequences do not count)."""
    for prompt in (*PROMPTS, "x = 1\n", "import sys\n", "for i in range(3):\n"):
        unstopped = generate_alone(model, tokenizer, prompt, budget)
        for start in range(len(unstopped) // 4, 3 * len(unstopped) // 4):
            text = unstopped[start : start + 3]
            match = find_stop(unstopped, [text], prompt)
            if "\\" not in text and match is not None and match.index > 0:
                return prompt, unstopped, text, match.index
    raise AssertionError("no prompt's completion has a place for a stop sequence")


def test_stop_sequence_truncates_and_stops_generation_early(tiny, reference):
    budget = 40
    prompt, unstopped, stop, index = mid_completion_stop(*reference, budget)
    args = ["--model", str(tiny), "--greedy", "--max-new-tokens", str(budget), "--stop", stop, "--json", prompt]
    [completion] = json.loads(completed(run_script("generate.py", *args)))["completions"]
    assert completion["text"] == unstopped[:index].rstrip()
    assert (completion["stop_reason"], completion["stop_sequence"]) == ("stop_sequence", stop)
    assert completion["completion_tokens"] < budget  # generation stopped when the stop sequence appeared


def test_stream_prints_what_the_batch_prints(tiny, reference):
    args = ["--model", str(tiny), "--greedy", "--max-new-tokens", NEW_TOKENS, *PROMPTS]
    printed = completed(run_script("generate.py", *args))
    assert completed(run_script("generate.py", "--stream", *args)) == printed
    # ... which is the card's completion with the default post-processing, under one header per prompt.
    tokenizer = reference[1]
    expected = ""
    for number, prompt in enumerate(PROMPTS, start=1):
        raw = generate_alone(*reference, prompt, int(NEW_TOKENS))
        prompt_text = tokenizer.decode(tokenizer(prompt)["input_ids"], skip_special_tokens=True)
        expected += f"=== prompt {number}, completion 1 ===\n{truncate(raw, DEFAULT_STOP_SEQUENCES, prompt_text)[0]}\n"
    assert printed == expected


class Recorder(StreamListener):
    def __init__(self):
        self.events = []

    def begin(self, prompt_index, index):
        self.events.append(("begin", prompt_index, index))

    def text(self, piece):
        self.events.append(("text", piece))

    def end(self, completion):
        self.events.append(("end", completion))


@pytest.mark.parametrize("stops", [DEFAULT_STOP_SEQUENCES, ("\n",), ()])
def test_streamed_completions_equal_batched_ones(tiny, stops):
    completer = load_completer(tiny)
    settings = Settings(greedy=True, max_new_tokens=30, num_completions=2, stop_sequences=stops)
    batched = completer.complete(PROMPTS, settings)
    recorder = Recorder()
    streamed = completer.stream(PROMPTS, settings, recorder)
    assert streamed == batched
    texts, pieces = {}, 0
    for event in recorder.events:
        if event[0] == "begin":
            current = event[1:]
            texts[current] = ""
        elif event[0] == "text":
            assert event[1], "no empty pieces"
            texts[current] += event[1]
            pieces += 1
        else:
            assert texts[current] == event[1].text
    assert list(texts) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert pieces > len(texts)  # text came as it was generated, not all at the end


def test_model_options_reach_the_model(tiny):
    completer = load_completer(tiny, dtype="bfloat16", weight_quantization="int8", attn_impl="torch")
    assert completer.model.transformer.wte.weight.dtype == torch.bfloat16
    assert (completer.model.config.weight_quantization, completer.model.config.attn_impl) == ("int8", "torch")
    assert isinstance(completer, Completer) and completer.model.device.type == "cpu"


def test_the_kernel_routes_are_measured_as_the_model_loads(tiny, monkeypatch):
    """So that the first completion (a server's first request, a timed run) does not measure them."""
    monkeypatch.setattr(quantization, "ROUTES", quantization.RouteChooser())
    completer = load_completer(tiny, dtype="bfloat16", weight_quantization="int4")
    layers = [m for m in completer.model.modules() if isinstance(m, (quantization.QuantizedLinear, torch.nn.Linear))]
    assert layers and all(quantization.ROUTES.key(m, torch.bfloat16) in quantization.ROUTES.choices for m in layers)
    measured = dict(quantization.ROUTES.choices)
    completer.complete(["def f():"], Settings(max_new_tokens=4, greedy=True))
    assert quantization.ROUTES.choices == measured  # nothing left to measure


@pytest.mark.parametrize("schema", ["mpt", "release"])
def test_published_snapshots_load_with_our_classes(tmp_path, tiny, reference, schema):
    """A snapshot's own config.json, auto_map and code files: its code (here, code that fails when imported) must
    not run; our classes load its weights, config and spiece.model."""
    snapshot = snapshot_folder(tmp_path / schema, tiny, schema)
    args = ["--model", str(snapshot), "--greedy", "--no-stop", "--max-new-tokens", "12", PROMPTS[0]]
    assert completed(run_script("generate.py", *args)) == generate_alone(*reference, PROMPTS[0], 12).rstrip() + "\n"


BAD_INPUT = {
    "empty prompt": ([""], "empty"),
    "a prompt of characters the tokenizer drops": (["\x01\x02"], "has no tokens"),
    "prompt longer than the context": (["--max-new-tokens", "100", "x = 1\n" * 20], "context"),
    "missing model folder": (["--model", "/nonexistent/replit", "def f():"], "not found"),
    "unknown option value": (["--dtype", "float64", "def f():"], "float64"),
    "unknown device": (["--device", "tpu:0", "def f():"], "device"),
    "a device for no model": (["--device", "meta", "def f():"], "unknown device 'meta'"),
    "negative seed": (["--seed", "-1", "def f():"], "the seed must be 0 to 2**32 - 1, got -1"),
    "no prompt": ([], "no prompt"),
    "infinite temperature": (["--temperature", "inf", "def f():"], "temperature must be a finite number"),
    "top-p not a number": (["--top-p", "nan", "def f():"], "top-p"),
    # Bytes that are not UTF-8 reach Python as lone surrogates (surrogateescape): named, not a pybind11 error.
    "invalid UTF-8 argument": ([b"def f():\xff"], "lone surrogate"),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_a_one_line_error(tiny, case):
    args, expected = BAD_INPUT[case]
    result = run_script("generate.py", "--model", str(tiny), *args)
    stderr = result.stderr.decode()
    assert result.returncode != 0 and result.stdout == b""
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("error: "), stderr
    assert expected in stderr


def test_a_reader_that_leaves_early_is_no_error(tiny):
    """`generate.py --json ... | head`: the pipe closes before the output is written; that ends the command quietly,
    with the status a shell gives a process ended by SIGPIPE, not 'error: [Errno 32] Broken pipe'."""
    command = [sys.executable, str(ROOT / "generate.py"), "--model", str(tiny), "--json", "--greedy",
               "--max-new-tokens", "8", "def f():"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=SCRIPT_ENV)
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 141 and stderr == "", stderr


# Runs a script as `python SCRIPT ARGS` does (its folder first on sys.path) and reports on stderr, last, whether torch
# was imported.
RUN_AND_REPORT_TORCH = """
import os, runpy, sys
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print("torch imported" if "torch" in sys.modules else "torch not imported", file=sys.stderr)
"""


@pytest.mark.parametrize(
    "args, status, output",
    [
        (["--help"], 0, "usage: generate.py"),
        (["--top-p", "2", "def f():"], 1, "error: top-p must be in (0, 1], got 2.0"),
        ([], 1, "error: no prompt"),
        (["--stop", "x", "--no-stop", "def f():"], 2, "error: --stop and --no-stop exclude each other"),
    ],
)
def test_help_and_a_bad_command_line_answer_before_torch_loads(args, status, output):
    """Importing torch and transformers takes seconds; --help and what the command line alone can refuse do not
    wait for it."""
    result = subprocess.run([sys.executable, "-c", RUN_AND_REPORT_TORCH, str(ROOT / "generate.py"), *args],
                            capture_output=True, timeout=60, cwd=ROOT.parent, env=SCRIPT_ENV)  # fmt: skip
    stdout, stderr = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == status, stderr
    assert output in (stdout if status == 0 else stderr)
    assert stderr.splitlines()[-1] == "torch not imported", stderr


@pytest.mark.skipif(not (DEMO / "config.json").exists(), reason="the demo model (demo/) is not built")
def test_demo_model_is_the_default():
    model, tokenizer = ReplitLM.from_pretrained(DEMO).eval(), ReplitLMTokenizer.from_pretrained(DEMO)
    printed = completed(run_script("generate.py", "--greedy", "--no-stop", "--max-new-tokens", "32", PROMPTS[0]))
    assert printed == generate_alone(model, tokenizer, PROMPTS[0], 32).rstrip() + "\n"
    # With the card's sampling and the default stop sequences it completes too.
    assert completed(run_script("generate.py", "--seed", "0", "def fibonacci(n):")).strip()
