"""Loading through the Auto classes from folders laid out like the Hub repository, in both checkpoint layouts
(May 2023 release, MPT as published today) and both config schemas, from every weight format."""

import json

import pytest
import torch
from conftest import ROOT, SHARED
from model_helpers import VOCAB, model_pair, write_hub_folder
from transformers import AutoConfig, AutoModelForCausalLM


MPT_TO_RELEASE = {
    ".norm_1.": ".ln_1.",
    ".norm_2.": ".ln_2.",
    ".ffn.up_proj.": ".mlp.mlp_up.",
    ".ffn.down_proj.": ".mlp.mlp_down.",
    "transformer.norm_f.": "transformer.ln_f.",
}


def published_state_dict(model):
    """The tensors a published checkpoint holds: no lm_head (tied), no buffers."""
    return {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}


def release_state_dict(model):
    renamed = {}
    for key, value in published_state_dict(model).items():
        for new, old in MPT_TO_RELEASE.items():
            key = key.replace(new, old)
        renamed[key] = value
    return renamed


def release_config(config) -> dict:
    """A config.json of the May 2023 release (flat fields), pointed at our classes, for a tiny shape."""
    base = json.loads((ROOT / "config.json").read_text())
    base.update(d_model=config.d_model, n_heads=config.n_heads, n_layers=config.n_layers, vocab_size=VOCAB)
    base.update(max_seq_len=config.max_seq_len, use_cache=False)
    base.pop("eos_token_id"), base.pop("pad_token_id"), base.pop("weight_quantization"), base.pop("layer_norm_epsilon")
    return base


def mpt_config(config) -> dict:
    """A config.json in the MPT schema of the checkpoint published today, its auto_map pointed at our classes."""
    if SHARED.joinpath("config.mpt.json").exists():
        base = json.loads(SHARED.joinpath("config.mpt.json").read_text())
    else:  # The same fields, for machines without ../shared.
        base = {
            "architectures": ["MPTForCausalLM"],
            "attn_config": {"alibi": True, "alibi_bias_max": 8, "attn_impl": "torch", "attn_pdrop": 0,
                            "attn_type": "multihead_attention", "attn_uses_sequence_id": False, "clip_qkv": None,
                            "prefix_lm": False, "qk_ln": False, "softmax_scale": None},
            "emb_pdrop": 0, "embedding_fraction": 1.0, "expansion_ratio": 4,
            "init_config": {"emb_init_std": None, "emb_init_uniform_lim": None, "fan_mode": "fan_in",
                            "init_div_is_residual": True, "init_gain": 0, "init_nonlinearity": "relu",
                            "init_std": 0.02, "name": "kaiming_normal_", "verbose": 0},
            "init_device": "cpu", "learned_pos_emb": True, "logit_scale": None, "model_type": "mpt",
            "no_bias": True, "norm_type": "low_precision_layernorm", "resid_pdrop": 0, "use_cache": True,
            "verbose": 0, "eos_token_id": 1,
        }  # fmt: skip
    base["auto_map"] = {
        "AutoConfig": "configuration_replit_lm.ReplitLMConfig",
        "AutoModelForCausalLM": "modeling_replit_lm.ReplitLM",
    }
    base.update(d_model=config.d_model, n_heads=config.n_heads, n_layers=config.n_layers, vocab_size=VOCAB)
    base.update(max_seq_len=config.max_seq_len)
    return base


@pytest.fixture(scope="module")
def reference():
    model, _ = model_pair("six_heads")
    ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
    return model, ids, model(ids).logits


