"""Configuration of replit-code-v1-3b (ReplitLM, the MPT architecture with ALiBi).

Two schemas describe the same model. The release of May 2023 wrote flat fields (`attn_impl`, `mlp_ratio`,
`low_precision_layernorm`, `param_init_fn`, ...); the checkpoint published today uses MPT's schema (nested
`attn_config` and `init_config`, `expansion_ratio`, `norm_type`, model_type "mpt"). `ReplitLMConfig` takes
either and keeps the flat release fields, so `config.json` files of both eras load and save the same way.
"""

import inspect
import math

from transformers import PretrainedConfig

ATTN_IMPLS = ("torch", "triton")
WEIGHT_QUANTIZATIONS = (None, "int8", "int4")
PARAM_INIT_FNS = ("kaiming_normal_", "kaiming_uniform_", "normal_")
NORM_TYPES = {"low_precision_layernorm": True, "layernorm": False}

# MPT's nested attn_config key -> our flat field.
_MPT_ATTN_FIELDS = {
    "attn_impl": "attn_impl",
    "attn_pdrop": "attn_pdrop",
    "clip_qkv": "attn_clip_qkv",
    "qk_ln": "attn_qk_ln",
    "softmax_scale": "softmax_scale",
    "prefix_lm": "prefix_lm",
    "attn_uses_sequence_id": "attn_uses_sequence_id",
    "alibi": "alibi",
    "alibi_bias_max": "alibi_bias_max",
}
# MPT attn_config keys of features ReplitLM does not have (llm-foundry's later releases), each with the value that
# leaves the feature off; any other value (None also means off) is refused rather than silently not computed.
_MPT_ATTN_OFF = {
    "qk_gn": False,
    "sliding_window_size": -1,
    "attn_logit_softcapping": None,
    "rope": False,
    "kv_dim": None,
    "flex_attn_mod_list": [],
}
# MPT's ffn_config, as replit-code-v1-3b's MLP is (up, exact GELU, down; expansion_ratio x d_model wide).
_MPT_FFN = {
    "ffn_type": "mptmlp",
    "ffn_act_fn": {"name": "gelu", "approximate": "none"},
    "ffn_hidden_size": None,
}
# MPT's nested init_config key -> our flat field.
_MPT_INIT_FIELDS = {
    "name": "param_init_fn",
    "init_std": "init_std",
    "emb_init_std": "emb_init_std",
    "emb_init_uniform_lim": "emb_init_uniform_lim",
    "init_gain": "init_gain",
    "fan_mode": "fan_mode",
    "init_nonlinearity": "init_nonlinearity",
    "init_div_is_residual": "init_div_is_residual",
}


# This repository's classes, as config.json names them for transformers' Auto classes (trust_remote_code).
AUTO_MAP = {
    "AutoConfig": "configuration_replit_lm.ReplitLMConfig",
    "AutoModel": "modeling_replit_lm.ReplitLMModel",
    "AutoModelForCausalLM": "modeling_replit_lm.ReplitLM",
}


def _section(value, name: str) -> dict:
    """One of MPT's nested sections (attn_config, init_config, ffn_config) as a dict; None is an empty one."""
    if value is None:
        return {}
    if not isinstance(value, dict) and hasattr(value, "to_dict"):  # transformers' MptAttentionConfig
        value = value.to_dict()
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a dict of MPT's {name} fields, got {value!r}")
    return value


def _flat_attn_fields(attn_config) -> dict:
    """MPT's nested attn_config (a dict, or transformers' MptAttentionConfig) as our flat fields; a ValueError for
    an attention this model does not compute."""
    attn_config = _section(attn_config, "attn_config")
    attn_type = attn_config.get("attn_type", "multihead_attention")
    if attn_type != "multihead_attention":
        raise ValueError(f"attn_config.attn_type={attn_type!r} is not supported: ReplitLM uses multihead_attention")
    for key, off in _MPT_ATTN_OFF.items():
        if attn_config.get(key, off) not in (off, None):
            raise ValueError(f"attn_config.{key}={attn_config[key]!r} is not supported: ReplitLM has no such feature")
    return {field: attn_config[key] for key, field in _MPT_ATTN_FIELDS.items() if key in attn_config}


