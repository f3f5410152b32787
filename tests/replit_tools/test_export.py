"""export.py: the MPT folder against ReplitLM in transformers' own MptForCausalLM (weights, logits, greedy tokens,
tokenizer ids), its config against vLLM's assertions, the GGUF file in llama.cpp (through llama-cpp-python, skipped
when it is not installed), and the command line's errors."""

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from completion_helpers import (  # noqa: F401
    DEMO,
    SCRIPT_ENV,
    hub_folder,
    one_torch_thread,
    run_script,
    snapshot_folder,
    stop_process,
)
from conftest import ROOT, SHARED
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, MptConfig, MptForCausalLM

from replit_lm.configuration_replit_lm import ReplitLMConfig
from replit_lm.modeling_replit_lm import ReplitLM
from replit_lm.replit_lm_tokenizer import ReplitLMTokenizer, _as_trained, _SentencePieceModel
from replit_tools import export as exporter

PROMPTS = [
    "def fibonacci(n):\n",
    "import os\nimport sys\n\n\nclass Stack:\n    def __init__(self):\n",
    "for i in range(10):\n\tprint(i)",
]
SNIPPETS = 1000
# The exported tokenizers (tokenizers' Unigram model in tokenizer.json, llama.cpp's) keep the first of two
# segmentations of equal score; the ids of training are sentencepiece 0.1.99's choice, which follows its float32
# rounding of the running score (docs/tokenizer.md), so they differ among ties only: measured 5.8% of the snippets
# with the demo's vocabulary and 5.4% with the real one (docs/export.md).
MAX_TIE_RATE = 0.08


def code_snippets(count: int = SNIPPETS, seed: int = 0) -> list[str]:
    """`count` windows of 1-12 lines from the standard library's Python files: real code, always the same ones."""
    files = sorted(Path(os.__file__).parent.glob("*.py"))
    rng = random.Random(seed)
    snippets = []
    while len(snippets) < count:
        lines = rng.choice(files).read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
        start = rng.randrange(len(lines))
        text = "".join(lines[start : start + rng.randint(1, 12)])
        if text.strip() and "<|" not in text:  # no literal special tokens: engines differ on parsing them
            snippets.append(text)
    return snippets


def tie_checker(spiece_model: Path, tokenizer: ReplitLMTokenizer):
    """check(ids, expected) -> "same", "tie" (another segmentation of the same text with the same score, up to
    float32 rounding: SentencePiece's choice among them follows its rounding) or "different"."""
    scores = [score for _, score, _ in _as_trained(_SentencePieceModel.read(spiece_model)).pieces]

    def check(ids, expected):
        if ids == expected:
            return "same"
        same_text = tokenizer.decode(ids) == tokenizer.decode(expected)
        same_score = abs(sum(scores[i] for i in ids) - sum(scores[i] for i in expected)) < 1e-3
        return "tie" if same_text and same_score else "different"

    return check


def real_vocabulary_folder(folder: Path) -> Path:
    """A tiny model (random weights) with the real spiece.model and vocabulary size, laid out like the Hub repo."""
    if not (SHARED / "spiece.model").exists():
        pytest.skip(f"needs the real spiece.model in {SHARED}")
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    model = ReplitLM(ReplitLMConfig(d_model=64, n_heads=4, n_layers=2, max_seq_len=128, vocab_size=32768))
    model.config.save_pretrained(folder)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(SHARED / "spiece.model", folder / "spiece.model")
    return folder


@pytest.fixture(scope="module")
def demo_mpt(tmp_path_factory):
    return exporter.export(DEMO, "mpt", tmp_path_factory.mktemp("mpt") / "demo-mpt", "f32")


@pytest.fixture(scope="module")
def ours():
    return ReplitLM.from_pretrained(DEMO, dtype=torch.float32).eval(), ReplitLMTokenizer.from_pretrained(DEMO)


# ----- MPT -----------------------------------------------------------------------------------------------------------


