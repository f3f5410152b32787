"""int8 and int4 weight quantization (quantization.py): the layers against float math, the packed int4 layout, the
whole model against bfloat16, and loading with from_pretrained(..., weight_quantization=...)."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from model_helpers import VOCAB, model_pair, write_hub_folder
from test_loading import mpt_config, published_state_dict
from transformers import AutoModelForCausalLM

import replit_lm.quantization as quantization
from replit_lm.configuration_replit_lm import ReplitLMConfig
from replit_lm.modeling_replit_lm import ReplitLM
from replit_lm.quantization import (
    INT4_KERNEL_MAX_ROWS,
    Int4Linear,
    Int8Linear,
    QuantizedLinear,
    _int4_layout,
    _unpack_int4,
    int4_group_size,
)


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    got, expected = got.float(), expected.float()
    return ((got - expected).norm() / expected.norm()).item()


@pytest.fixture
def without_onednn(monkeypatch):
    """Quantize as on a torch build without oneDNN's int8 matmul: the int8 weight-only kernel."""
    monkeypatch.setattr(quantization, "_has_onednn_int8", lambda: False)


def gaussian(out_features, in_features, seed=0):
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)) * 0.05


# --- layers ----------------------------------------------------------------------------------------------------

# Relative error of the layer output against float32 math, for Gaussian weights and activations: int8 rounds each
# weight to 1/254 of its row's range (about 0.7%), plus about 0.8% for the activations on oneDNN's route; int4
# rounds to 1/15 of its group's range (about 9%).
LAYER_BOUNDS = {"int8": 0.012, "int8 weight-only": 0.009, "int4": 0.11}


@pytest.mark.parametrize("shape", [(144, 64), (80, 128), (256, 256)])
@pytest.mark.parametrize("rows", [1, 3, INT4_KERNEL_MAX_ROWS + 8])
@pytest.mark.parametrize("kind", LAYER_BOUNDS)
def test_layers_against_float_math(shape, rows, kind, monkeypatch):
    if kind == "int8 weight-only":
        monkeypatch.setattr(quantization, "_has_onednn_int8", lambda: False)
    weight = gaussian(*shape).to(torch.bfloat16)
    layer = Int4Linear(weight, group_size=64) if kind == "int4" else Int8Linear(weight)
    x = torch.randn(2, rows, shape[1], dtype=torch.bfloat16, generator=torch.Generator().manual_seed(1))
    out = layer(x)
    assert out.shape == (2, rows, shape[0]) and out.dtype == torch.bfloat16
    assert relative_error(out, x.float() @ weight.float().t()) < LAYER_BOUNDS[kind]
    # What the kernels compute is the product with the weight as quantized (up to bfloat16 rounding).
    assert relative_error(out, x.float() @ layer.dequantized_weight().t()) < (0.01 if kind == "int8" else 0.005)


@pytest.mark.skipif(not quantization._has_onednn_int8(), reason="needs oneDNN's int8 matmul")
def test_int8_long_inputs_run_in_chunks_with_the_same_result():
    """Activations are quantized per row, so a prompt split into chunks of rows gives what one call gives."""
    layer = Int8Linear(gaussian(96, 64).to(torch.bfloat16))
    rows = 2 * quantization.ONEDNN_INT8_CHUNK_ROWS + 5
    x = torch.randn(rows, 64, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(2))
    calls = []
    original = layer._onednn

    def spy(chunk):
        calls.append(chunk.shape[0])
        return original(chunk)

    layer._onednn = spy
    out = layer(x)
    assert calls == [quantization.ONEDNN_INT8_CHUNK_ROWS] * 2 + [5]
    assert torch.equal(out, original(x))


def test_layers_keep_float32_activations():
    weight = gaussian(64, 64).to(torch.bfloat16)
    x = torch.randn(5, 64)
    for layer in (Int8Linear(weight), Int4Linear(weight)):
        assert layer(x).dtype == torch.float32


def test_int4_kernel_and_dequantized_route_agree():
    """Up to INT4_KERNEL_MAX_ROWS rows run the int4 kernel; more dequantize the weight to bfloat16."""
    layer = Int4Linear(gaussian(80, 128).to(torch.bfloat16), group_size=32)
    x = torch.randn(INT4_KERNEL_MAX_ROWS + 1, 128, dtype=torch.bfloat16)
    assert layer.can_unpack
    kernel = torch.ops.aten._weight_int4pack_mm_for_cpu(x, layer.packed, layer.group_size, layer.scales_and_zeros)
    assert relative_error(layer(x), kernel[:, :80]) < 0.01
    torch.testing.assert_close(layer._dequantize(torch.float32)[:80], layer.dequantized_weight(), atol=4e-3, rtol=0)


