"""replit_tools/loading.py (this name: tests/test_loading.py is the model's): the one way the command line, the server,
the evaluation and the exporter load a folder."""

import json

import pytest
import torch
from completion_helpers import DEMO, hub_folder, run_script
from safetensors.torch import load_file, save_file

from replit_tools.loading import load_completer, load_model, model_source
from replit_tools.options import CompletionError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return hub_folder(tmp_path_factory.mktemp("loading") / "tiny")


def damaged_copy(tiny, folder, change) -> str:
    """A copy of the tiny folder whose weights `change` edits in place (a dict of tensors)."""
    folder.mkdir()
    for path in tiny.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return str(folder)


def test_a_relative_path_with_a_typo_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    """models/replit, where models/ is a folder here, was tried on the Hub: half a minute without a network."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(CompletionError, match="model folder not found: models/replit$"):
        model_source("models/replit")
    assert model_source("replit/replit-code-v1-3b") == "replit/replit-code-v1-3b"


def test_a_complete_checkpoint_loads(tiny):
    assert load_model(tiny).transformer.blocks[1].attn.Wqkv.weight.abs().sum() > 0


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.pop("transformer.blocks.1.attn.Wqkv.weight"),
         r"transformer\.blocks\.1\.attn\.Wqkv\.weight is missing"),
        (lambda t: t.update(extra=torch.zeros(2)), "extra is not a tensor of this model"),
        (lambda t: t.update({"transformer.norm_f.weight": torch.ones(3)}),
         # transformers 4.57 does not report the checkpoint's shape.
         r"transformer\.norm_f\.weight is (\(3,\) in the checkpoint, )?\(64,\) for config\.json"),
    ],
    ids=["missing", "unexpected", "another shape"],
)
def test_weights_that_do_not_fit_the_config_are_refused_by_name(tiny, tmp_path, change, message):
    """transformers would fill a missing tensor with random values and only log it, which the tools silence: the
    completions were then garbage without a word."""
    folder = damaged_copy(tiny, tmp_path / "damaged", change)
    with pytest.raises(CompletionError, match=f"the weights do not fit config.json: {message}"):
        load_model(folder)


def test_an_untied_config_needs_an_lm_head_of_its_own(tiny, tmp_path):
    """The checkpoints have no lm_head tensor (it is the embedding): with tie_word_embeddings false in config.json,
    transformers made a random one, and completions were noise."""
    folder = damaged_copy(tiny, tmp_path / "untied", lambda t: None)
    config = json.loads((tmp_path / "untied" / "config.json").read_text())
    (tmp_path / "untied" / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    with pytest.raises(CompletionError, match=r"do not fit config.json: lm_head\.weight is missing"):
        load_model(folder)


@pytest.mark.skipif(not (DEMO / "spiece.model").exists(), reason="the demo model (demo/) is not built")
def test_a_tokenizer_larger_than_the_model_is_refused(tiny, tmp_path):
    """Another model's spiece.model (here the demo's 4096 pieces beside a 1000-token model): prompts whose ids were
    past the vocabulary failed inside the model, the others were completed, silently, into text that meant nothing."""
    folder = damaged_copy(tiny, tmp_path / "mixed", lambda t: None)
    (tmp_path / "mixed" / "spiece.model").write_bytes((DEMO / "spiece.model").read_bytes())
    with pytest.raises(CompletionError, match="mixed: spiece.model has 4096 tokens, more than the model's vocab_size "
                                              "of 1000: it is not this model's tokenizer"):  # fmt: skip
        load_completer(folder, device="cpu")
    from replit_tools.export import ExportError, load

    with pytest.raises(ExportError, match="spiece.model has 4096 tokens"):  # the exporter loads the same way
        load(folder, torch.float32)


@pytest.mark.parametrize(
    "config, message",
    [
        ([1, 2], "config.json is not a JSON object: list"),
        ({"dtype": "bogus"}, "dtype='bogus' is not a torch dtype"),
        ({"attn_config": 5}, "attn_config must be a dict"),
        ({"attn_config": {"rope": True}}, "attn_config.rope=True is not supported"),
    ],
    ids=["a list", "a dtype torch lacks", "attn_config a number", "an MPT feature this model lacks"],
)
def test_a_config_json_that_does_not_describe_the_model_is_refused_naming_the_file(tiny, tmp_path, config, message):
    folder = damaged_copy(tiny, tmp_path / "bad", lambda t: None)
    written = config if isinstance(config, list) else {**json.loads((tmp_path / "bad" / "config.json").read_text()),
                                                           **config}  # fmt: skip
    (tmp_path / "bad" / "config.json").write_text(json.dumps(written))
    with pytest.raises(CompletionError, match="bad/config.json: "):  # the message of a list is transformers'
        load_model(folder)
    result = run_script("evaluate.py", "held-out", "--model", folder, "--prompts", "1")  # AttributeError escaped
    stderr = result.stderr.decode()
    assert result.returncode == 1 and stderr.count("\n") == 1 and message in stderr, stderr


@pytest.mark.parametrize("name", ["config.json", "generation_config.json", "tokenizer_config.json"])
def test_a_json_file_that_is_not_json_is_named(tiny, tmp_path, name):
    """The tokenizer's loader said only "Expecting property name ... (char 1)"; generation_config.json was skipped."""
    folder = damaged_copy(tiny, tmp_path / "bad", lambda t: None)
    (tmp_path / "bad" / name).write_text("{x")
    result = run_script("generate.py", "--model", folder, "def f():")
    stderr = result.stderr.decode()
    assert result.returncode == 1 and stderr.count("\n") == 1, stderr
    assert f"bad/{name} is not valid JSON" in stderr, stderr


def test_the_command_line_refuses_a_missing_tensor_in_one_line(tiny, tmp_path):
    folder = damaged_copy(tiny, tmp_path / "damaged", lambda t: t.pop("transformer.blocks.0.ffn.up_proj.weight"))
    result = run_script("generate.py", "--model", folder, "def f():")
    stderr = result.stderr.decode()
    assert result.returncode == 1 and result.stdout == b"" and stderr.count("\n") == 1, stderr
    assert "transformer.blocks.0.ffn.up_proj.weight is missing" in stderr
    assert json.loads((tiny / "config.json").read_text())  # the fixture's folder is untouched