def test_mpt_folder_loads_without_remote_code(demo_mpt):
    names = {path.name for path in demo_mpt.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "spiece.model", "README.md"} <= names  # fmt: skip
    assert not any(name.endswith(".py") for name in names)
    model, info = MptForCausalLM.from_pretrained(demo_mpt, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert type(AutoModelForCausalLM.from_pretrained(demo_mpt)) is MptForCausalLM  # no trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(demo_mpt)
    special_ids = (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id)
    assert special_ids == (1, 2, 0, None)
    assert set(tokenizer("def f():")) == {"input_ids", "attention_mask"}  # transformers 4 would add token_type_ids
    config = json.loads((demo_mpt / "config.json").read_text())
    assert config["architectures"] == ["MptForCausalLM"] and config["model_type"] == "mpt"
    assert json.loads((demo_mpt / "generation_config.json").read_text())["use_cache"] is True
    # The demo's 8 heads split over 1, 2, 4 or 8 GPUs (vLLM asserts n_heads % tensor_parallel_size == 0).
    readme = (demo_mpt / "README.md").read_text()
    assert f"vllm serve {demo_mpt} --tensor-parallel-size N" in readme
    assert "# N divides 8 (the number of heads): 1, 2, 4, 8\n" in readme


def test_mpt_logits_equal_replit_lm_on_padded_batches(demo_mpt, ours):
    model, tokenizer = ours
    mpt = MptForCausalLM.from_pretrained(demo_mpt, dtype=torch.float32).eval()
    for side in ("left", "right"):
        tokenizer.padding_side = side
        batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
        with torch.no_grad():
            expected, got = model(**batch).logits, mpt(**batch).logits
        real = batch["attention_mask"].bool()
        torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=0)
    tokenizer.padding_side = "right"


def test_mpt_greedy_tokens_equal_replit_lm(demo_mpt, ours):
    model, tokenizer = ours
    mpt = MptForCausalLM.from_pretrained(demo_mpt, dtype=torch.float32).eval()
    tokenizer.padding_side = "left"
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    tokenizer.padding_side = "right"
    settings = dict(max_new_tokens=32, do_sample=False, pad_token_id=2, eos_token_id=1)
    assert torch.equal(mpt.generate(**batch, **settings), model.generate(**batch, **settings))


def exported_tokenizer_agrees(folder: Path, spiece_model: Path):
    exported = AutoTokenizer.from_pretrained(folder)
    exact = ReplitLMTokenizer(vocab_file=str(spiece_model))
    check = tie_checker(spiece_model, exact)
    outcomes = [check(exported.encode(text), exact.encode(text)) for text in code_snippets()]
    assert "different" not in outcomes
    assert outcomes.count("tie") <= MAX_TIE_RATE * SNIPPETS, outcomes.count("tie")
    for text in PROMPTS:
        assert exported.decode(exported.encode(text)) == text


def test_mpt_tokenizer_ids_equal_on_the_demo(demo_mpt):
    exported_tokenizer_agrees(demo_mpt, DEMO / "spiece.model")


def test_mpt_tokenizer_ids_equal_on_the_real_vocabulary(tmp_path):
    out = exporter.export(real_vocabulary_folder(tmp_path / "real"), "mpt", tmp_path / "real-mpt", "f32")
    exported_tokenizer_agrees(out, SHARED / "spiece.model")


def test_mpt_export_of_the_release_checkpoint_layout(tmp_path):
    """A snapshot in the May 2023 layout (other tensor names, pytorch_model.bin, poisoned code files), in bfloat16."""
    tiny = hub_folder(tmp_path / "tiny")
    snapshot = snapshot_folder(tmp_path / "snapshot", tiny, "release")
    out = exporter.export(snapshot, "mpt", tmp_path / "mpt", "bf16")
    mpt = MptForCausalLM.from_pretrained(out, dtype="auto").eval()  # transformers 4 defaults to float32
    assert mpt.dtype == torch.bfloat16 and json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    expected = ReplitLM.from_pretrained(tiny).state_dict()
    for name, tensor in mpt.state_dict().items():
        assert torch.equal(tensor, expected[name].bfloat16()), name