def _normalise_mpt_schema(kwargs: dict) -> dict:
    """Fold the MPT-era fields of a published config.json into the release fields, in place. An auto_map naming
    other code (MPT's configuration_mpt/modeling_mpt, or the release's replit_lm.py) is replaced by ours, so that a
    model saved from this config loads with this code."""
    if kwargs.get("model_type") not in (None, "mpt", "replit_lm"):
        raise ValueError(f"ReplitLMConfig cannot read a config of model_type {kwargs['model_type']!r}")
    kwargs.pop("model_type", None)
    auto_map = kwargs.get("auto_map")
    # A Hub reference ("owner/repo--module.Class") to our classes is kept.
    if isinstance(auto_map, dict) and any(
        not isinstance(value, str) or value.split("--")[-1] not in AUTO_MAP.values() for value in auto_map.values()
    ):
        kwargs["auto_map"] = dict(AUTO_MAP)
    kwargs.update(_flat_attn_fields(kwargs.pop("attn_config", None)))
    ffn_config = _section(kwargs.pop("ffn_config", None), "ffn_config")
    for key, supported in _MPT_FFN.items():
        if ffn_config.get(key, supported) not in (supported, None):
            raise ValueError(f"ffn_config.{key}={ffn_config[key]!r} is not supported: ReplitLM's MLP has {supported!r}")
    init_config = _section(kwargs.pop("init_config", None), "init_config")
    for key, value in init_config.items():
        if key in _MPT_INIT_FIELDS:
            kwargs[_MPT_INIT_FIELDS[key]] = value
    if "expansion_ratio" in kwargs:
        kwargs["mlp_ratio"] = kwargs.pop("expansion_ratio")
    if "norm_type" in kwargs:
        norm_type = kwargs.pop("norm_type")
        if norm_type not in NORM_TYPES:
            raise ValueError(f"norm_type={norm_type!r} is not supported; expected one of {sorted(NORM_TYPES)}")
        kwargs["low_precision_layernorm"] = NORM_TYPES[norm_type]
    for name in ("dtype", "torch_dtype"):  # transformers would fail on getattr(torch, value)
        value = kwargs.get(name)
        if isinstance(value, str) and value != "auto" and not _is_torch_dtype(value):
            raise ValueError(f"{name}={value!r} is not a torch dtype (float32, bfloat16, float16, ...)")
    # MPT writes learned_pos_emb=True even with ALiBi, where it has no effect; only alibi decides positions.
    kwargs.pop("learned_pos_emb", None)
    kwargs.pop("tokenizer_name", None)
    return kwargs


def _is_torch_dtype(name: str) -> bool:
    import torch

    return isinstance(getattr(torch, name, None), torch.dtype)


class _AttnConfigView(dict):
    """MPT's nested `attn_config`, as a view on the flat fields: every way of writing keys (`[...] =`, update,
    setdefault, |=) sets and checks the fields, so the card's `config.attn_config['attn_impl'] = 'triton'` works on a
    config loaded from either schema. Keys cannot be removed, since each is a field the model reads."""

    def __init__(self, config: "ReplitLMConfig"):
        super().__init__({key: getattr(config, field) for key, field in _MPT_ATTN_FIELDS.items()})
        self._config = config

    def _write(self, values: dict):
        """Set all of `values` or, where the result does not validate, none."""
        unknown = [key for key in values if key not in _MPT_ATTN_FIELDS]
        if unknown:
            raise KeyError(f"attn_config has no field {unknown[0]!r}; known: {sorted(_MPT_ATTN_FIELDS)}")
        previous = {key: getattr(self._config, _MPT_ATTN_FIELDS[key]) for key in values}
        for key, value in values.items():
            setattr(self._config, _MPT_ATTN_FIELDS[key], value)
        try:
            self._config.validate()
        except ValueError:
            for key, value in previous.items():
                setattr(self._config, _MPT_ATTN_FIELDS[key], value)
            raise
        super().update(values)

    def __setitem__(self, key, value):
        self._write({key: value})

    def update(self, other=(), /, **kwargs):
        self._write(dict(other, **kwargs))

    def setdefault(self, key, default=None):
        if key not in self:
            self._write({key: default})
        return self[key]

    def __ior__(self, other):
        self._write(dict(other))
        return self

    def _refuse_removal(self, *args):
        raise TypeError("attn_config's keys are fields of the config and cannot be removed; set them instead")

    __delitem__ = pop = popitem = clear = _refuse_removal


