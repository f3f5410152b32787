"""Tiny model folders for the completion tests (command line, server): random weights of a small ReplitLM and a
small SentencePiece vocabulary trained with the real one's recipe, laid out like the Hub repository or like a
downloaded snapshot of it."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import MODEL_CODE_FILES, ROOT, SHARED, VOCABULARY_SOURCES
from safetensors.torch import save_file

from replit_lm.configuration_replit_lm import ReplitLMConfig
from replit_lm.modeling_replit_lm import ReplitLM
from replit_tools.sentencepiece_recipe import train_sentencepiece

TINY_SHAPE = dict(d_model=64, n_heads=4, n_layers=2, max_seq_len=128, vocab_size=1000)
DEMO = ROOT / "demo"
# Layout of the May 2023 release's checkpoint, from the published one.
PUBLISHED_TO_RELEASE = {
    ".norm_1.": ".ln_1.",
    ".norm_2.": ".ln_2.",
    ".ffn.up_proj.": ".mlp.mlp_up.",
    ".ffn.down_proj.": ".mlp.mlp_down.",
    "transformer.norm_f.": "transformer.ln_f.",
}
# Code files of a published snapshot: their import would mean the snapshot's code ran instead of ours.
POISONED_CODE = "raise ImportError('the snapshot code was imported: our classes must be used')\n"
# Scripts run offline, and on one thread: a tiny model gains nothing from more, and on a busy machine torch's
# threads wait for each other (a completion took 13 s on two threads, 0.2 s on one).
SCRIPT_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """In-process generation on one thread too (see SCRIPT_ENV); import this fixture into a test module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_vocabulary(folder: Path):
    """`folder`/spiece.model: the real model's recipe, trained on conftest's VOCABULARY_SOURCES (a second)."""
    lines = [line for path in VOCABULARY_SOURCES for line in path.read_text().splitlines(keepends=True)]
    train_sentencepiece(iter(lines), folder / "spiece", TINY_SHAPE["vocab_size"], num_threads=1, minloglevel=2)
    (folder / "spiece.vocab").unlink()


def tiny_model() -> ReplitLM:
    torch.manual_seed(0)
    return ReplitLM(ReplitLMConfig(**TINY_SHAPE)).eval()


def published_tensors(model: ReplitLM) -> dict:
    """The tensors a published checkpoint holds: no lm_head (it is tied to the embedding)."""
    return {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}


def hub_folder(folder: Path) -> Path:
    """A tiny model laid out like the Hub repository: our config.json, code and tokenizer files, safetensors
    weights and a spiece.model."""
    folder.mkdir(parents=True)
    config = json.loads((ROOT / "config.json").read_text())
    config.update(TINY_SHAPE)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(published_tensors(tiny_model()), folder / "model.safetensors", metadata={"format": "pt"})
    for name in (*MODEL_CODE_FILES, "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(ROOT / name, folder / name)
    train_vocabulary(folder)
    return folder


def snapshot_folder(folder: Path, weights_of: Path, schema: str) -> Path:
    """The model of `weights_of` laid out like a downloaded snapshot of replit/replit-code-v1-3b: the snapshot's own
    config.json (`schema` "mpt", as published today, or "release", May 2023), auto_map and tokenizer_config.json,
    and code files that fail when imported."""
    if not (SHARED / f"config.{schema}.json").exists():
        pytest.skip(f"needs the published config.json files in {SHARED}")
    folder.mkdir(parents=True)
    config = json.loads((SHARED / f"config.{schema}.json").read_text())
    config.update(TINY_SHAPE)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tensors = published_tensors(ReplitLM.from_pretrained(weights_of))
    if schema == "release":
        for published, release in PUBLISHED_TO_RELEASE.items():
            tensors = {name.replace(published, release): value for name, value in tensors.items()}
        torch.save(tensors, folder / "pytorch_model.bin")
    else:
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    for name in ("configuration_mpt.py", "modeling_mpt.py", "replit_lm.py", "configuration_replit_lm.py",
                 "replit_lm_tokenizer.py"):  # fmt: skip
        (folder / name).write_text(POISONED_CODE)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(SHARED / name, folder / name)
    shutil.copy(weights_of / "spiece.model", folder / "spiece.model")
    return folder


def run_script(script: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    """Run one of the repository's scripts as a user would, from another working directory; output as bytes."""
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        input=stdin.encode(),
        capture_output=True,
        timeout=180,
        cwd=ROOT.parent,
        env=SCRIPT_ENV,
    )


def stop_process(process: subprocess.Popen):
    """Stop a server the test started: politely, then for sure."""
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
