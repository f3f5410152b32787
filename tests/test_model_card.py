"""The model card (README.md) as a user reads it: its snippets run as written on the demo model, its copy command
takes every code file, and the fine-tuning recipe of docs/training.md and the completion snippet of
docs/completion.md run."""

import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from transformers import AutoModelForCausalLM

from replit_tools import CODE_FILES, DEMO_MODEL as DEMO


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
            # No GPU: the same code on the CPU, the kernel in Triton's interpreter, the model in float32 (the
            # interpreter cannot multiply bfloat16); the ids keep the card's cast to bfloat16.
            code = code.replace("model.to(device='cuda:0', dtype=torch.bfloat16)", "model.to(device='cpu')")
            code = code.replace("device='cuda:0'", "device='cpu'")
        else:
            pytest.skip("needs a GPU or Triton's interpreter")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def readme_section(heading: str, document: str = "README.md") -> str:
    text = (ROOT / document).read_text()
    return text.split(f"{heading}\n", 1)[1].split("\n## ", 1)[0]


def test_the_readme_copy_command_takes_every_code_file():
    """Putting the published weights beside our code: the README's `cp` names every file a model folder needs."""
    section = readme_section("## Using the real model")
    command = re.search(r"^cp (.*?)replit-code-v1-3b/$", section, flags=re.DOTALL | re.MULTILINE).group(1)
    named = set(command.replace("\\\n", " ").split())
    assert set(CODE_FILES) <= named
    assert {"config.json", "generation_config.json", "tokenizer_config.json"} <= named


def test_the_lora_recipe_runs_on_the_demo_model(tmp_path):
    """The fine-tuning recipe as written, on the demo model and a small project of this repository's own files:
    it trains the adapters (LoRA's B matrices start at zero and are not zero after) and saves them; the merging
    snippet after it writes a model folder that generate.py completes with."""
    peft = pytest.importorskip("peft")
    recipe, merging = re.findall(
        r"```python\n(.*?)```", readme_section("# Training and fine-tuning", "docs/training.md"), flags=re.DOTALL
    )
    code = recipe.replace('MODEL = "replit-code-v1-3b"', f"MODEL = {str(DEMO)!r}") + merging
    project = tmp_path / "my_project"
    project.mkdir()
    for path in (ROOT / "replit_tools").glob("*.py"):
        (project / path.name).write_text(path.read_text())
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    base = AutoModelForCausalLM.from_pretrained(DEMO, trust_remote_code=True)
    tuned = peft.PeftModel.from_pretrained(base, tmp_path / "lora-out" / "adapter")
    lora_b = [p for n, p in tuned.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 4 * base.config.n_layers
    assert all(p.abs().sum() > 0 for p in lora_b)
    completed = subprocess.run(
        [sys.executable, str(ROOT / "generate.py"), "--model", "lora-merged", "--greedy", "--max-new-tokens", "8",
         "def add(a, b):"], cwd=tmp_path, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert completed.returncode == 0 and completed.stdout.strip(), completed.stderr[-3000:]


def test_the_completion_snippet_runs_from_the_repository_root():
    """docs/completion.md's post-processing from Python, as written: two completions, each cut and told why."""
    text = (ROOT / "docs" / "completion.md").read_text()
    code = re.search(r"^From Python.*?```python\n(.*?)```", text, flags=re.DOTALL | re.MULTILINE).group(1)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    reasons = re.findall(r" (eos|stop_sequence|length) (\d+)$", result.stdout, flags=re.MULTILINE)
    assert len(reasons) == 2 and all(0 < int(tokens) <= 128 for _, tokens in reasons), result.stdout
