"""Tiny ReplitLM models paired with transformers' MptForCausalLM on the same weights (the reference oracle)."""

import json
import shutil

import torch
from conftest import MODEL_CODE_FILES, ROOT
from replit_tools.mpt_reference import mpt_config
from transformers import MptForCausalLM

from replit_lm.configuration_replit_lm import ReplitLMConfig
from replit_lm.modeling_replit_lm import ReplitLM

# Small shapes that still cover the interesting cases: a non-power-of-two head count (MPT's interleaved slopes),
# qkv clipping and an explicit softmax scale.
TINY_CONFIGS = {
    "pow2_heads": dict(d_model=64, n_heads=4, n_layers=2),
    "six_heads": dict(d_model=48, n_heads=6, n_layers=3),
    "clip_and_scale": dict(d_model=40, n_heads=5, n_layers=2, attn_clip_qkv=0.5, softmax_scale=0.3),
}
VOCAB = 101
MAX_SEQ_LEN = 64


def replit_config(**overrides) -> ReplitLMConfig:
    kwargs = dict(TINY_CONFIGS["pow2_heads"], vocab_size=VOCAB, max_seq_len=MAX_SEQ_LEN)
    kwargs.update(overrides)
    return ReplitLMConfig(**kwargs)


def reference_for(config: ReplitLMConfig, spread_weights: bool = True) -> MptForCausalLM:
    """transformers' MptForCausalLM with the same shape, random weights: MPT's own initialisation, spread out
    unless `spread_weights` is False."""
    torch.manual_seed(1234)
    ref = MptForCausalLM(mpt_config(config)).eval()
    if not spread_weights:
        return ref
    # MPT's default init is tiny (std 0.02): spread the weights so that differences would show in the logits.
    with torch.no_grad():
        for name, param in ref.named_parameters():
            param.normal_(0, 0.3 if param.dim() == 2 else 1.0).add_(1.0 if "norm" in name else 0.0)
    return ref


def model_pair(name: str = "pow2_heads", spread_weights: bool = True, **overrides) -> tuple[ReplitLM, MptForCausalLM]:
    """Our model and the reference, with the reference's random weights (see `reference_for`) copied into ours."""
    config = replit_config(**{**TINY_CONFIGS[name], **overrides})
    ref = reference_for(config, spread_weights)
    model = ReplitLM(config).eval()
    missing, unexpected = model.load_state_dict(ref.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    return model, ref


def write_hub_folder(folder, config_dict: dict, state_dict: dict, fmt: str = "safetensors"):
    """A folder laid out like the Hub repository: config.json, weights, and our code files beside them."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in MODEL_CODE_FILES:
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, folder / name)
    (folder / "config.json").write_text(json.dumps(config_dict, indent=2))
    state_dict = {k: v.contiguous() for k, v in state_dict.items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state_dict, folder / "model.safetensors", metadata={"format": "pt"})
    elif fmt == "bin":
        torch.save(state_dict, folder / "pytorch_model.bin")
    elif fmt in ("sharded-safetensors", "sharded-bin"):
        from safetensors.torch import save_file

        keys = sorted(state_dict)
        halves = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
        weight_map = {}
        for i, part in enumerate(halves, start=1):
            if fmt == "sharded-safetensors":
                shard = f"model-{i:05d}-of-00002.safetensors"
                save_file({k: state_dict[k] for k in part}, folder / shard, metadata={"format": "pt"})
            else:
                shard = f"pytorch_model-{i:05d}-of-00002.bin"
                torch.save({k: state_dict[k] for k in part}, folder / shard)
            weight_map.update(dict.fromkeys(part, shard))
        index = "model.safetensors.index.json" if fmt == "sharded-safetensors" else "pytorch_model.bin.index.json"
        total = sum(v.numel() * v.element_size() for v in state_dict.values())
        (folder / index).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    else:
        raise ValueError(fmt)
    return folder
