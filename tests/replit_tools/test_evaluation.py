"""replit_tools/evaluation.py: the prompts it builds from held-out files and the measure's ceiling (the files' own
code as completions). The demo model's recorded numbers are checked in test_demo.py."""

import ast

import pytest
from conftest import ROOT
from transformers import AutoTokenizer

from replit_tools import evaluation
from replit_tools.evaluation import function_prompts, original_code_parse_rate

MODULE = '''"""A module docstring long enough to straddle the context limit.

{filler}
def not_code():
    return "this line is inside the docstring"
"""

import os

CONSTANT = 1
\f


@staticmethod
def decorated(a):
    return a


def short(a, b):
    return a + b


def long_body(values):
    total = 0
    for value in values:
        if value > 0:
            total += value
        else:
            total -= value
    return total
'''


@pytest.fixture
def module_file(tmp_path):
    path = tmp_path / "module.py"
    path.write_text(MODULE.format(filler="filler text\n" * 70))
    return path


def test_prompts_end_with_the_header_and_start_where_a_statement_starts(module_file, monkeypatch):
    monkeypatch.setattr(evaluation, "CONTEXT_CHARS", 200)
    source = module_file.read_text()
    assert "\f\n" in source  # a form feed line, which ast counts as part of a line and str.splitlines as two
    statement_lines = {node.lineno for node in ast.parse(source).body} | {
        d.lineno for node in ast.parse(source).body for d in getattr(node, "decorator_list", [])
    }
    line_starts = [0, *(i + 1 for i, char in enumerate(source) if char == "\n")]
    statement_starts = {line_starts[n - 1] for n in statement_lines}
    prompts = {item.header: item for item in function_prompts([module_file], count=10, seed=0)}
    assert set(prompts) == {"def decorated(a):\n", "def short(a, b):\n", "def long_body(values):\n"}
    for header, item in prompts.items():
        assert item.prompt.endswith(header)
        start = source.index(item.prompt)
        assert start in statement_starts, f"the prompt for {header!r} starts mid-statement"
        assert source.index(header) - start <= 200 + len("@staticmethod\n")
        assert source[start + len(item.prompt) :] == item.original
    # Cut at a line boundary 200 characters back, this prompt would start inside the module docstring.
    assert prompts["def decorated(a):\n"].prompt.startswith(('"""', "import os", "CONSTANT", "@staticmethod"))
    assert not prompts["def decorated(a):\n"].prompt.startswith("filler")


@pytest.fixture(scope="module")
def demo_tokenizer():
    return AutoTokenizer.from_pretrained(ROOT / "demo", trust_remote_code=True)


def test_original_code_parses_when_the_budget_holds_the_function(module_file, demo_tokenizer):
    prompts = [item for item in function_prompts([module_file], 10, 0) if item.header != "def long_body(values):\n"]
    # The next definition's `def` is a stop sequence, so a long budget still cuts at the end of each function.
    assert original_code_parse_rate(demo_tokenizer, prompts, max_new_tokens=512) == 1
    long_body = [item for item in function_prompts([module_file], 10, 0) if item.header == "def long_body(values):\n"]
    assert original_code_parse_rate(demo_tokenizer, long_body, max_new_tokens=200) == 1
    assert original_code_parse_rate(demo_tokenizer, long_body, max_new_tokens=8) == 0  # cut inside the loop


def test_header_prompts_are_the_headers_alone_as_typed(module_file):
    items = evaluation.header_prompts([module_file], count=10, seed=0)
    assert sorted(item.prompt for item in items) == ["def decorated(a):", "def long_body(values):", "def short(a, b):"]
    assert all(item.header == item.prompt for item in items)  # header + completion is what the user gets


def test_the_failures_the_headers_only_measure_counts():
    assert evaluation.first_body_indent("def f(n):\n\n    return n") == "    "
    assert evaluation.first_body_indent("def f(n):\n            return n") == " " * 12
    assert evaluation.first_body_indent("def f(n):") is None
    assert evaluation.repeats_a_block("import os\nimport os\n\nimport os")
    assert not evaluation.repeats_a_block("import os\nimport sys\nimport os\nimport os")
    two_line_loop = "def f(x):\n" + "    if x:\n        return x\n" * 3
    assert not evaluation.repeats_a_block(two_line_loop) and evaluation.repeats_a_block(two_line_loop, max_lines=2)
    assert not evaluation.repeats_a_block("a\nb\na\nb\nc\na\nb", max_lines=3)