@pytest.mark.parametrize("n,k", [(16, 32), (48, 64), (64, 96), (80, 64), (144, 32), (192, 256)])
def test_unpack_int4_inverts_the_packing(n, k):
    values = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=torch.Generator().manual_seed(n + k))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, quantization.INT4_INNER_K_TILES)
    assert _int4_layout() is not None
    assert torch.equal(_unpack_int4(packed, n, k, _int4_layout()).to(torch.int32), values)


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
def test_quantizing_in_chunks_of_rows_changes_nothing(cls, monkeypatch):
    """Weights are quantized QUANTIZE_ROWS output channels at a time (bounded temporaries)."""
    weight = gaussian(336, 64).to(torch.bfloat16)  # 5 chunks of 64 rows and a partial one
    whole = cls(weight)
    monkeypatch.setattr(quantization, "QUANTIZE_ROWS", 64)
    chunked = cls(weight)
    for name, tensor in whole.named_buffers():
        if tensor.is_mkldnn:
            tensor, other = tensor.to_dense(), getattr(chunked, name).to_dense()
        else:
            other = getattr(chunked, name)
        assert torch.equal(tensor, other), name


def test_int4_pads_output_channels_to_the_kernels_blocks():
    weight = gaussian(101, 64).to(torch.bfloat16)  # a tiny vocabulary's LM head
    layer = Int4Linear(weight)
    assert layer.padded_out == 112
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert layer(x).shape == (3, 101)
    assert relative_error(layer(x), x.float() @ weight.float().t()) < LAYER_BOUNDS["int4"]


def test_int4_group_size_and_shape_errors():
    assert int4_group_size(2560) == 128 and int4_group_size(10240) == 128
    assert int4_group_size(64) == 64 and int4_group_size(96) == 32
    with pytest.raises(ValueError, match="divisible"):
        Int4Linear(gaussian(64, 48))


# --- the model -------------------------------------------------------------------------------------------------


def quantized_pair(mode: str, name: str = "pow2_heads"):
    """The tiny reference-checked model in bfloat16, and a copy of it quantized to `mode`."""
    bf16 = model_pair(name)[0].to(torch.bfloat16)
    quantized = model_pair(name)[0].to(torch.bfloat16).quantize_weights(mode)
    return bf16, quantized


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantize_weights_replaces_every_linear_layer(mode):
    bf16, model = quantized_pair(mode)
    assert model.config.weight_quantization == mode
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert isinstance(model.lm_head, QuantizedLinear) and model.transformer.wte.weight.dtype == torch.bfloat16
    bytes_before = sum(p.numel() * p.element_size() for p in bf16.parameters())
    bytes_after = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    assert bytes_after < bytes_before
    with pytest.raises(ValueError, match="already quantized"):
        model.quantize_weights("int8")


def test_quantization_errors_name_the_layer():
    model = model_pair("six_heads")[0]  # d_model 48: no int4 group size divides it
    with pytest.raises(ValueError, match=r"transformer\.blocks\.0\.attn\.Wqkv .*int4.*divisible"):
        model.quantize_weights("int4")
    assert isinstance(model.lm_head, torch.nn.Linear) and model.config.weight_quantization is None  # untouched
    with pytest.raises(ValueError, match="weight_quantization"):
        model_pair("pow2_heads")[0].quantize_weights("int3")


@pytest.mark.parametrize("mode", ["int8", "int8 weight-only"])
def test_int8_model_generates_like_bfloat16(mode, monkeypatch):
    """On the tiny random model (weights of std 0.3, so that every error shows), int8 keeps most greedy choices."""
    if mode == "int8 weight-only":
        monkeypatch.setattr(quantization, "_has_onednn_int8", lambda: False)
    bf16, model = quantized_pair("int8")
    ids = torch.randint(3, VOCAB, (4, 24), generator=torch.Generator().manual_seed(2))
    expected, got = bf16(ids).logits.float(), model(ids).logits.float()
    assert relative_error(got, expected) < 0.12
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.85
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    out = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=2, eos_token_id=None)
    assert out.shape == (4, 29)


def test_int4_model_runs_prompt_and_decode_routes():
    _, model = quantized_pair("int4")
    ids = torch.randint(3, VOCAB, (4, 48), generator=torch.Generator().manual_seed(3))
    # A prompt of more rows than the kernel takes (dequantized weights), then single tokens (the kernel): the
    # cached decode agrees with one forward pass over everything.
    assert 4 * 46 > INT4_KERNEL_MAX_ROWS
    full = model(ids).logits
    first = model(ids[:, :-2], use_cache=True)
    cache = first.past_key_values
    step1 = model(ids[:, -2:-1], past_key_values=cache, use_cache=True).logits
    step2 = model(ids[:, -1:], past_key_values=cache, use_cache=True).logits
    cached = torch.cat([first.logits, step1, step2], dim=1).float()
    assert relative_error(cached, full.float()) < 0.02