LAYOUTS = {
    "release": (release_state_dict, release_config),
    "published": (published_state_dict, mpt_config),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fmt", ["safetensors", "bin", "sharded-safetensors", "sharded-bin"])
def test_checkpoints_load_through_auto_classes(tmp_path, reference, layout, fmt):
    model, ids, expected = reference
    to_state_dict, to_config = LAYOUTS[layout]
    folder = write_hub_folder(tmp_path / "repo", to_config(model.config), to_state_dict(model), fmt)
    loaded, info = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
    assert type(loaded).__name__ == "ReplitLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    torch.testing.assert_close(loaded.eval()(ids).logits, expected, atol=0, rtol=0)


def test_both_config_schemas_normalise_to_the_same_config(tmp_path, reference):
    model = reference[0]
    configs = []
    for name, (_, to_config) in LAYOUTS.items():
        folder = tmp_path / name
        folder.mkdir()
        write_hub_folder(folder, to_config(model.config), {}, "safetensors")
        configs.append(AutoConfig.from_pretrained(folder, trust_remote_code=True))
    release, published = configs
    fields = ["d_model", "n_heads", "n_layers", "mlp_ratio", "max_seq_len", "vocab_size", "attn_impl", "alibi",
              "alibi_bias_max", "attn_clip_qkv", "softmax_scale", "low_precision_layernorm", "param_init_fn",
              "init_std", "fan_mode", "init_nonlinearity", "init_div_is_residual", "init_gain", "emb_init_std",
              "attn_pdrop", "resid_pdrop", "emb_pdrop", "no_bias", "embedding_fraction", "logit_scale"]  # fmt: skip
    for field in fields:
        assert getattr(release, field) == getattr(published, field), field
    assert published.model_type == "replit_lm"
    assert not {"attn_config", "expansion_ratio", "norm_type"} & set(published.to_dict())


def test_the_cards_attn_config_assignment_sets_the_flat_field(tmp_path, reference):
    """The card's MPT-era snippet: config.attn_config['attn_impl'] = 'triton', then from_pretrained(config=...)."""
    model = reference[0]
    folder = write_hub_folder(tmp_path / "repo", mpt_config(model.config), published_state_dict(model))
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    assert config.attn_config["attn_impl"] == "torch" and config.attn_config["alibi"] is True
    config.attn_config["attn_impl"] = "triton"
    assert config.attn_impl == "triton"
    loaded = AutoModelForCausalLM.from_pretrained(folder, config=config, trust_remote_code=True)
    assert loaded.config.attn_impl == "triton"
    with pytest.raises(ValueError, match="attn_impl"):
        config.attn_config["attn_impl"] = "flash"
    assert config.attn_impl == "triton"
    with pytest.raises(KeyError, match="attn_config has no field"):
        config.attn_config["attn_implementation"] = "eager"


def test_from_pretrained_takes_the_mpt_schemas_names_as_overrides(tmp_path, reference):
    """attn_config, expansion_ratio and norm_type passed to from_pretrained set the flat fields (they were refused
    with an AttributeError, or silently dropped); the MPT defaults of llm-foundry's later fields are accepted."""
    model = reference[0]
    folder = write_hub_folder(tmp_path / "repo", mpt_config(model.config), published_state_dict(model))
    config = AutoConfig.from_pretrained(
        folder, trust_remote_code=True, attn_config={"attn_impl": "triton", "rope": False}, expansion_ratio=2,
        norm_type="layernorm",
    )  # fmt: skip
    assert (config.attn_impl, config.mlp_ratio, config.low_precision_layernorm) == ("triton", 2, False)
    assert (config.expansion_ratio, config.norm_type) == (2, "layernorm")
    assert not {"attn_config", "expansion_ratio", "norm_type"} & set(config.to_dict())
    with pytest.raises(ValueError, match="attn_config.rope=True"):
        AutoConfig.from_pretrained(folder, trust_remote_code=True, attn_config={"rope": True})
    with pytest.raises(ValueError, match="norm_type='rmsnorm'"):
        AutoConfig.from_pretrained(folder, trust_remote_code=True, norm_type="rmsnorm")
    loaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, norm_type="low_precision_layernorm")
    assert loaded.config.low_precision_layernorm


