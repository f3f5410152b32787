"""The embedded demo model: a complete model repository that loads through the Auto classes and generates, built
on the root's code (links, never copies), with its evaluation recorded in docs/demo.md."""

import json

from conftest import ROOT
from transformers import AutoModelForCausalLM, AutoTokenizer

from replit_tools import CODE_FILES, DEMO_MODEL as DEMO
from replit_tools.completion import Settings
from replit_tools.loading import load_completer


def test_demo_folder_is_complete_and_uses_the_roots_code():
    for name in ("config.json", "generation_config.json", "model.safetensors", "spiece.model", "tokenizer_config.json"):
        assert (DEMO / name).is_file(), name
    for name in CODE_FILES:
        link = DEMO / name
        assert link.is_symlink() and link.resolve() == (ROOT / name).resolve(), name
    size = sum(p.stat().st_size for p in DEMO.iterdir() if not p.is_symlink())
    assert size < 20 * 2**20, f"demo folder is {size / 2**20:.1f} MB"


def test_demo_loads_through_auto_classes_and_generates():
    model = AutoModelForCausalLM.from_pretrained(DEMO, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(DEMO, trust_remote_code=True)
    assert type(model).__name__ == "ReplitLM"
    assert model.num_parameters() < 10_000_000
    prompt = "def add(a, b):\n"
    x = tokenizer.encode(prompt, return_tensors="pt")
    y = model.generate(x, max_new_tokens=24, do_sample=False, eos_token_id=tokenizer.eos_token_id)
    completion = tokenizer.decode(y[0, x.shape[1] :], skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert completion.strip(), "the demo model completes a function header with something"
    # Trained on Python: the body of a function is indented.
    assert completion.startswith((" ", "\t")), repr(completion)


def test_demo_evaluation_is_recorded_and_documented():
    report = json.loads((DEMO / "evaluation.json").read_text())
    assert report["prompts"] >= 50 and 0 <= report["parse_rate"] <= 1
    assert report["held_out_perplexity"] > 1
    guide = (ROOT / "docs" / "demo.md").read_text()
    assert f"{report['held_out_loss']:.3f}" in guide
    assert f"{round(100 * report['parse_rate'])}%" in guide


README_PROMPTS = ("def fibonacci(n):", "def is_prime(n):", "class Stack:", "import os")


def test_the_readme_shows_what_the_demo_writes():
    """The README's demo block is the greedy completions of its four prompts (as `generate.py --greedy` prints
    them), so that it never shows a model the repository no longer has."""
    readme = (ROOT / "README.md").read_text()
    marker = readme.index("What the demo model writes for the four prompts")
    start = readme.index("```python\n", marker) + len("```python\n")
    block = readme[start : readme.index("```", start)]
    settings = Settings(greedy=True, max_new_tokens=128)
    completions = [c.text for c in load_completer(DEMO).complete(list(README_PROMPTS), settings)]
    shown = [prompt + completion.rstrip("\n") + "\n" for prompt, completion in zip(README_PROMPTS, completions)]
    assert block == "\n".join(shown)
