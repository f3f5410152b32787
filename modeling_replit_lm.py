"""ReplitLM: replit-code-v1-3b (MPT: pre-LayerNorm blocks, ALiBi attention, no biases, tied embeddings).

Parameter names are those of the checkpoint published today:
    transformer.wte, transformer.blocks.N.{norm_1, attn.Wqkv, attn.out_proj, norm_2, ffn.up_proj, ffn.down_proj},
    transformer.norm_f; lm_head is tied to transformer.wte.
Checkpoints in the release layout of May 2023 (ln_1, mlp.mlp_up, ln_f, ...) are renamed as they load.
"""

import copy
import math

import torch
import torch.nn.functional as F
import transformers
from safetensors import SafetensorError
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache, StaticCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .attention import (
    ATTENTION_BACKENDS,
    AttentionMask,
    Unpacking,
    additive_bias,
    alibi_bias_table,
    alibi_slopes,
    attends_in_blocks,
    attention_backend,
    key_ranges,
    native_decode_pays,
)
from .configuration_replit_lm import ReplitLMConfig
from .quantization import QuantizedLinear, RoutedLinear, quantize_linear_layers, refuse_moving_quantized

# transformers 4.x copies into its module cache only the files that this file imports itself, not their imports.
from .triton_flash_attn import flash_attn_alibi  # noqa: F401

# ----- Differences between transformers 4.57 and 5.x: every version check of this file is here. -----
try:  # transformers 5: init functions that leave tensors already loaded from a checkpoint alone
    from transformers import initialization as init
except ImportError:  # transformers 4
    from torch.nn import init

TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
# The field of model outputs (and the forward keyword) that holds the cache: `cache` in newer releases.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
# The declaration of the LM head tied to the embedding, in the installed release's format.
TIED_WEIGHTS_KEYS = {"lm_head.weight": "transformer.wte.weight"} if TRANSFORMERS_5 else ["lm_head.weight"]


def cache_argument(past_key_values, kwargs: dict):
    """The cache passed to forward, under either release's keyword."""
    return kwargs.pop("cache", past_key_values)


def labels_trainer_counts(labels: torch.Tensor) -> torch.Tensor:
    """The labels whose entries other than -100 transformers' Trainer counts in num_items_in_batch: the targets,
    labels[:, 1:], in 5.x; 4.x counts the first position's too, which no causal LM predicts."""
    return labels[:, 1:] if TRANSFORMERS_5 else labels


# generate's max_length when nobody set it (5.x: None, 4.x: 20), and the new tokens it then writes (both).
UNSET_MAX_LENGTH = GenerationConfig().max_length
DEFAULT_NEW_TOKENS = 20


def forget_generation_cache(model):
    """transformers 4.x keeps generate's static cache on the model (`_cache`) for the next call: a later call then
    overwrites the cache an earlier one returned, and a call that failed before filling it leaves a cache that
    breaks every later call. transformers 5 makes a new one per call; so does this, on 4.x."""
    if not TRANSFORMERS_5:
        model.__dict__.pop("_cache", None)


def check_cache_takes(cache: Cache, batch: int, past_len: int, new_tokens: int):
    """A ValueError where a cache passed to forward cannot take these tokens: it holds other sequences, or it is
    preallocated (static) for fewer. (generate sizes its caches itself.)"""
    layer = cache.layers[0] if getattr(cache, "layers", None) else None
    keys = getattr(layer, "keys", None)  # (batch, heads, positions, head_dim) once filled
    if isinstance(keys, torch.Tensor) and keys.dim() == 4 and keys.shape[0] != batch:
        raise ValueError(
            f"the cache holds {keys.shape[0]} sequences and the input {batch}: pass the cache of this batch"
        )
    capacity = getattr(layer, "max_cache_len", None)
    if isinstance(capacity, int) and not getattr(layer, "is_sliding", False) and past_len + new_tokens > capacity:
        raise ValueError(
            f"the cache has room for {capacity} tokens and holds {past_len}: {new_tokens} more do not fit (make it "
            "with a larger max_cache_len)"
        )