# vLLM's MPT implementation, vllm/model_executor/models/mpt.py (vllm-project/vllm at commit 02d799bc, vLLM 0.11
# era), read for its assertions and for the config fields it reads; restated here, not copied.
def check_vllm_mpt_assertions(config: MptConfig, tensor_parallel_size: int):
    attention = config.attn_config
    assert config.embedding_fraction == 1.0  # MPTModel
    assert config.norm_type == "low_precision_layernorm"  # MPTModel
    assert config.tie_word_embeddings  # MPTForCausalLM: the head is the embedding
    assert attention.alibi and not attention.prefix_lm  # MPTAttention
    assert config.n_heads % tensor_parallel_size == 0  # MPTAttention: heads split across GPUs
    kv_heads = attention.kv_n_heads if "kv_n_heads" in attention else config.n_heads  # MPTAttention's lookup
    assert kv_heads % tensor_parallel_size == 0 or tensor_parallel_size % kv_heads == 0
    # Fields vLLM ignores, so they must hold what it assumes: no biases (else it builds bias parameters the
    # checkpoint lacks), no QK LayerNorm (it would build q_ln/k_ln), 1/sqrt(head_dim) softmax scale, LayerNorm eps
    # 1e-5, no logit scale, gelu MLP of expansion_ratio * d_model.
    assert config.no_bias and not attention.qk_ln
    assert attention.softmax_scale is None and config.layer_norm_epsilon == 1e-5 and config.logit_scale is None


@pytest.mark.parametrize("shape", ["demo", "real"])
def test_exported_config_passes_vllms_mpt_assertions(demo_mpt, tmp_path, shape):
    if shape == "real":  # the real model's config: the root config.json, exported without weights
        real = ReplitLMConfig.from_pretrained(Path(exporter.__file__).parents[1])
        config_dict = exporter.mpt_config_dict(real, torch.float32)
        assert (config_dict["d_model"], config_dict["n_layers"], config_dict["n_heads"]) == (2560, 32, 32)
    else:
        config_dict = json.loads((demo_mpt / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config_dict))
    config = MptConfig.from_pretrained(tmp_path)
    for tensor_parallel_size in (1, 2, 4, 8):
        check_vllm_mpt_assertions(config, tensor_parallel_size)
    # TGI's MPT code (server/.../custom_modeling/mpt_modeling.py) reads these from config.json without defaults.
    for key in ("attn_impl", "attn_type", "clip_qkv", "qk_ln", "softmax_scale", "attn_pdrop", "prefix_lm",
                "attn_uses_sequence_id", "alibi", "alibi_bias_max"):  # fmt: skip
        assert key in config_dict["attn_config"], key
    assert config_dict["attn_config"]["attn_type"] == "multihead_attention"
    assert "verbose" in config_dict["init_config"] and config_dict["init_device"] == "cpu"


# ----- command line --------------------------------------------------------------------------------------------------


def test_command_line_writes_the_export(tmp_path):
    written = run_script("export.py", "--to", "mpt", str(tmp_path / "out"))
    assert written.returncode == 0, written.stderr.decode()
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "{tmp}", "--to", "mpt", "{tmp}/x"], "is not a model folder"),
        (["--to", "gguf", "{tmp}/x.gguf", "--type", "q5_k"], "--type q5_k is not available for gguf"),
        (["--to", "mpt", "{tmp}/x", "--type", "q8_0"], "--type q8_0 is not available for mpt"),
        (["--to", "gguf", "{tmp}/x.gguf", "--type", ""], "is not available for gguf"),  # not the default type
        (["--to", "mpt", "/proc/x"], "cannot write in the folder /proc"),  # not the name of a temporary folder
        (["--to", "mpt", "{tmp}/exists"], "already exists"),
        (["--to", "gguf", "{tmp}/x.bin"], "ends in .gguf"),
        (["--to", "onnx", "{tmp}/x"], "invalid choice"),
        (["--to", "gguf", ""], "the output path is empty"),  # was ". already exists"
    ],
)
def test_bad_input_is_one_line_and_exit_1(tmp_path, capsys, args, message):
    (tmp_path / "exists").mkdir()
    try:
        status = exporter.main([arg.format(tmp=tmp_path) for arg in args])
    except SystemExit as exit_:  # argparse's errors
        status = exit_.code
    stderr = capsys.readouterr().err
    assert status == 1 and stderr.startswith("error: ") and message in stderr, stderr
    assert stderr.count("\n") == 1, stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["exists"]


def test_not_this_model_is_one_error(tmp_path):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    shutil.copy(DEMO / "spiece.model", folder / "spiece.model")
    with pytest.raises(exporter.ExportError, match="cannot load .*gpt2 as a replit-code-v1-3b model"):
        exporter.export(folder, "mpt", tmp_path / "out", "f32")


def demo_copy(folder: Path, **config_fields) -> Path:
    """The demo model folder with some config.json fields changed (its code files copied, not linked)."""
    shutil.copytree(DEMO, folder, symlinks=False)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **config_fields}))
    return folder


