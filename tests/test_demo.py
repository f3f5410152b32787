"""The embedded demo model: a complete model repository that loads through the Auto classes and generates, built
on the root's code (links, never copies); and the model card's snippets, run as written on it."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from transformers import AutoModelForCausalLM, AutoTokenizer

import replit_lm_package

DEMO = ROOT / "demo"


def test_demo_folder_is_complete_and_uses_the_roots_code():
    for name in ("config.json", "generation_config.json", "model.safetensors", "spiece.model", "tokenizer_config.json"):
        assert (DEMO / name).is_file(), name
    for name in replit_lm_package.CODE_FILES:
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


def test_demo_evaluation_is_recorded_and_in_the_readme():
    report = json.loads((DEMO / "evaluation.json").read_text())
    assert report["prompts"] >= 50 and 0 <= report["parse_rate"] <= 1
    assert report["held_out_perplexity"] > 1
    readme = (ROOT / "README.md").read_text()
    assert f"{report['held_out_loss']:.3f}" in readme
    assert f"{round(100 * report['parse_rate'])}%" in readme


def card_snippets() -> list[str]:
    """The Python blocks of the README's section of the model card's snippets."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### The card's snippets", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


@pytest.mark.parametrize("index", range(3))
def test_the_cards_snippets_run_as_written(tmp_path, index):
    snippets = card_snippets()
    assert len(snippets) == 3
    code = snippets[index].replace("'replit/replit-code-v1-3b'", repr(str(DEMO)))
    if "cuda" in code:
        if torch.cuda.is_available():
            pass
        elif os.environ.get("TRITON_INTERPRET") == "1":
            # No GPU: the same code on the CPU, the kernel in Triton's interpreter, in float32 (the interpreter
            # cannot multiply bfloat16).
            code = code.replace("device='cuda:0', dtype=torch.bfloat16", "device='cpu'")
            code = code.replace("device='cuda:0'", "device='cpu'")
        else:
            pytest.skip("needs a GPU or Triton's interpreter")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def readme_section(heading: str) -> str:
    readme = (ROOT / "README.md").read_text()
    return readme.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]


def test_the_readme_copy_command_takes_every_code_file():
    """Putting the published weights beside our code: the README's `cp` names every file a model folder needs."""
    section = readme_section("## Using the real model")
    command = re.search(r"^cp (.*?)replit-code-v1-3b/$", section, flags=re.DOTALL | re.MULTILINE).group(1)
    named = set(command.replace("\\\n", " ").split())
    assert set(replit_lm_package.CODE_FILES) <= named
    assert {"config.json", "generation_config.json", "tokenizer_config.json"} <= named


def test_the_readme_lora_recipe_runs_on_the_demo_model(tmp_path):
    """The fine-tuning recipe as written, on the demo model and a small project of this repository's own files:
    it trains the adapters (LoRA's B matrices start at zero and are not zero after) and saves them."""
    peft = pytest.importorskip("peft")
    [code] = re.findall(r"```python\n(.*?)```", readme_section("## Training and fine-tuning"), flags=re.DOTALL)
    code = code.replace('MODEL = "replit-code-v1-3b"', f"MODEL = {str(DEMO)!r}")
    project = tmp_path / "my_project"
    project.mkdir()
    for name in ("replit_lm_package.py", "sentencepiece_recipe.py", "postprocessing.py", "evaluate_completions.py"):
        (project / name).write_text((ROOT / name).read_text())
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    base = AutoModelForCausalLM.from_pretrained(DEMO, trust_remote_code=True)
    tuned = peft.PeftModel.from_pretrained(base, tmp_path / "lora-out" / "adapter")
    lora_b = [p for n, p in tuned.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 4 * base.config.n_layers
    assert all(p.abs().sum() > 0 for p in lora_b)