def test_attn_config_writes_through_every_dict_method(tmp_path, reference):
    """update, setdefault and |= set the flat fields as `[...] =` does, all or nothing; keys cannot be removed."""
    model = reference[0]
    folder = write_hub_folder(tmp_path / "repo", mpt_config(model.config), published_state_dict(model))
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    config.attn_config.update(attn_impl="triton")
    assert config.attn_impl == "triton"
    config.attn_config.update({"attn_impl": "torch", "softmax_scale": 0.5})
    assert (config.attn_impl, config.softmax_scale) == ("torch", 0.5)
    view = config.attn_config
    view |= {"attn_pdrop": 0.1}
    assert config.attn_pdrop == 0.1 and view["attn_pdrop"] == 0.1
    assert config.attn_config.setdefault("attn_impl", "triton") == "torch"
    with pytest.raises(ValueError, match="attn_pdrop"):
        config.attn_config.update(attn_impl="triton", attn_pdrop=2.0)
    assert (config.attn_impl, config.attn_pdrop) == ("torch", 0.1)
    with pytest.raises(KeyError, match="no field 'flash'"):
        config.attn_config.setdefault("flash", True)
    with pytest.raises(TypeError, match="cannot be removed"):
        config.attn_config.pop("attn_impl")
    with pytest.raises(TypeError, match="cannot be removed"):
        del config.attn_config["attn_impl"]


def test_save_pretrained_writes_safetensors_that_load_back(tmp_path, reference):
    model, ids, expected = reference
    folder = write_hub_folder(tmp_path / "repo", mpt_config(model.config), published_state_dict(model))
    loaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    loaded.save_pretrained(tmp_path / "saved")
    saved = tmp_path / "saved"
    assert (saved / "model.safetensors").exists() and not (saved / "pytorch_model.bin").exists()
    from safetensors import safe_open

    with safe_open(saved / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert keys == set(published_state_dict(model)), "saved keys must be the published layout, lm_head not twice"
    saved_config = json.loads((saved / "config.json").read_text())
    assert saved_config["model_type"] == "replit_lm" and "attn_config" not in saved_config
    reloaded = AutoModelForCausalLM.from_pretrained(saved, trust_remote_code=True)
    torch.testing.assert_close(reloaded.eval()(ids).logits, expected, atol=0, rtol=0)


def test_from_pretrained_overrides_config_fields(tmp_path, reference):
    model, ids, expected = reference
    folder = write_hub_folder(tmp_path / "repo", mpt_config(model.config), published_state_dict(model))
    longer = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, max_seq_len=256)
    assert longer.config.max_seq_len == 256
    long_ids = torch.randint(3, VOCAB, (1, 200))
    assert longer(long_ids).logits.shape == (1, 200, VOCAB)
    with pytest.raises(ValueError, match="attn_impl"):
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, attn_impl="flash")


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_transformers_attn_implementation_keyword_selects_the_torch_backend(tmp_path, reference, attn_implementation):
    """sdpa and eager are two computations of the torch path, also over a config that said attn_impl='triton'."""
    model, ids, expected = reference
    folder = write_hub_folder(tmp_path / "repo", mpt_config(model.config), published_state_dict(model))
    loaded = AutoModelForCausalLM.from_pretrained(
        folder, trust_remote_code=True, attn_implementation=attn_implementation
    )
    assert (loaded.config.attn_impl, loaded.config._attn_implementation) == ("torch", attn_implementation)
    torch.testing.assert_close(loaded.eval()(ids).logits, expected, atol=1e-4, rtol=0)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    config.attn_config["attn_impl"] = "triton"
    loaded = AutoModelForCausalLM.from_pretrained(
        folder, config=config, trust_remote_code=True, attn_implementation=attn_implementation
    )
    assert (loaded.config.attn_impl, loaded.config._attn_implementation) == ("torch", attn_implementation)
    assert config.attn_impl == "triton", "the caller's config object is left as it was"


def test_attn_implementation_triton_is_attn_impl_triton_and_others_are_refused(tmp_path, reference):
    model = reference[0]
    folder = write_hub_folder(tmp_path / "repo", mpt_config(model.config), published_state_dict(model))
    loaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, attn_implementation="triton")
    assert loaded.config.attn_impl == "triton"
    with pytest.raises(ValueError, match="attn_implementation='flash_attention_2' is not supported"):
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, attn_implementation="flash_attention_2")