# --- loading ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory):
    model = model_pair("pow2_heads")[0]
    folder = tmp_path_factory.mktemp("hub") / "repo"
    return write_hub_folder(folder, mpt_config(model.config), published_state_dict(model)), model


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_from_pretrained_quantizes_on_load(hub_folder, mode):
    folder, _ = hub_folder
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, weight_quantization=mode)
    # The classes of the copy that transformers imported from the folder, so compared by name.
    layer_class = {"int8": "Int8Linear", "int4": "Int4Linear"}[mode]
    assert model.config.weight_quantization == mode
    assert type(model.transformer.blocks[0].attn.Wqkv).__name__ == type(model.lm_head).__name__ == layer_class
    # Loaded in bfloat16 unless a dtype is asked for.
    assert model.transformer.wte.weight.dtype == torch.bfloat16
    bf16 = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.bfloat16)
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(4))
    direct = model_pair("pow2_heads")[0].to(torch.bfloat16).quantize_weights(mode)
    torch.testing.assert_close(model(ids).logits, direct(ids).logits, atol=0, rtol=0)
    assert relative_error(model(ids).logits, bf16(ids).logits) < (0.12 if mode == "int8" else 0.6)


def test_from_pretrained_honours_a_dtype_and_a_config_file_setting(hub_folder, tmp_path):
    folder, model = hub_folder
    loaded = AutoModelForCausalLM.from_pretrained(
        folder, trust_remote_code=True, weight_quantization="int8", dtype=torch.float32
    )
    assert loaded.transformer.wte.weight.dtype == torch.float32
    assert loaded(torch.tensor([[5, 6, 7]])).logits.dtype == torch.float32
    config = dict(mpt_config(model.config), weight_quantization="int4")
    folder = write_hub_folder(tmp_path / "int4", config, published_state_dict(model))
    loaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    assert loaded.config.weight_quantization == "int4" and type(loaded.lm_head).__name__ == "Int4Linear"


def test_saving_a_quantized_model_is_a_clear_error(hub_folder, tmp_path):
    folder, _ = hub_folder
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, weight_quantization="int8")
    with pytest.raises(NotImplementedError, match="save the original checkpoint"):
        model.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved" / "model.safetensors").exists()


def test_bad_weight_quantization_value_is_rejected_on_load(hub_folder):
    folder, _ = hub_folder
    with pytest.raises(ValueError, match="weight_quantization"):
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, weight_quantization="int2")


LOAD_AND_MEASURE = """
import sys, torch
from transformers import AutoModelForCausalLM

def status(field):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field + ":"))

def load_and_run(folder):
    kwargs = {"bf16": dict(dtype=torch.bfloat16)}.get(sys.argv[3], dict(weight_quantization=sys.argv[3]))
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, **kwargs)
    model(torch.tensor([[5, 6, 7]]))  # touches every weight
    return model

load_and_run(sys.argv[1])  # a tiny model first: imports, thread pools and kernels start up outside the measurement
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
model = load_and_run(sys.argv[2])
print(status("VmHWM") - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads peak RSS from /proc")
@pytest.mark.parametrize("mode", ["bf16", "int8", "int4"])
def test_loading_peak_memory_stays_under_the_checkpoint_size(tmp_path, mode):
    """A 400 MB bfloat16 checkpoint loads, quantized or not, without the process growing by more than 1.2x its size
    (the float weights are views of the mapped file, dropped layer by layer as they are quantized)."""
    torch.manual_seed(0)
    folders = []
    for name, shape in (("tiny", dict(d_model=64, n_layers=1)), ("big", dict(d_model=1024, n_layers=16))):
        model = ReplitLM(ReplitLMConfig(n_heads=8, vocab_size=4096, max_seq_len=64, **shape)).to(torch.bfloat16)
        config = dict(mpt_config(model.config), vocab_size=model.config.vocab_size)
        folders.append(write_hub_folder(tmp_path / name, config, published_state_dict(model)))
        del model
    size = (folders[1] / "model.safetensors").stat().st_size
    script = tmp_path / "measure.py"
    script.write_text(LOAD_AND_MEASURE)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, script, *folders, mode], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    grown = int(out.stdout.split()[-1])
    assert grown < 1.2 * size, f"{mode}: grew by {grown / size:.2f}x the checkpoint's {size / 1e6:.0f} MB"


DEMO = ROOT / "demo"
# What README states for the demo model, teacher-forced over this repository's own code (held out from its
# training on the standard library): top-1 agreement with bfloat16 at least, relative logit error at most.
DEMO_BOUNDS = {"int8": (0.95, 0.03), "int4": (0.75, 0.15)}


@pytest.mark.skipif(not (DEMO / "config.json").exists(), reason="needs the trained demo model in demo/")
@pytest.mark.parametrize("mode", DEMO_BOUNDS)
def test_demo_model_quantized_accuracy_within_stated_bounds(mode):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(DEMO, trust_remote_code=True)
    ids = []
    for path in sorted(ROOT.glob("*.py")):
        ids += tokenizer(path.read_text(encoding="utf-8"))["input_ids"]
    windows = torch.tensor(ids[: 8 * 128]).view(8, 128)
    reference = AutoModelForCausalLM.from_pretrained(DEMO, trust_remote_code=True, dtype=torch.bfloat16)
    quantized = AutoModelForCausalLM.from_pretrained(DEMO, trust_remote_code=True, weight_quantization=mode)
    with torch.inference_mode():
        expected, got = reference(windows).logits.float(), quantized(windows).logits.float()
    min_agreement, max_error = DEMO_BOUNDS[mode]
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= min_agreement
    assert relative_error(got, expected) <= max_error