# Fields that must be finite numbers (None allowed for the optional ones), checked before their ranges.
NUMBER_FIELDS = (
    "attn_pdrop",
    "resid_pdrop",
    "emb_pdrop",
    "embedding_fraction",
    "layer_norm_epsilon",
    "init_std",
    "init_gain",
    "alibi_bias_max",
    "attn_clip_qkv",
    "softmax_scale",
    "emb_init_std",
)
OPTIONAL_NUMBER_FIELDS = ("attn_clip_qkv", "softmax_scale", "emb_init_std")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class ReplitLMConfig(PretrainedConfig):
    model_type = "replit_lm"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "num_hidden_layers": "n_layers",
        "max_position_embeddings": "max_seq_len",
    }

    def __init__(
        self,
        d_model: int = 2560,
        n_heads: int = 32,
        n_layers: int = 32,
        mlp_ratio: int = 4,
        max_seq_len: int = 2048,
        vocab_size: int = 32768,
        attn_pdrop: float = 0.0,
        resid_pdrop: float = 0.0,
        emb_pdrop: float = 0.0,
        attn_impl: str = "torch",
        attn_qk_ln: bool = False,
        attn_clip_qkv: float | None = None,
        softmax_scale: float | None = None,
        prefix_lm: bool = False,
        attn_uses_sequence_id: bool = False,
        alibi: bool = True,
        alibi_bias_max: int = 8,
        init_device: str = "cpu",
        logit_scale: float | str | None = None,
        no_bias: bool = True,
        verbose: int = 0,
        embedding_fraction: float = 1.0,
        low_precision_layernorm: bool = True,
        layer_norm_epsilon: float = 1e-5,
        param_init_fn: str = "kaiming_normal_",
        init_std: float = 0.02,
        emb_init_std: float | None = None,
        emb_init_uniform_lim: float | list | None = None,
        init_gain: float = 0.0,
        fan_mode: str = "fan_in",
        init_nonlinearity: str = "relu",
        init_div_is_residual: bool = True,
        weight_quantization: str | None = None,
        use_cache: bool = True,
        eos_token_id: int = 1,
        pad_token_id: int = 2,
        bos_token_id: int | None = None,
        tie_word_embeddings: bool = True,
        **kwargs,
    ):
        kwargs = _normalise_mpt_schema(kwargs)
        self.d_model = d_model
        self.n_heads = n_heads
        self.n_layers = n_layers
        self.mlp_ratio = mlp_ratio
        self.max_seq_len = max_seq_len
        self.vocab_size = vocab_size
        self.attn_pdrop = attn_pdrop
        self.resid_pdrop = resid_pdrop
        self.emb_pdrop = emb_pdrop
        self.attn_impl = attn_impl
        self.attn_qk_ln = attn_qk_ln
        self.attn_clip_qkv = attn_clip_qkv
        self.softmax_scale = softmax_scale
        self.prefix_lm = prefix_lm
        self.attn_uses_sequence_id = attn_uses_sequence_id
        self.alibi = alibi
        self.alibi_bias_max = alibi_bias_max
        self.init_device = init_device
        self.logit_scale = logit_scale
        self.no_bias = no_bias
        self.verbose = verbose
        self.embedding_fraction = embedding_fraction
        self.low_precision_layernorm = low_precision_layernorm
        self.layer_norm_epsilon = layer_norm_epsilon
        self.param_init_fn = param_init_fn
        self.init_std = init_std
        self.emb_init_std = emb_init_std
        self.emb_init_uniform_lim = emb_init_uniform_lim
        self.init_gain = init_gain
        self.fan_mode = fan_mode
        self.init_nonlinearity = init_nonlinearity
        self.init_div_is_residual = init_div_is_residual
        self.weight_quantization = weight_quantization
        self.use_cache = use_cache
        # The MPT-schema fields were folded into kwargs and the base class would set them over the flat ones: where
        # both are given (a flat field other than its default) and differ, one would be dropped without a word.
        for name, value in kwargs.items():
            if name in _FLAT_DEFAULTS and getattr(self, name) not in (_FLAT_DEFAULTS[name], value):
                raise ValueError(
                    f"{name}={getattr(self, name)!r} contradicts {value!r}, its value in the MPT schema's fields "
                    "(attn_config, init_config, expansion_ratio, norm_type) of the same config: give it once"
                )
        # Before the base class too: transformers 5's own checks read head_dim, which a bad n_heads breaks.
        self.validate()
        # The flat fields above are read by our code; the MPT-era fields have been folded into them, and the
        # two released configs' other keys (transformers_version, architectures, ...) go to the base class.
        super().__init__(
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.validate()  # again, with the MPT-schema fields, which the base class sets from kwargs
        # Here rather than in validate(), which the model runs again: transformers' own tests build models after
        # shrinking vocab_size alone, as its models allow.
        for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and 0 <= value < self.vocab_size):
                raise ValueError(f"{name} must be a token id in [0, {self.vocab_size}) or None, got {value!r}")

    @property
    def attn_config(self) -> dict:
        return _AttnConfigView(self)

    @attn_config.setter
    def attn_config(self, attn_config: dict):
        """Sets the fields that a whole MPT attn_config names (from_pretrained(..., attn_config={...})), checked."""
        _flat_attn_fields(attn_config)
        self.attn_config.update({key: value for key, value in attn_config.items() if key in _MPT_ATTN_FIELDS})

    # MPT's names of two flat fields, so that they can be read and set (from_pretrained(..., norm_type=...)) too.
    @property
    def expansion_ratio(self) -> int:
        return self.mlp_ratio

    @expansion_ratio.setter
    def expansion_ratio(self, value: int):
        self.mlp_ratio = value

    @property
    def norm_type(self) -> str:
        return next(name for name, low_precision in NORM_TYPES.items() if low_precision == self.low_precision_layernorm)

    @norm_type.setter
    def norm_type(self, value: str):
        if value not in NORM_TYPES:
            raise ValueError(f"norm_type={value!r} is not supported; expected one of {sorted(NORM_TYPES)}")
        self.low_precision_layernorm = NORM_TYPES[value]

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def validate(self):
        """Reject values the model cannot run, naming the field; called on construction and by the model."""
        for name in NUMBER_FIELDS:
            value = getattr(self, name)
            if value is None and name in OPTIONAL_NUMBER_FIELDS:
                continue
            if not _is_number(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        for name in ("layer_norm_epsilon", "init_std", "alibi_bias_max"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.emb_init_std is not None and self.emb_init_std <= 0:
            raise ValueError(f"emb_init_std must be positive or None, got {self.emb_init_std!r}")
        lim = self.emb_init_uniform_lim
        if lim is not None and not (
            (_is_number(lim) and lim > 0)
            or (isinstance(lim, (list, tuple)) and len(lim) == 2 and all(map(_is_number, lim)) and lim[0] < lim[1])
        ):
            raise ValueError(f"emb_init_uniform_lim must be a positive number, a pair [low, high] or None, got {lim!r}")
        for name in ("d_model", "n_heads", "n_layers", "mlp_ratio", "max_seq_len", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads != 0:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl={self.attn_impl!r} is not supported; expected one of {ATTN_IMPLS}")
        if self.weight_quantization not in WEIGHT_QUANTIZATIONS:
            raise ValueError(
                f"weight_quantization={self.weight_quantization!r} is not supported; expected one of "
                f"{WEIGHT_QUANTIZATIONS}"
            )
        for name in ("attn_pdrop", "resid_pdrop", "emb_pdrop"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        if not 0.0 < self.embedding_fraction <= 1.0:
            raise ValueError(f"embedding_fraction must be in (0, 1], got {self.embedding_fraction!r}")
        if not self.alibi:
            raise ValueError(
                "alibi=False is not supported: replit-code-v1-3b has no position embedding and gets positions "
                "from ALiBi only"
            )
        for name in ("prefix_lm", "attn_qk_ln", "attn_uses_sequence_id"):
            if getattr(self, name):
                raise ValueError(f"{name}=True is not implemented (replit-code-v1-3b was trained without it)")
        if not self.no_bias:
            raise ValueError("no_bias=False is not implemented: replit-code-v1-3b has no bias terms")
        if self.attn_clip_qkv is not None and self.attn_clip_qkv <= 0:
            raise ValueError(f"attn_clip_qkv must be positive or None, got {self.attn_clip_qkv!r}")
        if self.softmax_scale is not None and self.softmax_scale <= 0:
            raise ValueError(f"softmax_scale must be positive or None, got {self.softmax_scale!r}")
        scale = self.logit_scale
        if scale is not None and scale != "inv_sqrt_d_model" and not (_is_number(scale) and scale > 0):
            raise ValueError(f"logit_scale must be a positive number, 'inv_sqrt_d_model' or None, got {scale!r}")
        if self.param_init_fn not in PARAM_INIT_FNS:
            raise ValueError(f"param_init_fn={self.param_init_fn!r} is not supported; expected one of {PARAM_INIT_FNS}")
        if self.fan_mode not in ("fan_in", "fan_out"):
            raise ValueError(f"fan_mode must be 'fan_in' or 'fan_out', got {self.fan_mode!r}")


# The flat fields' defaults, as ReplitLMConfig.__init__ declares them.
_FLAT_DEFAULTS = {
    name: parameter.default
    for name, parameter in inspect.signature(ReplitLMConfig.__init__).parameters.items()
    if parameter.default is not inspect.Parameter.empty
}