def test_a_model_quantized_by_its_config_exports_its_weights(tmp_path, demo_mpt):
    """weight_quantization in config.json quantizes the model as it loads; the export takes the weights as they are
    stored (it wrote 10 of the 26 tensors, and MptForCausalLM filled the rest with random values)."""
    folder = demo_copy(tmp_path / "int8", weight_quantization="int8")
    exported = exporter.export(folder, "mpt", tmp_path / "out", "f32")
    from safetensors.torch import load_file

    got, expected = load_file(exported / "model.safetensors"), load_file(demo_mpt / "model.safetensors")
    assert got.keys() == expected.keys() and all(torch.equal(got[name], expected[name]) for name in expected)


@pytest.mark.parametrize(
    "fields, message",
    [({"logit_scale": 0.5}, "logit_scale 0.5"), ({"tie_word_embeddings": False}, "tie_word_embeddings: false")],
)
def test_what_mpt_cannot_compute_is_refused(tmp_path, fields, message):
    """MptForCausalLM, vLLM and llama.cpp ignore logit_scale and tie the output layer: exported, such a model would
    compute other logits (its lm_head and logit_scale were dropped without a word)."""
    folder = demo_copy(tmp_path / "model", **fields)
    if "tie_word_embeddings" in fields:  # an output layer of its own
        from safetensors.torch import load_file

        tensors = load_file(folder / "model.safetensors")
        tensors["lm_head.weight"] = tensors["transformer.wte.weight"] + 0.01
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(exporter.ExportError, match=message):
        exporter.export(folder, "gguf", tmp_path / "out.gguf", "f32")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]


# An export killed by a signal while it writes (in a process of its own: without the handler, the signal ends it).
KILLED_EXPORT = """
import os, signal, sys, time
from replit_tools import export as exporter

def killed(*args):
    args[-1].write_bytes(b"partial")
    os.kill(os.getpid(), getattr(signal, sys.argv[1]))
    time.sleep(60)  # the signal's handler interrupts this

exporter.export_gguf = killed
sys.exit(exporter.main(["--model", sys.argv[2], "--to", "gguf", sys.argv[3]]))
"""


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_leave_nothing(tmp_path, signame):
    """timeout, docker stop and a closed terminal stop an export as Ctrl-C does: by default, SIGTERM and SIGHUP ended
    the process at once and left the temporary export behind."""
    done = subprocess.run([sys.executable, "-c", KILLED_EXPORT, signame, str(DEMO), str(tmp_path / "out.gguf")],
                          cwd=ROOT, env=SCRIPT_ENV, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 130 and done.stderr.endswith("error: interrupted; nothing was written\n"), done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("to, name", [("mpt", "out"), ("gguf", "out.gguf")])
def test_a_name_taken_during_the_export_is_left_alone(tmp_path, monkeypatch, to, name):
    """Checked at the start, the output's name can be taken while the export runs (a user, a second export): the
    rename at the end replaced a file or an empty folder without a word."""
    output = tmp_path / name
    write = getattr(exporter, f"export_{to}")

    def meanwhile(*args):
        write(*args)
        output.mkdir() if to == "mpt" else output.write_bytes(b"precious")

    monkeypatch.setattr(exporter, f"export_{to}", meanwhile)
    with pytest.raises(exporter.ExportError, match="appeared while exporting"):
        exporter.export(DEMO, to, output, "f32")
    assert list(tmp_path.iterdir()) == [output]
    assert list(output.iterdir()) == [] if to == "mpt" else output.read_bytes() == b"precious"


def test_a_full_disk_is_named(tmp_path, monkeypatch):
    """numpy's tofile says only "147456 requested and 55360 written" when the disk fills."""
    gguf = pytest.importorskip("gguf")

    def full(self):
        raise OSError("147456 requested and 55360 written")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full)
    with pytest.raises(exporter.ExportError, match=r"writing .*out.gguf failed \(147456 requested.*MiB are free"):
        exporter.export(DEMO, "gguf", tmp_path / "out.gguf", "f32")
    assert list(tmp_path.iterdir()) == []


def test_an_output_name_too_long_for_the_temporary_one_fails_before_loading(tmp_path, monkeypatch):
    monkeypatch.setattr(exporter, "load", lambda *args: pytest.fail("loaded before the name was checked"))
    with pytest.raises(exporter.ExportError, match="cannot write in the folder.*too long"):
        exporter.export(DEMO, "gguf", tmp_path / ("x" * 240 + ".gguf"), "f32")