def packed_sequences(position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Which sequence each token belongs to where sequences are packed into one row, their positions restarting at
    0 (as DataCollatorWithFlattening writes them): (batch, seq_len) int64, equal within a sequence; None where no
    position restarts. ALiBi takes positions from the order of the tokens, so position_ids are read for this only:
    within a sequence, the distance between two tokens is the distance of their positions. Any other step than +1
    or a restart at 0 is a ValueError."""
    if not isinstance(position_ids, torch.Tensor) or position_ids.shape[-1] < 2:
        return None
    new_tokens = position_ids.shape[-1]
    positions = position_ids.reshape(-1, new_tokens)  # (batch or 1, new tokens)
    restarts = positions[:, 1:] == 0
    skips = (positions[:, 1:] - positions[:, :-1] != 1) & ~restarts
    if attention_mask is not None:  # padding positions may hold anything (transformers writes 1 there)
        real = attention_mask[:, -new_tokens:].bool()
        both_real = real[:, 1:] & real[:, :-1]
        # A real token at position 0 after an earlier real token of its row begins a sequence also where padding
        # separates the two: read only between adjacent real tokens, the restart was missed and the sequence was
        # attended as the continuation of the one before.
        after_real = real.cummax(dim=1).values[:, :-1]
        skips, restarts = skips & both_real, restarts & real[:, 1:] & after_real
        positions = positions.expand(len(real), -1)
    if bool(skips.any()):
        row, step = skips.nonzero()[0].tolist()
        raise ValueError(
            "position_ids must count up by one within a sequence, or restart at 0 where a sequence packed into the "
            f"same row begins: row {row} goes from {int(positions[row, step])} to {int(positions[row, step + 1])}"
        )
    if not bool(restarts.any()):
        return None
    return F.pad(restarts.long().cumsum(-1), (1, 0))


def static_cache_with_room(cache: StaticCache, length: int, config) -> StaticCache:
    """A StaticCache of `length` positions holding what `cache` holds (4.x writes where cache_position says, 5.x
    after what the layer holds: both from 0 here)."""
    filled = cache.get_seq_length()
    grown = StaticCache(config=config, max_cache_len=length)
    for index, layer in enumerate(cache.layers):
        if getattr(layer, "keys", None) is not None and filled:
            keys, values = layer.keys[:, :, :filled], layer.values[:, :, :filled]
            grown.update(keys, values, index, {"cache_position": torch.arange(filled, device=keys.device)})
    return grown


# ----- end of version differences -----

# Release layout (May 2023) -> published (MPT) layout, as regular expressions on state-dict keys.
RELEASE_TO_MPT_KEYS = {
    r"\.ln_1\.": ".norm_1.",
    r"\.ln_2\.": ".norm_2.",
    r"\.mlp\.mlp_up\.": ".ffn.up_proj.",
    r"\.mlp\.mlp_down\.": ".ffn.down_proj.",
    r"transformer\.ln_f\.": "transformer.norm_f.",
}


class LayerNorm(nn.LayerNorm):
    """LayerNorm without bias. With `low_precision`, under autocast it runs in the autocast dtype, as the original
    LPLayerNorm did, instead of autocast's float32."""

    def __init__(self, d_model: int, eps: float, low_precision: bool):
        super().__init__(d_model, eps=eps, bias=False)
        self.low_precision = low_precision

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        if self.low_precision and torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            with torch.autocast(device_type, enabled=False):
                return F.layer_norm(x.to(dtype), self.normalized_shape, self.weight.to(dtype), None, self.eps)
        return F.layer_norm(x, self.normalized_shape, self.weight, None, self.eps)


class ReplitAttention(nn.Module):
    def __init__(self, config: ReplitLMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.softmax_scale = config.softmax_scale or 1.0 / math.sqrt(self.head_dim)
        self.clip_qkv = config.attn_clip_qkv
        self.config = config
        self.Wqkv = RoutedLinear(config.d_model, 3 * config.d_model, bias=False)
        self.Wqkv.fused_matrices = 3  # q, k and v side by side (see _init_weights)
        self.out_proj = RoutedLinear(config.d_model, config.d_model, bias=False)
        self.out_proj.residual_projection = True

    def forward(self, x: torch.Tensor, mask: AttentionMask, cache: Cache | None, output_attentions: bool):
        batch, q_len, d_model = x.shape
        qkv = self.Wqkv(x)  # (batch, q_len, 3 * d_model)
        if self.clip_qkv:
            qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        # (batch, q_len, 3, heads, head_dim) -> 3 x (batch, heads, q_len, head_dim)
        q, k, v = qkv.view(batch, q_len, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if cache is not None:
            # cache_position: where a static cache of transformers 4.x writes (others keep their own count).
            k, v = cache.update(k, v, self.layer_idx, {"cache_position": mask.cache_position})
            # A preallocated (static) cache returns its whole length; only the first kv_len entries are filled.
            k, v = k[:, :, : mask.kv_len], v[:, :, : mask.kv_len]
        dropout_p = self.config.attn_pdrop if self.training else 0.0
        attend = ATTENTION_BACKENDS[mask.backend]
        unpacking = mask.unpacking
        if unpacking is None:
            out, weights = attend(q, k, v, mask, self.softmax_scale, dropout_p, output_attentions)
        else:  # sequences packed into rows, each attended in a row of its own
            q, k, v = (unpacking.unpack(t) for t in (q, k, v))
            out, weights = attend(q, k, v, unpacking.mask, self.softmax_scale, dropout_p, output_attentions)
            out = unpacking.pack(out, batch, q_len)
        out = out.transpose(1, 2).reshape(batch, q_len, d_model)
        return self.out_proj(out), weights


class ReplitMLP(nn.Module):
    def __init__(self, config: ReplitLMConfig):
        super().__init__()
        self.up_proj = RoutedLinear(config.d_model, config.mlp_ratio * config.d_model, bias=False)
        self.down_proj = RoutedLinear(config.mlp_ratio * config.d_model, config.d_model, bias=False)
        self.down_proj.residual_projection = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))


class ReplitBlock(GradientCheckpointingLayer):
    def __init__(self, config: ReplitLMConfig, layer_idx: int):
        super().__init__()
        eps, low_precision = config.layer_norm_epsilon, config.low_precision_layernorm
        self.norm_1 = LayerNorm(config.d_model, eps, low_precision)
        self.attn = ReplitAttention(config, layer_idx)
        self.norm_2 = LayerNorm(config.d_model, eps, low_precision)
        self.ffn = ReplitMLP(config)
        self.resid_attn_dropout = nn.Dropout(config.resid_pdrop)
        self.resid_ffn_dropout = nn.Dropout(config.resid_pdrop)

    def __call__(self, *args, **kwargs):
        # Without gradients there is no backward to replay the block in, so it runs as is, cache included (generating
        # from a model in training mode), as transformers 5's GradientCheckpointingLayer does; 4.x's checkpointed it
        # and dropped the cache whenever the model was in training mode.
        if not torch.is_grad_enabled():
            return nn.Module.__call__(self, *args, **kwargs)
        return super().__call__(*args, **kwargs)

    # `layer_past` is the name under which transformers' gradient checkpointing drops the cache, in 4.x and 5.x.
    def forward(self, x, mask: AttentionMask, layer_past: Cache | None = None, output_attentions: bool = False):
        attn_out, weights = self.attn(self.norm_1(x), mask, layer_past, output_attentions)
        x = x + self.resid_attn_dropout(attn_out)
        x = x + self.resid_ffn_dropout(self.ffn(self.norm_2(x)))
        return x, weights


ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "triton")


