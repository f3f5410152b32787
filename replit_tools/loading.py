"""Loading a model folder for the tools: one path for the command line, the server and the evaluation.

A folder laid out like the Hub repository, a downloaded snapshot of replit/replit-code-v1-3b as it is (either config
schema; its own code files are never run: this repository's classes load it), or a Hub id when the Hub is reachable.
"""

import argparse
import json
import re
import sys
from pathlib import Path

import torch
import transformers
from huggingface_hub.utils import logging as hub_logging

from . import DEMO_MODEL
from .completion import Completer
from .options import DTYPE_NAMES, CompletionError, one_line
from replit_lm.configuration_replit_lm import ReplitLMConfig
from replit_lm.modeling_replit_lm import ReplitLM
from replit_lm.quantization import measure_routes
from replit_lm.replit_lm_tokenizer import ReplitLMTokenizer
from replit_lm.triton_flash_attn import triton_available_for

# A Hub id (owner/name), tried on the Hub when no such local folder exists.
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
FOLDER_JSON_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json")


def model_source(model: str | Path) -> Path | str:
    """A local model folder, checked to hold a model, or a Hub id to load from the Hub (or its local cache)."""
    path = Path(model).expanduser()
    if path.is_dir():
        for required in ("config.json", "spiece.model"):
            if not (path / required).is_file():
                raise CompletionError(f"{model} is not a model folder: it has no {required}")
        # Read here, so that a broken file is named: the tokenizer's loader says only where in the file JSON failed,
        # and generation_config.json would be skipped without a word.
        for name in FOLDER_JSON_FILES:
            if (path / name).is_file():
                try:
                    content = json.loads((path / name).read_text(encoding="utf-8"))
                except ValueError as error:
                    raise CompletionError(f"{path / name} is not valid JSON: {one_line(error)}") from error
                if not isinstance(content, dict):
                    raise CompletionError(f"{path / name} is not a JSON object: {type(content).__name__}")
        return path
    if path.exists():
        raise CompletionError(f"the model must be a folder: {model}")
    if path == DEMO_MODEL:
        raise CompletionError(f"the demo model is missing: {DEMO_MODEL} (python -m replit_tools.demo builds it)")
    # models/replit where models/ is a folder here is a path with a typo, not a Hub id: answered now, not after the
    # Hub has been tried (half a minute without a network).
    if not HUB_ID.fullmatch(str(model)) or path.parent.is_dir():
        raise CompletionError(f"model folder not found: {model}")
    return str(model)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise CompletionError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps") from error
    if resolved.type not in ("cpu", "cuda", "mps"):
        raise CompletionError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise CompletionError(f"device {device!r} asked for, but CUDA is not available here")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise CompletionError(f"device {device!r} asked for, but MPS is not available here")
    return resolved


def load_model(source: Path | str, dtype: torch.dtype | None = None, **config_fields) -> ReplitLM:
    """ReplitLM.from_pretrained(source) in `dtype`, with `config_fields` overriding config.json's. A config.json that
    does not describe this model is refused naming the file; so is a checkpoint whose tensors are not the configured
    model's: transformers fills a missing tensor with random values and only logs it (the tools silence its logs),
    and names no tensor when shapes differ."""
    try:
        config = ReplitLMConfig.from_pretrained(source, **config_fields)
    except (ValueError, TypeError, AttributeError, KeyError) as error:  # a value, or a file that is no dict
        raise CompletionError(f"{Path(source, 'config.json')}: {one_line(error)}") from error
    dtype = {} if dtype is None else {"dtype": dtype}
    model, info = ReplitLM.from_pretrained(
        source, config=config, output_loading_info=True, ignore_mismatched_sizes=True, **dtype
    )
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()  # the embedding, not a tensor of its own
    problems = [f"{name} is missing" for name in sorted(set(info["missing_keys"]) - tied)]
    problems += [f"{name} is not a tensor of this model" for name in sorted(info["unexpected_keys"])]
    for mismatch in sorted(info["mismatched_keys"]):  # transformers 5: (name, checkpoint shape, model shape)
        name, *shapes = mismatch if isinstance(mismatch, tuple) else (mismatch,)
        found = f"{tuple(shapes[0])} in the checkpoint, " if shapes else ""
        expected = tuple(model.get_parameter(name).shape)
        problems.append(f"{name} is {found}{expected} for config.json")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CompletionError(f"{source}: the weights do not fit config.json: {problems[0]}{more}")
    return model


def load_model_and_tokenizer(source: Path | str, dtype: torch.dtype | None = None, **config_fields):
    """(`load_model`'s model, the folder's ReplitLMTokenizer); a CompletionError where the tokenizer has more tokens
    than the model: another model's spiece.model, whose ids past the vocabulary failed inside the model and whose
    others were other tokens to it, completed without a word into text that meant nothing."""
    model = load_model(source, dtype, **config_fields)
    tokenizer = ReplitLMTokenizer.from_pretrained(source)
    if len(tokenizer) > model.config.vocab_size:
        raise CompletionError(
            f"{source}: spiece.model has {len(tokenizer)} tokens, more than the model's vocab_size of "
            f"{model.config.vocab_size}: it is not this model's tokenizer"
        )
    return model, tokenizer


def load_completer(
    model: str | Path = DEMO_MODEL,
    device: str = "auto",
    dtype: str = "auto",
    attn_impl: str | None = None,
    weight_quantization: str | None = None,
) -> Completer:
    """Load a model folder (or Hub id) with this repository's classes, whatever code and auto_map it ships."""
    source = model_source(model)
    torch_device = resolve_device(device)
    if dtype == "auto":
        dtype = "bfloat16" if torch_device.type == "cuda" else "float32"
    # Config fields given to from_pretrained override config.json (None: keep the folder's).
    overrides = {"attn_impl": attn_impl, "weight_quantization": weight_quantization}
    overrides = {name: value for name, value in overrides.items() if value is not None}
    # Our classes read the folder's config.json (ReplitLMConfig takes the published MPT schema and the May 2023
    # release schema alike) and spiece.model; the code files and auto_map of a snapshot are never consulted.
    try:
        loaded, tokenizer = load_model_and_tokenizer(source, dtype=DTYPES[dtype], **overrides)
    except OSError as error:
        if isinstance(source, Path):
            raise
        message = f"model folder not found: {model} (nor on the Hugging Face Hub: {one_line(error)})"
        raise CompletionError(message) from error
    if loaded.config.attn_impl == "triton":  # refused now, not at every request (a server would start regardless)
        try:
            triton_available_for(torch.empty(0, device=torch_device))
        except (ImportError, RuntimeError) as error:
            raise CompletionError(one_line(error)) from error
    loaded = loaded.to(torch_device).eval()
    if torch_device.type == "cpu":
        measure_routes(loaded)  # part of loading: the first completion then runs at full speed
    return Completer(loaded, tokenizer)


def load_from_arguments(args: argparse.Namespace) -> Completer:
    return load_completer(args.model, args.device, args.dtype, args.attn_impl, args.weight_quantization)


def run_quietly(function, args: argparse.Namespace):
    """function(args) with the libraries quiet (`quiet_libraries`); None, after one line on standard error, where it
    fails: as generate.py, serve.py and export.py, a failure is one line for the user, never a traceback."""
    quiet_libraries()
    try:
        return function(args)
    except Exception as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return None


def quiet_libraries():
    """Only errors from transformers and the Hub client: no progress bars, no retry or deprecation warnings."""
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    hub_logging.set_verbosity_error()