@pytest.mark.parametrize("to, name", [("mpt", "out"), ("gguf", "out.gguf")])
def test_an_interrupted_export_leaves_nothing(tmp_path, monkeypatch, to, name):
    def interrupted(*args):
        target = args[-1]  # the temporary folder or file
        (target / "model.safetensors" if to == "mpt" else target).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(exporter, f"export_{to}", interrupted)
    with pytest.raises(KeyboardInterrupt):
        exporter.export(DEMO, to, tmp_path / name, "f32")
    assert list(tmp_path.iterdir()) == []


def test_an_export_removes_what_a_killed_one_left(tmp_path, monkeypatch):
    """A SIGKILL leaves the temporary file or folder behind (gigabytes at the real size): the next export to the same
    name removes those of processes that are gone, and keeps a running one's and other names'."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    output = tmp_path / "out.gguf"
    stale_file = tmp_path / f".out.gguf.{gone.pid}.k3x_9q.partial"
    stale_folder = tmp_path / f".out.gguf.{gone.pid}.a1b2c3.partial"
    running = tmp_path / f".out.gguf.{os.getpid()}.zz9.partial"
    other_name = tmp_path / f".out.gguf.1.gguf.{gone.pid}.abc.partial"  # an export to out.gguf.1.gguf
    for path in (stale_file, running, other_name):
        path.write_bytes(b"partial")
    stale_folder.mkdir()
    (stale_folder / "model.safetensors").write_bytes(b"partial")

    def written_by_a_killed_process(*args):
        target = args[-1]
        assert target.name.startswith(f".out.gguf.{os.getpid()}.")  # the writer's id in the temporary name
        raise KeyboardInterrupt

    monkeypatch.setattr(exporter, "export_gguf", written_by_a_killed_process)
    with pytest.raises(KeyboardInterrupt):
        exporter.export(DEMO, "gguf", output, "f32")
    assert sorted(tmp_path.iterdir()) == sorted([running, other_name])


# ----- GGUF in llama.cpp ---------------------------------------------------------------------------------------------

# f32 weights, llama.cpp's default f16 KV cache and its tanh-approximated GELU against float32 PyTorch with the exact
# GELU: 0.031 at most measured on the demo's logits over 3200 positions (0.029 with an f32 cache: the GELU's share);
# see docs/export.md.
GGUF_LOGITS_ATOL = 5e-2


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp")


def llama(llama_cpp, path: Path, vocab_only: bool = False):
    """The file in llama.cpp, without its extra CPU buffer types (their AMX kernels die with SIGILL on a machine that
    does not grant AMX's tile state; they change speed only)."""
    return exporter.open_gguf(
        path, extra_buffer_types=False, n_ctx=512, n_threads=1, n_batch=512, logits_all=not vocab_only,
        vocab_only=vocab_only,
    )  # fmt: skip


@pytest.fixture(scope="module")
def demo_gguf(tmp_path_factory):
    pytest.importorskip("gguf")
    return exporter.export(DEMO, "gguf", tmp_path_factory.mktemp("gguf") / "demo.f32.gguf", "f32")


def gguf_ids_agree(llama_cpp, gguf_path: Path, spiece_model: Path) -> float:
    """Token ids of llama.cpp and ReplitLMTokenizer on SNIPPETS pieces of code: the same, or an equal-score tie.
    Returns the rate of ties."""
    engine = llama(llama_cpp, gguf_path, vocab_only=True)
    exact = ReplitLMTokenizer(vocab_file=str(spiece_model))
    check = tie_checker(spiece_model, exact)
    pairs = [(engine.tokenize(text.encode("utf-8"), add_bos=False, special=False), exact.encode(text))
             for text in code_snippets()]  # fmt: skip
    outcomes = [check(ids, expected) for ids, expected in pairs]
    different = [text for text, outcome in zip(code_snippets(), outcomes) if outcome == "different"]
    assert not different, different[:3]
    # Each tie is the same pieces in another order: their scores add up alike whatever the file says, so no choice
    # of scores could make llama.cpp (exact sums, first candidate kept) pick sentencepiece 0.1.99's order.
    assert all(sorted(ids) == sorted(expected) for (ids, expected), outcome in zip(pairs, outcomes) if outcome == "tie")
    ties = outcomes.count("tie") / len(outcomes)
    assert ties <= MAX_TIE_RATE, ties
    return ties


def test_gguf_token_ids_equal_on_the_demo(llama_cpp, demo_gguf):
    gguf_ids_agree(llama_cpp, demo_gguf, DEMO / "spiece.model")


def test_gguf_token_ids_equal_on_the_real_vocabulary(llama_cpp, tmp_path):
    pytest.importorskip("gguf")
    out = exporter.export(real_vocabulary_folder(tmp_path / "real"), "gguf", tmp_path / "real.gguf", "f32")
    gguf_ids_agree(llama_cpp, out, SHARED / "spiece.model")


def llama_greedy(engine, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    engine.reset()
    engine.eval(prompt_ids)
    out = []
    for _ in range(max_new_tokens):
        token = int(engine.scores[engine.n_tokens - 1].argmax())
        out.append(token)
        if token == 1:
            break
        engine.eval([token])
    return out


def test_gguf_logits_and_greedy_tokens_equal_replit_lm(llama_cpp, demo_gguf, ours):
    model, tokenizer = ours
    engine = llama(llama_cpp, demo_gguf)
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        engine.reset()
        engine.eval(ids)
        got = torch.from_numpy(engine.scores[: len(ids)].copy())
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0]
        torch.testing.assert_close(got, expected, atol=GGUF_LOGITS_ATOL, rtol=0)
        generated = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=1,
                                   pad_token_id=2)[0, len(ids):].tolist()  # fmt: skip
        assert llama_greedy(engine, ids, 32) == generated