def check_attn_implementation(value: str):
    if value not in ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"attn_implementation={value!r} is not supported by ReplitLM; expected one of {ATTN_IMPLEMENTATIONS} "
            "('triton' is the same as attn_impl='triton')"
        )


class ReplitLMPreTrainedModel(PreTrainedModel):
    """transformers' attention switch, attn_implementation, selects a backend of attention.py's ATTENTION_BACKENDS:
    "sdpa" (the default) and "eager" compute the torch path (attn_impl='torch') with scaled_dot_product_attention or
    with an explicit softmax, and "triton" is the card's attn_impl='triton'."""

    config_class = ReplitLMConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ReplitBlock"]
    _supports_sdpa = True
    # Attention runs through ATTENTION_BACKENDS, not transformers' attention interface, so none of its other
    # implementations (FlashAttention, flex attention, kernels from the Hub) applies.
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False
    # The forward reads the cache length and the mask's contents on the host (graph breaks under torch.compile).
    _can_compile_fullgraph = False
    _supports_cache_class = True

    def __init__(self, config: ReplitLMConfig, *args, **kwargs):
        # attn_implementation="triton" given to the config or to from_config is the card's switch.
        if config._attn_implementation == "triton":
            config.attn_impl, config._attn_implementation = "triton", None
        # from_pretrained sets overrides such as attn_impl='triton' after the config was built: check them now.
        config.validate()
        super().__init__(config, *args, **kwargs)

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        """Every forward pass picks its backend from the config, so set_attn_implementation takes effect at once
        (transformers guesses otherwise from the source, which has no AttentionInterface)."""
        return True

    def set_attn_implementation(self, attn_implementation: str, *args, **kwargs):
        """transformers' switch at run time: "sdpa" or "eager" for the torch path, or "triton"."""
        if attn_implementation == "triton":
            self.config.attn_impl = "triton"
            return
        super().set_attn_implementation(attn_implementation, *args, **kwargs)  # refuses what is not supported
        self.config.attn_impl = "torch"

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        # Checkpoints of the May 2023 release use other names; rename them on load, whatever the format.
        kwargs.setdefault("key_mapping", RELEASE_TO_MPT_KEYS)
        config = kwargs.get("config")
        attn_implementation = kwargs.pop("attn_implementation", None)
        if attn_implementation is None and isinstance(config, PretrainedConfig):
            # The Auto classes hand attn_implementation to the config they load.
            attn_implementation = config._attn_implementation
        if attn_implementation is not None:
            check_attn_implementation(attn_implementation)
            kwargs["attn_impl"] = "triton" if attn_implementation == "triton" else "torch"
            if attn_implementation != "triton":
                kwargs["attn_implementation"] = attn_implementation
        overrides = {name: kwargs.pop(name) for name in ("weight_quantization", "attn_impl") if name in kwargs}
        if isinstance(config, PretrainedConfig) and overrides:
            # With a config object, transformers would hand these keywords to __init__ instead of the config.
            config = kwargs["config"] = copy.deepcopy(config)
            for name, value in overrides.items():
                setattr(config, name, value)
        else:
            kwargs.update(overrides)
        quantization = kwargs.get("weight_quantization", getattr(config, "weight_quantization", None))
        if quantization is not None and "dtype" not in kwargs and "torch_dtype" not in kwargs:
            # The quantized layers compute in bfloat16, and loading straight into bfloat16 (converting tensor by
            # tensor) never holds a float32 copy of the model.
            kwargs["dtype"] = torch.bfloat16
        try:
            loaded = super().from_pretrained(*args, **kwargs)
        except SafetensorError as error:  # transformers passes it on without the file it was reading
            where = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            raise OSError(
                f"a weights file of {where} could not be read ({error}): it may be truncated or corrupt; download "
                "it again"
            ) from error
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, loading info) on request
        if model.config.weight_quantization is not None:
            # The weights may be views of the memory-mapped checkpoint, used by nothing else.
            model.quantize_weights(model.config.weight_quantization, release_mapped_pages=True)
        return loaded

    def quantize_weights(self, mode: str, release_mapped_pages: bool = False):
        """Quantize every Linear layer (the LM head included) to `mode`, "int8" or "int4", in place, for CPU
        inference; what from_pretrained(..., weight_quantization=mode) does once the weights are loaded. The token
        embedding keeps its dtype. Returns the model. release_mapped_pages: see `quantize_linear_layers`."""
        if self._has_quantized_layers():
            raise ValueError(f"the model is already quantized ({self.config.weight_quantization})")
        quantize_linear_layers(self, mode, release_mapped_pages)
        if release_mapped_pages:
            # The few tensors left (embedding, LayerNorm weights) get memory of their own, so that nothing holds
            # on to the mapped checkpoint any more and its mapping is released. The quantized layers' tensors were
            # made by quantizing: copying them would only cost time and memory.
            with torch.no_grad():
                for module in self.modules():
                    if isinstance(module, QuantizedLinear):
                        continue
                    for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
                        tensor.data = tensor.data.clone()
        self.config.weight_quantization = mode
        return self

    def _apply(self, fn, *args, **kwargs):
        # Checked here, before any submodule moves, so that a refused move leaves the whole model where it was.
        if self._has_quantized_layers():
            refuse_moving_quantized(fn)
        return super()._apply(fn, *args, **kwargs)

    def _has_quantized_layers(self) -> bool:
        return any(isinstance(module, QuantizedLinear) for module in self.modules())

    def save_pretrained(self, *args, **kwargs):
        if self._has_quantized_layers():
            mode = self.config.weight_quantization
            raise NotImplementedError(
                f"this model's Linear layers are quantized to {mode}, and quantized weights cannot be saved: save "
                f"the original checkpoint instead, and load it with weight_quantization={mode!r}"
            )
        return super().save_pretrained(*args, **kwargs)

    def resize_token_embeddings(self, *args, **kwargs):
        # Checked first: transformers resized the embedding, then failed on the quantized LM head, leaving the two
        # tied weights of different sizes.
        if self._has_quantized_layers():
            raise NotImplementedError(
                f"this model's Linear layers are quantized to {self.config.weight_quantization}, and the LM head "
                "cannot be resized: resize the unquantized model, save it, and load that with weight_quantization"
            )
        return super().resize_token_embeddings(*args, **kwargs)

    def _init_weights(self, module: nn.Module):
        """The original recipe: `param_init_fn` (kaiming-normal, fan-in) on every matrix, the residual output
        projections scaled down by sqrt(2 * n_layers), LayerNorm weights one."""
        config = self.config
        if isinstance(module, nn.Linear):
            # The layers mark themselves: a shape can match another layer's (mlp_ratio=3 makes up_proj as wide as Wqkv).
            fused = getattr(module, "fused_matrices", 1)
            residual = getattr(module, "residual_projection", False)
            self._init_matrix(module.weight, fused, residual and config.init_div_is_residual)
        elif isinstance(module, nn.Embedding):
            if config.emb_init_std is not None:
                init.normal_(module.weight, mean=0.0, std=config.emb_init_std)
            elif config.emb_init_uniform_lim is not None:
                lim = config.emb_init_uniform_lim
                low, high = (-lim, lim) if isinstance(lim, (int, float)) else lim
                init.uniform_(module.weight, low, high)
            else:
                self._init_matrix(module.weight, fused=1, residual=False)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)

    def _init_matrix(self, weight: torch.Tensor, fused: int, residual: bool):
        config = self.config
        if config.param_init_fn == "normal_":
            std = config.init_std
        else:
            # Wqkv is three matrices side by side; the original initialised each on its own fan.
            fan = weight.shape[1] if config.fan_mode == "fan_in" else weight.shape[0] // fused
            std = nn.init.calculate_gain(config.init_nonlinearity, config.init_gain) / math.sqrt(fan)
        if residual:
            std /= math.sqrt(2 * config.n_layers)
        if config.param_init_fn == "kaiming_uniform_":
            bound = math.sqrt(3.0) * std
            init.uniform_(weight, -bound, bound)
        else:
            init.normal_(weight, mean=0.0, std=std)