def test_load_in_bfloat16(tmp_path, reference):
    model, ids, expected = reference
    folder = write_hub_folder(tmp_path / "repo", mpt_config(model.config), published_state_dict(model))
    loaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.bfloat16)
    assert loaded.transformer.wte.weight.dtype == torch.bfloat16
    assert loaded(ids).logits.dtype == torch.bfloat16


def test_root_config_is_the_real_model():
    config = AutoConfig.from_pretrained(ROOT, trust_remote_code=True)
    assert (config.d_model, config.n_heads, config.n_layers, config.vocab_size) == (2560, 32, 32, 32768)
    assert (config.eos_token_id, config.pad_token_id, config.use_cache) == (1, 2, True)
    if SHARED.joinpath("config.release.json").exists():
        release = json.loads(SHARED.joinpath("config.release.json").read_text())
        for key in ("d_model", "n_heads", "n_layers", "mlp_ratio", "max_seq_len", "vocab_size", "alibi_bias_max",
                    "init_std", "param_init_fn", "low_precision_layernorm", "no_bias"):  # fmt: skip
            assert getattr(config, key) == release[key], key
    generation = json.loads((ROOT / "generation_config.json").read_text())
    assert generation["use_cache"] is True and generation["eos_token_id"] == 1


def test_a_published_config_read_by_our_class_names_our_code(tmp_path):
    """The published configs name other code in their auto_map (MPT's configuration_mpt / modeling_mpt, the
    release's replit_lm.ReplitLM): read by ReplitLMConfig, they name ours, as the root's config.json does, so that
    a model saved from them loads with this repository's code. A Hub reference to our classes is kept."""
    from replit_lm.configuration_replit_lm import AUTO_MAP, ReplitLMConfig

    assert json.loads((ROOT / "config.json").read_text())["auto_map"] == AUTO_MAP
    foreign = [
        {"AutoConfig": "configuration_mpt.MPTConfig", "AutoModelForCausalLM": "modeling_mpt.MPTForCausalLM"},
        {"AutoConfig": "configuration_replit_lm.ReplitLMConfig", "AutoModelForCausalLM": "replit_lm.ReplitLM"},
    ]
    for name in ("config.mpt.json", "config.release.json"):
        if SHARED.joinpath(name).exists():
            foreign.append(json.loads(SHARED.joinpath(name).read_text())["auto_map"])
    small = dict(d_model=64, n_heads=4, n_layers=2, vocab_size=VOCAB)
    for auto_map in foreign:
        config = ReplitLMConfig(auto_map=auto_map, **small)
        assert config.auto_map == AUTO_MAP
        config.save_pretrained(tmp_path)
        assert json.loads((tmp_path / "config.json").read_text())["auto_map"] == AUTO_MAP
    hub = {key: f"someone/replit-fork--{value}" for key, value in AUTO_MAP.items()}
    assert ReplitLMConfig(auto_map=hub, **small).auto_map == hub


def test_missing_weights_give_a_clear_error(tmp_path, reference):
    model = reference[0]
    folder = write_hub_folder(tmp_path / "repo", mpt_config(model.config), {}, "safetensors")
    (folder / "model.safetensors").unlink()
    with pytest.raises(OSError, match="model.safetensors|pytorch_model.bin|weights"):
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)


def test_corrupt_weights_give_a_clear_error(tmp_path, reference):
    model = reference[0]
    folder = write_hub_folder(tmp_path / "repo", mpt_config(model.config), published_state_dict(model))
    weights = folder / "model.safetensors"
    whole = weights.read_bytes()
    for damaged in (b"not a safetensors file", whole[: len(whole) // 2]):  # garbage, and a download cut short
        weights.write_bytes(damaged)
        with pytest.raises(OSError, match=f"a weights file of {folder} could not be read .*truncated or corrupt"):
            AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)


def test_device_map_auto_loads(tmp_path, reference):
    pytest.importorskip("accelerate")
    model, ids, expected = reference
    folder = write_hub_folder(tmp_path / "repo", mpt_config(model.config), published_state_dict(model))
    loaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, device_map="auto")
    torch.testing.assert_close(loaded.eval()(ids).logits, expected, atol=0, rtol=0)