@pytest.mark.parametrize("qtype", ["bf16", "q8_0", "q4_0"])
def test_gguf_quantized_types_load_and_complete(llama_cpp, tmp_path, ours, qtype):
    pytest.importorskip("gguf")
    model, tokenizer = ours
    path = exporter.export(DEMO, "gguf", tmp_path / f"demo.{qtype}.gguf", qtype)
    engine = llama(llama_cpp, path)
    ids = tokenizer.encode(PROMPTS[0])
    engine.eval(ids)
    got = torch.from_numpy(engine.scores[: len(ids)].copy())
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
    # Quantized weights: the prediction of the next token mostly agrees, and the logits stay near (q4_0: 2.4 measured
    # here, 4.6 at most over the 3200 positions of docs/export.md's table).
    agree = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
    assert agree >= 0.75, agree
    assert (got - expected).abs().max() < {"bf16": 0.2, "q8_0": 0.5, "q4_0": 4.0}[qtype]


# ----- transformers serve --------------------------------------------------------------------------------------------

SERVE_STARTUP_SECONDS = 180


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def transformers_serve():
    """`transformers serve --trust-remote-code` on 127.0.0.1 (no model preloaded: each request names its folder)."""
    for module in ("fastapi", "uvicorn", "openai"):
        pytest.importorskip(module)
    executable = Path(sys.executable).with_name("transformers")
    port = free_port()
    server = subprocess.Popen(
        [str(executable), "serve", "--trust-remote-code", "--host", "127.0.0.1", "--port", str(port),
         "--device", "cpu", "--log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=SCRIPT_ENV,
    )  # fmt: skip
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(server, lambda: answers_health(base_url), "transformers serve", SERVE_STARTUP_SECONDS)
        yield base_url + "/v1"
    finally:
        stop_process(server)


def wait_until_ready(server: subprocess.Popen, is_ready, name: str, seconds: float, log: Path | None = None):
    """Wait until is_ready(); fail, with the end of the server's log, if it exits or takes too long."""
    deadline = time.monotonic() + seconds
    while not is_ready():
        tail = log.read_text(errors="replace")[-3000:] if log else ""
        assert server.poll() is None, f"{name} exited with status {server.returncode}\n{tail}"
        assert time.monotonic() < deadline, f"{name} did not start in {seconds} s\n{tail}"
        time.sleep(1)


def answers_health(base_url: str) -> bool:
    try:
        urllib.request.urlopen(base_url + "/health", timeout=5).close()
        return True
    except OSError:
        return False


def plain_and_streamed(client, **request) -> tuple[str, str]:
    """The text of one completion asked for plainly, and of the same asked for streamed."""
    plain = client.completions.create(**request).choices[0].text
    chunks = client.completions.create(**request, stream=True)
    return plain, "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)


@pytest.mark.parametrize("layout", ["demo", "hub", "mpt"])
def test_transformers_serve_completes_plain_and_streamed(transformers_serve, demo_mpt, tmp_path, layout):
    import openai

    folder = {"demo": lambda: DEMO, "hub": lambda: hub_folder(tmp_path / "hub"), "mpt": lambda: demo_mpt}[layout]()
    model_class = MptForCausalLM if layout == "mpt" else ReplitLM
    model = model_class.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = ReplitLMTokenizer.from_pretrained(DEMO if layout == "mpt" else folder)
    ids = tokenizer.encode(PROMPTS[0], return_tensors="pt")
    generated = model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=1, pad_token_id=2)
    expected = tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True)

    client = openai.OpenAI(base_url=transformers_serve, api_key="unused", timeout=120, max_retries=0)
    texts = plain_and_streamed(client, model=str(folder), prompt=PROMPTS[0], max_tokens=24, temperature=0)
    assert texts == (expected, expected)


