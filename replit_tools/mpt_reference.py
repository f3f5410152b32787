"""transformers' own MptForCausalLM as the reference for ReplitLM: the same architecture, written independently, with
the parameter names of the published checkpoint. The tests use it as their oracle and the benchmarks as the
baseline; this is the one place that translates a ReplitLMConfig into its MptConfig."""

from transformers import MptConfig


def mpt_config(config) -> MptConfig:
    """The MptConfig of the model `config` (a ReplitLMConfig) describes, with the KV cache on: MptConfig's default
    is off, which would make generate recompute the whole sequence for every new token."""
    return MptConfig(
        d_model=config.d_model,
        n_heads=config.n_heads,
        n_layers=config.n_layers,
        expansion_ratio=config.mlp_ratio,
        max_seq_len=config.max_seq_len,
        vocab_size=config.vocab_size,
        no_bias=True,  # ReplitLM has no biases, LayerNorms included
        layer_norm_epsilon=config.layer_norm_epsilon,
        attn_config=dict(
            clip_qkv=config.attn_clip_qkv, softmax_scale=config.softmax_scale, alibi_bias_max=config.alibi_bias_max
        ),
        pad_token_id=config.pad_token_id,
        eos_token_id=config.eos_token_id,
        use_cache=True,
    )