def float_ids_to_long(input_ids: torch.Tensor) -> torch.LongTensor:
    """Token ids that came as floats (the card's snippet casts them to bfloat16 with the model), as int64 where that
    is surely what they were: whole numbers below the range in which the float type holds every integer exactly
    (256 for bfloat16, 2048 for float16); a larger one may be an id rounded to its neighbour."""
    exact_below = int(2 / torch.finfo(input_ids.dtype).eps)
    if input_ids.numel():
        fractional = input_ids != input_ids.round()
        if bool(fractional.any()):
            raise ValueError(f"input_ids must be token ids (integers), got {input_ids[fractional][0].item()}")
        if bool((input_ids.abs() >= exact_below).any()):
            raise ValueError(
                f"input_ids are {input_ids.dtype}, which cannot hold ids of {exact_below} and above exactly (got "
                f"{input_ids.abs().max().item():.0f}, which may be a rounded id): pass them as torch.long"
            )
    return input_ids.long()


def check_token_labels(labels, name: str, shape: torch.Size):
    """A TypeError or ValueError naming `name` (labels or shift_labels) unless it is a tensor of integer token ids of
    `shape`: cross_entropy would fail on other types or shapes, and .long() would silently round fractions."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (batch, seq_len), got {type(labels).__name__}")
    if labels.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{name} must be token ids (an integer tensor), got {labels.dtype}")


def neither_zero_nor_one(mask: torch.Tensor) -> torch.Tensor:
    return (mask != 0) & (mask != 1)


class ReplitLMModel(ReplitLMPreTrainedModel):
    def __init__(self, config: ReplitLMConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.emb_drop = nn.Dropout(config.emb_pdrop)
        self.blocks = nn.ModuleList(ReplitBlock(config, i) for i in range(config.n_layers))
        self.norm_f = LayerNorm(config.d_model, config.layer_norm_epsilon, config.low_precision_layernorm)
        # Derived from the config, so neither saved nor a buffer: model.to(bfloat16) would round slopes such as
        # 2**-0.25, and transformers 5 leaves buffers unset when it loads on the meta device.
        self._slopes = alibi_slopes(config.n_heads, config.alibi_bias_max)  # (heads,) float32
        self._alibi = alibi_bias_table(self._slopes, config.max_seq_len)  # (heads, max_seq_len) float32
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, new_embeddings):
        self.wte = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ):
        past_key_values = cache_argument(past_key_values, kwargs)
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        # Checkpointing replays layers in the backward pass, which a cache would not survive; without gradients
        # (generating from a model in training mode) there is no backward, and generate needs its cache.
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            use_cache, past_key_values = False, None

        x = self._embed(input_ids, inputs_embeds)  # (batch, q_len, d_model)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        if past_key_values is not None and not isinstance(past_key_values, Cache):
            raise ValueError(
                "past_key_values must be a transformers Cache (e.g. DynamicCache), not "
                f"{type(past_key_values).__name__}; tuple caches are no longer supported"
            )
        cache_position = kwargs.get("cache_position")  # the new tokens' positions, from transformers 4.x generate
        if past_key_values is None:
            past_len = 0
        elif cache_position is not None:
            past_len = int(cache_position[0])
        else:
            past_len = int(past_key_values.get_seq_length())
        if past_key_values is not None:
            check_cache_takes(past_key_values, x.shape[0], past_len, x.shape[1])
        mask = self._attention_mask(x, past_len, attention_mask, output_attentions, kwargs.get("position_ids"))
        if past_key_values is not None:
            mask.cache_position = torch.arange(past_len, mask.kv_len, device=x.device)

        all_hidden_states = () if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for block in self.blocks:
            if output_hidden_states:
                all_hidden_states += (x,)
            x, weights = block(x, mask, layer_past=past_key_values, output_attentions=output_attentions)
            if output_attentions:
                all_attentions += (weights,)
        x = self.norm_f(x)
        if output_hidden_states:
            all_hidden_states += (x,)

        cache = past_key_values if use_cache else None
        if not return_dict:
            return tuple(v for v in (x, cache, all_hidden_states, all_attentions) if v is not None)
        return BaseModelOutputWithPast(
            last_hidden_state=x, hidden_states=all_hidden_states, attentions=all_attentions, **{CACHE_FIELD: cache}
        )

    def _embed(self, input_ids, inputs_embeds) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds")
        for name, value in (("input_ids", input_ids), ("inputs_embeds", inputs_embeds)):
            if value is not None and not isinstance(value, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor of shape (batch, seq_len), got {type(value).__name__}")
        if inputs_embeds is None:
            if input_ids.is_floating_point():
                input_ids = float_ids_to_long(input_ids)
            elif input_ids.dtype == torch.bool or input_ids.is_complex():
                raise ValueError(f"input_ids must be token ids (an integer tensor), got {input_ids.dtype}")
            elif input_ids.dtype not in (torch.int64, torch.int32):
                # The embedding takes these two only, and in (u)int8 vocab_size itself wraps in the check below.
                input_ids = input_ids.long()
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
            if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size):
                bad = input_ids[(input_ids < 0) | (input_ids >= self.config.vocab_size)][0].item()
                raise ValueError(f"input_ids contains {bad}, outside the vocabulary [0, {self.config.vocab_size})")
            inputs_embeds = self.wte(input_ids)
        elif inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.d_model:
            raise ValueError(
                f"inputs_embeds must be (batch, seq_len, {self.config.d_model}), got {tuple(inputs_embeds.shape)}"
            )
        elif inputs_embeds.dtype != self.wte.weight.dtype and not torch.is_autocast_enabled(inputs_embeds.device.type):
            raise ValueError(
                f"inputs_embeds are {inputs_embeds.dtype} and the model is {self.wte.weight.dtype}: pass "
                f"inputs_embeds.to({self.wte.weight.dtype})"
            )
        if inputs_embeds.shape[0] == 0 or inputs_embeds.shape[1] == 0:
            raise ValueError(f"empty input: got shape {tuple(inputs_embeds.shape[:2])} (batch, seq_len)")
        fraction = self.config.embedding_fraction
        if fraction != 1.0:
            # Scales the embedding's gradient, not its value (the original's stabiliser for large models).
            inputs_embeds = inputs_embeds * fraction + inputs_embeds.detach() * (1 - fraction)
        return self.emb_drop(inputs_embeds)

    def _attention_mask(
        self, x, past_len: int, attention_mask, output_attentions: bool, position_ids=None
    ) -> AttentionMask:
        batch, q_len = x.shape[:2]
        kv_len = past_len + q_len
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor):
                raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
            if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, kv_len):
                raise ValueError(
                    f"attention_mask must have shape (batch, past + new tokens) = {(batch, kv_len)}, "
                    f"got {tuple(attention_mask.shape)}"
                )
            if attention_mask.dtype == torch.bool:
                all_real = bool(attention_mask.all())
            else:
                # One pass over the mask at every decoding step: integers between 0 and 1 are 0 and 1.
                low, high = (value.item() for value in torch.aminmax(attention_mask))
                valid = 0 <= low <= high <= 1  # False for NaN
                if valid and attention_mask.is_floating_point():  # a float mask, rare: value by value
                    valid = not bool(neither_zero_nor_one(attention_mask).any())
                if not valid:
                    bad = attention_mask[neither_zero_nor_one(attention_mask)][0].item()
                    raise ValueError(
                        f"attention_mask must hold 1 (a token) and 0 (padding), got {bad} (an additive mask of 0 and "
                        "-inf is not taken)"
                    )
                all_real = low == 1
            if all_real:
                attention_mask = None
        if position_ids is not None:
            # Positions of other tokens than these would mark other tokens as the starts of packed sequences: an
            # IndexError deep in the unpacking, or sequences silently cut elsewhere; a list was silently ignored.
            if not isinstance(position_ids, torch.Tensor):
                raise TypeError(f"position_ids must be a torch.Tensor, got {type(position_ids).__name__}")
            shape = tuple(position_ids.shape)
            if len(shape) not in (1, 2) or shape[-1] != q_len or (len(shape) == 2 and shape[0] not in (1, batch)):
                raise ValueError(
                    f"position_ids must have shape (batch, new tokens) = {(batch, q_len)} or (1, {q_len}), got {shape}"
                )
        sequences = packed_sequences(position_ids, attention_mask)
        if sequences is not None and past_len:
            raise ValueError(
                "position_ids restart at 0 (sequences packed into one row) after a cache's past: packing is for "
                "whole sequences at once; continue each sequence in a row of its own"
            )
        # A row may pack more tokens than max_seq_len; each of its sequences is held to it.
        longest, unpacking = kv_len, None
        if sequences is not None:
            # Measured on the real tokens: padding after a row's last sequence (or before its first) carries on its
            # sequence number without belonging to it, and counting it refused rows whose sequences all fit.
            real = x.new_ones(batch, q_len, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
            unpacking = Unpacking.of(sequences.expand(batch, -1), real)
            longest = unpacking.filled.shape[1]
        if longest > self.config.max_seq_len:
            raise ValueError(
                f"sequence length {longest} exceeds max_seq_len={self.config.max_seq_len}; pass max_seq_len=... to "
                "from_pretrained to let ALiBi extrapolate to longer sequences"
            )
        if self._slopes.device != x.device:
            self._slopes = self._slopes.to(x.device)
        if self._alibi.device != x.device or self._alibi.shape[1] < kv_len:  # moved, or max_seq_len was raised
            self._alibi = alibi_bias_table(self._slopes, max(kv_len, self.config.max_seq_len))
        backend = attention_backend(self.config)
        dropout_p = self.config.attn_pdrop if self.training else 0.0
        if backend == "sdpa" and native_decode_pays(x, self.config.n_heads, output_attentions, dropout_p):
            backend = "native_decode"
        if unpacking is not None and not output_attentions:
            length = unpacking.filled.shape[1]
            filled = None if bool(unpacking.filled.all()) else unpacking.filled
            unpacking.mask = self._backend_mask(backend, length, length, filled, False, x.dtype)
            return AttentionMask(q_len=q_len, kv_len=kv_len, slopes=self._slopes, backend=backend, unpacking=unpacking)
        return self._backend_mask(backend, q_len, kv_len, attention_mask, output_attentions, x.dtype, sequences)

    def _backend_mask(self, backend, q_len, kv_len, attention_mask, output_attentions, dtype, sequences=None):
        """The AttentionMask of `backend` for q_len queries over kv_len keys; `sequences`: see `additive_bias`."""
        mask = AttentionMask(q_len=q_len, kv_len=kv_len, slopes=self._slopes, backend=backend)
        if backend == "triton":
            if attention_mask is not None:
                mask.kv_start, mask.kv_end = key_ranges(attention_mask)
        else:
            dtype = torch.float32 if backend == "native_decode" else dtype  # the kernel adds in float32
            blocks = backend == "sdpa" and not output_attentions and attends_in_blocks(q_len, self._slopes.device)
            if blocks and attention_mask is not None:  # the blocks hide the padding themselves (AttentionMask.padding)
                mask.padding = ~attention_mask.bool()[:, None, None, :]
                attention_mask = None
            mask.additive = additive_bias(mask, attention_mask, dtype, self._alibi, sequences)
        return mask


class ReplitLM(ReplitLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = TIED_WEIGHTS_KEYS

    def __init__(self, config: ReplitLMConfig):
        super().__init__(config)
        # transformers finds the loss by the class name, which names none here. Trainer reads it too: a causal LM
        # loss counts the targets of labels[:, 1:] in num_items_in_batch.
        self.loss_type = "ForCausalLM"
        self.transformer = ReplitLMModel(config)
        self.lm_head = RoutedLinear(config.d_model, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, new_embeddings):
        self.transformer.wte = new_embeddings

    def get_output_embeddings(self):
        return self.lm_head

    def generate(self, *args, **kwargs):
        """GenerationMixin.generate with a preallocated KV cache by default (cache_implementation="static").

        transformers' default DynamicCache concatenates each layer's keys and values at every step, a copy that
        grows with the sequence; the static cache writes in place. A cache, cache_implementation or
        generation_config that the caller passes is used as given.

        A static cache returned by an earlier call (return_dict_in_generate=True) holds that call's length only; to
        continue from it, it is copied into one with room for this call.

        Raises before any work where the prompt and the new tokens would not fit in config.max_seq_len, or where a
        row of the prompt holds no token (all padding)."""
        config = kwargs.get("generation_config") or self.generation_config
        prompt = args[0] if args else kwargs.get("inputs", kwargs.get("input_ids"))
        if prompt is None:
            prompt = kwargs.get("inputs_embeds")
        if isinstance(prompt, torch.Tensor) and prompt.dim() == 1:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(prompt.shape)}: pass ids[None]")
        total = self._check_generation_length(prompt, kwargs, config)
        self._check_no_row_is_all_padding(prompt, kwargs, config)
        cache_keyword = "cache" if kwargs.get("cache") is not None else "past_key_values"
        given = kwargs.get(cache_keyword)
        if given is None:
            forget_generation_cache(self)
        elif isinstance(given, StaticCache) and total is not None and total > given.layers[0].max_cache_len:
            kwargs[cache_keyword] = static_cache_with_room(given, total, self.config)
        if (
            config.cache_implementation is None
            and kwargs.get("cache_implementation") is None
            and kwargs.get("past_key_values") is None
            and kwargs.get("cache") is None
            and self._generation_uses_cache(kwargs.get("use_cache"), config)
            and kwargs.get("assistant_model") is None  # assisted decoding rolls back its cache: dynamic only
            and kwargs.get("prompt_lookup_num_tokens", config.prompt_lookup_num_tokens) is None
            # As the assistant (draft model) of assisted decoding, generate is called once per drafting round with
            # the cache of the last round, which grows past what a static cache sized for one round holds.
            and not getattr(config, "is_assistant", False)
        ):
            if kwargs.get("generation_config") is not None:
                # transformers 5 warns when a generation_config comes with generation arguments: set it there.
                kwargs["generation_config"] = copy.deepcopy(config)
                kwargs["generation_config"].cache_implementation = "static"
            else:
                kwargs["cache_implementation"] = "static"
        return super().generate(*args, **kwargs)

    @staticmethod
    def _check_no_row_is_all_padding(prompt, kwargs, config):
        """A row with no token would be continued from nothing. Without an attention_mask, generate makes one from
        pad_token_id where the prompt holds it and it is not an end-of-text id: the same check on that mask."""
        mask = kwargs.get("attention_mask")
        pad, eos = kwargs.get("pad_token_id", config.pad_token_id), kwargs.get("eos_token_id", config.eos_token_id)
        eos = eos if isinstance(eos, (list, tuple)) else [eos]
        if mask is None and isinstance(prompt, torch.Tensor) and prompt.dim() == 2 and not prompt.is_floating_point():
            if pad is not None and pad not in eos:
                mask = prompt != pad
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1]:
            empty = (~mask.bool().any(dim=1)).nonzero()
            if len(empty):
                source = "attention_mask" if kwargs.get("attention_mask") is not None else f"input_ids (pad {pad})"
                raise ValueError(f"row {int(empty[0])} of {source} is all padding: no prompt to continue")

    def _check_generation_length(self, prompt, kwargs, config):
        # As transformers resolves them: an argument overrides the generation config's field, and max_new_tokens
        # from either one overrides max_length.
        max_new_tokens = kwargs.get("max_new_tokens", config.max_new_tokens)
        max_length = kwargs.get("max_length", None if config.max_length == UNSET_MAX_LENGTH else config.max_length)
        for name, value in (("max_new_tokens", max_new_tokens), ("max_length", max_length)):
            # transformers sizes the static cache with them: 2.5 failed deep in torch.zeros, and transformers 5 keeps
            # that size on the model for the next calls, so that every later generate failed the same way.
            if value is not None and (isinstance(value, bool) or not hasattr(value, "__index__")):
                raise ValueError(f"{name} must be a whole number of tokens, got {value!r}")
        if not isinstance(prompt, torch.Tensor) or prompt.dim() < 2:
            return None
        if max_new_tokens is not None:
            total, asked = prompt.shape[1] + max_new_tokens, f"max_new_tokens={max_new_tokens}"
        elif max_length is not None:
            total, asked = max_length, f"max_length={max_length}"
        else:  # transformers' default: 20 new tokens, stopping at max_position_embeddings (max_seq_len)
            total, asked = prompt.shape[1], "no max_new_tokens"
        if total > self.config.max_seq_len:
            raise ValueError(
                f"a prompt of {prompt.shape[1]} tokens with {asked} reaches {total} tokens, past max_seq_len="
                f"{self.config.max_seq_len}; ask for fewer tokens, or pass max_seq_len=... to from_pretrained to let "
                "ALiBi extrapolate to longer sequences"
            )
        if max_new_tokens is None and max_length is None:
            total = min(total + DEFAULT_NEW_TOKENS, self.config.max_seq_len)
        lookup = kwargs.get("prompt_lookup_num_tokens", config.prompt_lookup_num_tokens)
        # Prompt lookup decoding verifies its candidates past the last position asked for (transformers bounds
        # them by max_length as an index into the sequence, not as a length).
        if lookup and total - 1 + lookup > self.config.max_seq_len:
            raise ValueError(
                f"prompt lookup decoding checks up to prompt_lookup_num_tokens={lookup} tokens ahead, so a prompt of "
                f"{prompt.shape[1]} tokens with {asked} can reach {total - 1 + lookup} tokens, past max_seq_len="
                f"{self.config.max_seq_len}; ask for fewer new tokens or a smaller prompt_lookup_num_tokens"
            )
        return total

    def _generation_uses_cache(self, use_cache: bool | None, config) -> bool:
        """Whether generate will use a cache: the argument, else the generation config's field, else the model's
        (transformers 5 leaves the field unset, None, in a new GenerationConfig and fills it from the model's)."""
        for value in (use_cache, config.use_cache, self.generation_config.use_cache):
            if value is not None:
                return value
        return True

    def _valid_auto_compile_criteria(self, model_kwargs, generation_config) -> bool:
        """generate would torch.compile the forward on a GPU whenever the cache is static (our default): dynamo
        cannot trace the Triton kernel's launcher, and the compiled torch path has not been measured to pay. So
        the forward is compiled only when a compile_config asks for it."""
        if generation_config.compile_config is None:
            return False
        return super()._valid_auto_compile_criteria(model_kwargs, generation_config)

    def create_masks_for_generate(self, *args, attention_mask: torch.Tensor | None = None, **kwargs):
        """For a preallocated (static) cache, generate would turn the (batch, kv_len) padding mask into a 4D causal
        mask over the whole cache; this model builds its masking itself from the 2D mask, so it keeps it."""
        return attention_mask

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def _loss(
        self,
        logits,
        labels,
        attention_mask,
        shift_labels=None,
        num_items_in_batch=None,
        ignore_index=-100,
        position_ids=None,
        **kwargs,
    ):
        """transformers' causal LM loss (self.loss_function) on the targets of each position."""
        real = None if attention_mask is None else attention_mask[:, -labels.shape[1] :].bool().to(labels.device)
        given = "labels" if shift_labels is None else "shift_labels"  # where the targets come from, for errors
        counted = labels_trainer_counts(labels) if shift_labels is None else shift_labels
        if shift_labels is None:
            shift_labels = F.pad(labels[:, 1:], (0, 1), value=ignore_index)
            if real is not None:
                # A padding token is never a target: with right padding and labels=input_ids, the last real token
                # would otherwise be trained to predict a pad.
                shift_labels = shift_labels.masked_fill(~F.pad(real[:, 1:], (0, 1), value=True), ignore_index)
            sequences = packed_sequences(position_ids, attention_mask)
            if sequences is not None:
                # Packed rows: a sequence's last token does not predict the next sequence's first (the collator
                # labels that one -100; packing by hand may not).
                ends = F.pad(sequences[:, 1:] != sequences[:, :-1], (0, 1), value=False)
                shift_labels = shift_labels.masked_fill(ends.to(shift_labels.device), ignore_index)
        else:
            check_token_labels(shift_labels, "shift_labels", labels.shape)
        if real is not None:
            # A padding position predicts nothing: with left padding it would otherwise be asked for the first real
            # token, from a position that saw no token at all.
            shift_labels = shift_labels.masked_fill(~real, ignore_index)
        if num_items_in_batch is not None:
            # Trainer's num_items_in_batch counts the entries of counted that are not ignore_index; padding took some
            # of those away here (pad tokens left as labels, the first token after left padding), and 4.x counts
            # the first position of every row besides. Scaled by this batch's share, so that the loss stays the mean
            # over real targets: exactly for one batch, and for accumulated ones as far as their padding is alike.
            kept = (shift_labels != ignore_index).sum()
            # At least 1: a batch left without targets (all its labels on padding) has a loss of 0, not 0 / 0.
            num_items_in_batch = (num_items_in_batch * kept / (counted != ignore_index).sum().clamp(min=1)).clamp(min=1)
        outside = (shift_labels != ignore_index) & ((shift_labels < 0) | (shift_labels >= self.config.vocab_size))
        if bool(outside.any()):
            raise ValueError(
                f"{given} contains {shift_labels[outside][0].item()}, outside the vocabulary [0, "
                f"{self.config.vocab_size}) (use {ignore_index} for positions without a target)"
            )
        return self.loss_function(
            logits,
            labels,
            self.config.vocab_size,
            shift_labels=shift_labels.long(),
            num_items_in_batch=num_items_in_batch,
            ignore_index=ignore_index,
        )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ):
        """labels: (batch, seq_len) token ids, -100 where no loss is taken; shifted inside, as usual. Positions that
            attention_mask marks as padding predict nothing.
        logits_to_keep: compute logits for the last N positions only (0: all), or for the given positions.
        kwargs: also transformers' loss arguments: shift_labels (targets already shifted, which then replace the
            shifted labels), num_items_in_batch (the loss is the sum over that many targets, as transformers'
            Trainer asks for with gradient accumulation; where padding takes away targets that Trainer counted, the
            count is scaled by this batch's share) and ignore_index."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if labels is not None and self.training and torch.is_grad_enabled() and self._has_quantized_layers():
            # The quantized layers compute no gradient: backward would fail deep in autograd (no grad_fn).
            raise NotImplementedError(
                f"this model's Linear layers are quantized to {self.config.weight_quantization}, for inference only: "
                "train (or fine-tune with LoRA) the model loaded without weight_quantization"
            )
        outputs = self.transformer(
            input_ids=input_ids,
            past_key_values=cache_argument(past_key_values, kwargs),
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            cache_position=kwargs.get("cache_position"),
            position_ids=kwargs.get("position_ids"),
        )
        hidden = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])  # (batch, kept positions, vocab)
        if self.config.logit_scale is not None:
            scale = self.config.logit_scale
            logits = logits * (1 / math.sqrt(self.config.d_model) if scale == "inv_sqrt_d_model" else scale)

        loss = None
        if labels is not None:
            check_token_labels(labels, "labels", hidden.shape[:2])
            if logits.shape[1] != labels.shape[1]:
                raise ValueError("labels need the logits of every position: do not combine them with logits_to_keep")
            loss = self._loss(logits, labels.long(), attention_mask, **kwargs)  # cross_entropy takes int64 targets

        cache = getattr(outputs, CACHE_FIELD)
        if not return_dict:
            rest = tuple(v for v in (cache, outputs.hidden_states, outputs.attentions) if v is not None)
            return ((loss,) if loss is not None else ()) + (logits,) + rest
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE_FIELD: cache},
        )