# ----- vLLM ----------------------------------------------------------------------------------------------------------

VLLM_STARTUP_SECONDS = 300
VLLM_TENSOR_PARALLEL = 2
# vLLM's CPU kernels against ReplitLM's float32 math, log-probabilities of the chosen tokens: 3.4e-6 at most measured.
VLLM_LOGPROB_ATOL = 1e-4


def replit_greedy(model: ReplitLM, ids: list[int], max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ReplitLM's greedy continuation of `ids` (ending with <|endoftext|> where it stops) and the log-probability of
    each of its tokens, float32."""
    generated = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=1,
                               pad_token_id=2)[0]  # fmt: skip
    with torch.no_grad():
        logprobs = model(generated[None, :-1]).logits[0].log_softmax(-1)
    new = generated[len(ids) :]
    return new, logprobs[len(ids) - 1 :].gather(-1, new[:, None])[:, 0]


def engine_python(variable: str, venv: str, missing: str) -> Path:
    """The Python of an engine that lives in an environment of its own: $variable, else this repository's `venv`;
    the test is skipped, saying `missing`, where there is neither."""
    for candidate in (os.environ.get(variable), ROOT / venv / "bin" / "python"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    pytest.skip(missing)


def vllm_python() -> Path:
    """.ci/run makes .venv-vllm: vllm-cpu pins its own dependencies."""
    missing = "vLLM is not installed (.ci/run installs vllm-cpu into .venv-vllm; or set REPLIT_LM_VLLM_PYTHON)"
    return engine_python("REPLIT_LM_VLLM_PYTHON", ".venv-vllm", missing)


@pytest.fixture(scope="module")
def vllm_serve(demo_mpt, tmp_path_factory):
    """`vllm serve` on the MPT export, as the export's README says, with tensor parallelism over two CPU workers
    (each bound to one core: vLLM binds workers to NUMA nodes by default, and these machines have one)."""
    pytest.importorskip("openai")
    python = vllm_python()
    port = free_port()
    log = tmp_path_factory.mktemp("vllm") / "serve.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    with log.open("w") as output:
        server = subprocess.Popen(
            # `vllm serve` itself: vllm-cpu's command line asks for the version of a package named vllm and exits.
            [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(demo_mpt), "--host", "127.0.0.1",
             "--port", str(port),
             "--tensor-parallel-size", str(VLLM_TENSOR_PARALLEL), "--dtype", "float32", "--enforce-eager",
             "--max-model-len", "1024", "--seed", "0"],
            stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(server, lambda: answers_health(base_url), "vllm serve", VLLM_STARTUP_SECONDS, log)
        yield base_url + "/v1"
    finally:
        stop_process(server)
        try:
            os.killpg(server.pid, 9)  # its engine and worker processes
        except ProcessLookupError:
            pass


def test_vllm_serves_the_mpt_export_with_replit_lms_tokens_and_logprobs(vllm_serve, demo_mpt, ours):
    import openai

    model, tokenizer = ours
    client = openai.OpenAI(base_url=vllm_serve, api_key="unused", timeout=300, max_retries=0)
    expected_texts = []
    for prompt in PROMPTS + code_snippets(count=3, seed=1):
        ids = tokenizer.encode(prompt)
        new, expected_logprobs = replit_greedy(model, ids, 24)

        # Token ids in, token ids out: the comparison is of the model, not of the tokenizers' ties.
        choice = client.completions.create(
            model=str(demo_mpt), prompt=ids, max_tokens=24, temperature=0, logprobs=1,
            extra_body={"return_tokens_as_token_ids": True},
        ).choices[0]  # fmt: skip
        got = [int(token.removeprefix("token_id:")) for token in choice.logprobs.tokens]
        assert got == new.tolist(), prompt
        expected_texts.append(tokenizer.decode(new, skip_special_tokens=True))
        assert choice.text == expected_texts[-1]
        torch.testing.assert_close(torch.tensor(choice.logprobs.token_logprobs), expected_logprobs,
                                   atol=VLLM_LOGPROB_ATOL, rtol=0)  # fmt: skip

    # Text in, plain and streamed: vLLM tokenizes with the export's tokenizer.json.
    texts = plain_and_streamed(client, model=str(demo_mpt), prompt=PROMPTS[0], max_tokens=24, temperature=0)
    assert texts == (expected_texts[0], expected_texts[0])


# ----- TGI -----------------------------------------------------------------------------------------------------------

TGI_STARTUP_SECONDS = 300
# TGI's CausalLM runs transformers-style float32 code on the CPU: log-probabilities as ReplitLM's to about 1e-6.
TGI_LOGPROB_ATOL = 1e-4


def tgi_python() -> Path:
    """TGI's model server (`text-generation-server`) is not on PyPI: it installs from the server/ folder of the
    text-generation-inference repository (docs/export.md says how)."""
    missing = "TGI's server is not installed (set REPLIT_LM_TGI_PYTHON to the Python of an environment with it)"
    return engine_python("REPLIT_LM_TGI_PYTHON", ".venv-tgi", missing)


@pytest.fixture(scope="module")
def tgi_server(demo_mpt, tmp_path_factory):
    """TGI's model server on the MPT export, started as TGI's launcher starts it on a machine without CUDA (the
    launcher picks paged attention and no prefix caching for a head size FlashInfer lacks, as 32 and the real 80
    are); it answers on a Unix socket, the launcher's router speaks to it in gRPC. Yields (python, socket)."""
    python = tgi_python()
    folder = tmp_path_factory.mktemp("tgi")
    socket_path, log = folder / "server.sock", folder / "server.log"
    env = {**os.environ, "ATTENTION": "paged", "PREFIX_CACHING": "0"}
    with log.open("w") as output:
        server = subprocess.Popen(
            [str(python), "-m", "text_generation_server.cli", "serve", str(demo_mpt), "--uds-path", str(socket_path)],
            stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    shard = Path(f"{socket_path}-0")  # the socket of shard 0, the only one without --sharded
    try:
        wait_until_ready(server, shard.exists, "text-generation-server serve", TGI_STARTUP_SECONDS, log)
        yield python, shard
    finally:
        stop_process(server)


def test_tgi_server_generates_replit_lms_tokens_and_logprobs_from_the_mpt_export(tgi_server, demo_mpt, ours):
    """TGI's own MPT model code (its CausalLM with custom_modeling/mpt_modeling.py), batched, greedy: the prompts'
    ids as the export's tokenizer.json gives them, and from those ids every prompt's tokens and their
    log-probabilities as ReplitLM's, stopping where it stops. (TGI takes text only; the tokenizers' ties, as in
    `\n\n\n` of the second prompt, are the tokenizer tests' business.)"""
    python, socket_path = tgi_server
    model, tokenizer = ours
    exported = AutoTokenizer.from_pretrained(demo_mpt)
    prompts = PROMPTS + code_snippets(count=3, seed=1)
    client = Path(__file__).with_name("tgi_client.py")
    answer = subprocess.run([str(python), str(client), str(socket_path), "24", *prompts], capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    assert answer.returncode == 0, answer.stderr[-3000:]
    results = json.loads(answer.stdout)
    assert {(result["dtype"], result["device"]) for result in results} == {("torch.float32", "cpu")}
    for prompt, result in zip(prompts, results):
        assert result["prompt_ids"] == exported.encode(prompt), prompt
        new, expected_logprobs = replit_greedy(model, result["prompt_ids"], 24)
        assert result["ids"] == new.tolist(), prompt
        assert result["text"] == tokenizer.decode(new, skip_special_tokens=True), prompt
        torch.testing.assert_close(torch.tensor(result["logprobs"]), expected_logprobs, atol=TGI_LOGPROB_ATOL, rtol=0)
