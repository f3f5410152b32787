"""Code completion from the command line with replit-code-v1-3b.

    python generate.py "def fibonacci(n):"                   # the embedded demo model (demo/ beside this file)
    python generate.py --model ~/replit-code-v1-3b --greedy --max-new-tokens 64 "def fibonacci(n):"
    python generate.py --file snippet.py --stream            # a prompt from a file; --file - reads stdin
    python generate.py --json "import os" "def main():"      # several prompts, one batch, machine-readable

`--model` takes a folder laid out like the Hub repository, a downloaded Hub snapshot of replit/replit-code-v1-3b as
it is (either config schema; its own code files are ignored: this repository's classes load it), or a Hub id when
the Hub is reachable. The model card's settings are the defaults and its post-processing (postprocessing.py) is
applied. serve.py serves the same completions over HTTP with the `Completer` of this module.
"""

import argparse
import json
import re
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import transformers
from huggingface_hub.utils import logging as hub_logging
from transformers import GenerationConfig, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

import replit_lm_package
from postprocessing import (
    DEFAULT_STOP_SEQUENCES,
    FinishedCompletion,
    StopSequenceCriteria,
    StreamingPostprocessor,
    completion_ids,
    decode,
    finish_completion,
)
from replit_lm.modeling_replit_lm import ReplitLM
from replit_lm.replit_lm_tokenizer import ReplitLMTokenizer

DEMO_MODEL = replit_lm_package.ROOT / "demo"
# A Hub id (owner/name), tried on the Hub when no such local folder exists.
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CompletionError(Exception):
    """A request that cannot be served as given; the message tells the user what to change."""


@dataclass(frozen=True)
class Settings:
    """How to complete: the model card's sampling settings by default. A temperature of 0 means greedy."""

    max_new_tokens: int = 128
    greedy: bool = False
    temperature: float = 0.2
    top_p: float = 0.95
    top_k: int = 4
    num_completions: int = 1
    stop_sequences: tuple[str, ...] = DEFAULT_STOP_SEQUENCES
    seed: int | None = None

    def __post_init__(self):
        checks = (
            (self.max_new_tokens >= 1, "max new tokens must be at least 1"),
            (self.num_completions >= 1, "the number of completions must be at least 1"),
            (self.temperature >= 0, "temperature must be 0 (greedy) or more"),
            (0 < self.top_p <= 1, "top-p must be in (0, 1]"),
            (self.top_k >= 0, "top-k must be 0 (no top-k filtering) or more"),
            (all(self.stop_sequences), "a stop sequence cannot be empty"),
        )
        for passed, message in checks:
            if not passed:
                raise CompletionError(message)

    @property
    def do_sample(self) -> bool:
        return not self.greedy and self.temperature > 0

    def generation_config(self, tokenizer) -> GenerationConfig:
        sampling = dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k) if self.do_sample else {}
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=self.do_sample,
            # Greedy completions of a prompt are all the same: one is computed.
            num_return_sequences=self.num_completions if self.do_sample else 1,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            # Published snapshots say use_cache=false, a leftover of training; generation needs the cache.
            use_cache=True,
            **sampling,
        )


@dataclass(frozen=True)
class Completion(FinishedCompletion):
    prompt_index: int
    index: int  # which of the prompt's completions
    prompt_tokens: int


def reject_empty(prompts: list[str]):
    """Raise CompletionError unless there are prompts and each has some code."""
    if not prompts:
        raise CompletionError("no prompt: give PROMPT, --file PATH, or --file - to read standard input")
    for number, prompt in enumerate(prompts, start=1):
        if not prompt.strip():
            which = "the prompt" if len(prompts) == 1 else f"prompt {number}"
            raise CompletionError(f"{which} is empty or only whitespace: give the code to complete")


@dataclass
class _Prompts:
    """Prompts tokenized as one left-padded batch."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    texts: list[str]  # the prompts as the tokenizer gives them back: what the stop rules read before a completion
    lengths: list[int]  # tokens in each prompt


class StreamListener:
    """Receives streamed completions, one after the other; override what you need."""

    def begin(self, prompt_index: int, index: int):
        pass

    def text(self, piece: str):
        pass

    def end(self, completion: Completion):
        pass


class _PostprocessedStreamer(BaseStreamer):
    """A transformers streamer (batch of one) that passes on the text post-processing lets through, as it is
    generated. The whole completion is decoded at each step, so spaces and newlines come out exactly."""

    def __init__(self, tokenizer, postprocessor: StreamingPostprocessor, on_text):
        self.tokenizer = tokenizer
        self.postprocessor = postprocessor
        self.on_text = on_text
        self.generated_ids = None  # the first put() is the prompt

    def put(self, value: torch.Tensor):
        if self.generated_ids is None:
            self.generated_ids = []
            return
        self.generated_ids.extend(value.reshape(-1).tolist())
        text = decode(self.tokenizer, completion_ids(self.tokenizer, self.generated_ids))
        piece = self.postprocessor.update(text)
        if piece:
            self.on_text(piece)

    def end(self):
        pass


class Completer:
    """A model and its tokenizer, completing prompts with the model card's post-processing."""

    def __init__(self, model: ReplitLM, tokenizer: ReplitLMTokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"  # batched prompts must end where generation starts

    @property
    def context_length(self) -> int:
        return self.model.config.max_seq_len

    def complete(self, prompts: list[str], settings: Settings) -> list[Completion]:
        """Every prompt completed `settings.num_completions` times, in one batch; prompt by prompt."""
        self._seed(settings)
        batch = self._encode(prompts, settings)
        sequences = self._generate(batch, settings)
        rows_per_prompt = len(sequences) // len(prompts)
        completions = []
        for prompt_index in range(len(prompts)):
            for index in range(settings.num_completions):
                generated_ids = sequences[prompt_index * rows_per_prompt + index % rows_per_prompt]
                completions.append(self._finish(generated_ids, batch, prompt_index, settings, prompt_index, index))
        return completions

    def stream(self, prompts: list[str], settings: Settings, listener: StreamListener) -> list[Completion]:
        """Like `complete`, but one completion after the other, its text handed to `listener` as it is generated
        (sampled completions therefore differ from `complete`'s for the same seed; greedy ones do not)."""
        self._seed(settings)
        one_at_a_time = replace(settings, num_completions=1)
        completions = []
        for prompt_index, prompt in enumerate(prompts):
            batch = self._encode([prompt], settings)
            for index in range(settings.num_completions):
                listener.begin(prompt_index, index)
                postprocessor = StreamingPostprocessor(settings.stop_sequences, batch.texts[0])
                streamer = _PostprocessedStreamer(self.tokenizer, postprocessor, listener.text)
                sequences = self._generate(batch, one_at_a_time, streamer)
                completion = self._finish(sequences[0], batch, 0, settings, prompt_index, index)
                rest = postprocessor.finish(completion.text)
                if rest:
                    listener.text(rest)
                listener.end(completion)
                completions.append(completion)
        return completions

    @staticmethod
    def _seed(settings: Settings):
        if settings.seed is not None:
            transformers.set_seed(settings.seed)

    def check_prompts(self, prompts: list[str], settings: Settings):
        """Raise CompletionError, saying why, unless every prompt can be completed with these settings."""
        reject_empty(prompts)
        self._check_lengths([len(ids) for ids in self.tokenizer(prompts)["input_ids"]], settings)

    def _check_lengths(self, lengths: list[int], settings: Settings):
        for number, length in enumerate(lengths, start=1):
            if length + settings.max_new_tokens > self.context_length:
                which = "the prompt" if len(lengths) == 1 else f"prompt {number}"
                raise CompletionError(
                    f"{which} is {length} tokens: with {settings.max_new_tokens} new tokens it exceeds the model's "
                    f"context of {self.context_length} tokens; shorten it or ask for fewer new tokens"
                )

    def _encode(self, prompts: list[str], settings: Settings) -> _Prompts:
        """The prompts as one left-padded batch, after checking that each can be completed (tokenized once)."""
        reject_empty(prompts)
        encoded = self.tokenizer(prompts, padding=True, return_tensors="pt")
        lengths = encoded["attention_mask"].sum(dim=1).tolist()
        self._check_lengths(lengths, settings)
        return _Prompts(
            input_ids=encoded["input_ids"].to(self.model.device),
            attention_mask=encoded["attention_mask"].to(self.model.device),
            texts=[decode(self.tokenizer, ids) for ids in encoded["input_ids"].tolist()],
            lengths=lengths,
        )

    def _generate(self, batch: _Prompts, settings: Settings, streamer: BaseStreamer | None = None) -> torch.Tensor:
        """The generated ids, (prompts * completions generated per prompt, new tokens), a prompt's rows together."""
        prompt_length = batch.input_ids.shape[1]
        stopping = StoppingCriteriaList()
        if settings.stop_sequences:
            stopping.append(StopSequenceCriteria(self.tokenizer, prompt_length, settings.stop_sequences))
        with torch.inference_mode():
            sequences = self.model.generate(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                generation_config=settings.generation_config(self.tokenizer),
                stopping_criteria=stopping,
                streamer=streamer,
            )
        return sequences[:, prompt_length:].cpu()

    def _finish(self, generated_ids, batch: _Prompts, row: int, settings: Settings, prompt_index: int, index: int):
        """The post-processed completion of the batch's prompt `row`, numbered (prompt_index, index)."""
        finished = finish_completion(self.tokenizer, generated_ids, settings.stop_sequences, batch.texts[row])
        return Completion(**vars(finished), prompt_index=prompt_index, index=index, prompt_tokens=batch.lengths[row])


# ----- loading -----


def model_source(model: str | Path) -> Path | str:
    """A local model folder, checked to hold a model, or a Hub id to load from the Hub (or its local cache)."""
    path = Path(model).expanduser()
    if path.is_dir():
        for required in ("config.json", "spiece.model"):
            if not (path / required).is_file():
                raise CompletionError(f"{model} is not a model folder: it has no {required}")
        return path
    if path.exists():
        raise CompletionError(f"the model must be a folder: {model}")
    if path == DEMO_MODEL:
        raise CompletionError(f"the demo model is missing: {DEMO_MODEL} (python train_demo.py builds it)")
    if not HUB_ID.fullmatch(str(model)):
        raise CompletionError(f"model folder not found: {model}")
    return str(model)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise CompletionError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise CompletionError(f"device {device!r} asked for, but CUDA is not available here")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise CompletionError(f"device {device!r} asked for, but MPS is not available here")
    return resolved


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
        loaded = ReplitLM.from_pretrained(source, dtype=DTYPES[dtype], **overrides)
        tokenizer = ReplitLMTokenizer.from_pretrained(source)
    except OSError as error:
        if isinstance(source, Path):
            raise
        message = f"model folder not found: {model} (nor on the Hugging Face Hub: {one_line(error)})"
        raise CompletionError(message) from error
    return Completer(loaded.to(torch_device).eval(), tokenizer)


def add_model_arguments(parser: argparse.ArgumentParser):
    """The options that choose and load the model, shared with serve.py."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=str(DEMO_MODEL),
        help="a model folder laid out like the Hub repository, a downloaded snapshot of replit/replit-code-v1-3b, "
        "or a Hub id (default: the embedded demo model, demo/ beside this script)",
    )
    group.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N or mps")
    group.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bfloat16 on CUDA, or float32")
    group.add_argument("--attn-impl", choices=["torch", "triton"], help="attention implementation (default: config's)")
    group.add_argument("--weight-quantization", choices=["int8", "int4"], help="quantize the weights as they load")


def load_from_arguments(args: argparse.Namespace) -> Completer:
    return load_completer(args.model, args.device, args.dtype, args.attn_impl, args.weight_quantization)


def quiet_libraries():
    """Only errors from transformers and the Hub client: no progress bars, no retry or deprecation warnings."""
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    hub_logging.set_verbosity_error()


def one_line(error: BaseException) -> str:
    """An exception's message on one line (transformers' messages often span several)."""
    return " ".join(str(error).split()) or type(error).__name__


# ----- the command line -----


class _OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"error: {message}\n")


def unescape(text: str) -> str:
    """`\\n`, `\\r`, `\\t` and `\\\\` in a stop sequence given on the command line, as the characters they name."""
    escapes = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\"}
    return re.sub(r"\\([nrt\\])", lambda match: escapes[match.group(1)], text)


def read_prompt_file(name: str) -> str:
    """A prompt file (`-`: standard input), bytes for bytes: CRLF and trailing newlines are kept."""
    try:
        data = sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
    except OSError as error:
        raise CompletionError(f"cannot read prompt file {name}: {error.strerror}") from error
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise CompletionError(f"prompt file {name} is not UTF-8 text") from error


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = _OneLineErrorParser(
        description="Complete code with replit-code-v1-3b, with the model card's sampling and post-processing.",
        epilog="Exit status: 0 on success, 1 when the completion fails (a one-line error on stderr), "
        "2 for a bad command line.",
    )
    parser.add_argument("prompts", nargs="*", metavar="PROMPT", help="code to complete; several are one batch")
    parser.add_argument("--file", action="append", default=[], metavar="PATH",
                        help="read a prompt from a file, - for standard input (repeatable)")  # fmt: skip
    add_model_arguments(parser)
    card = Settings()  # the model card's settings
    sampling = parser.add_argument_group("generation (defaults: the model card's)")
    sampling.add_argument("--max-new-tokens", type=int, default=card.max_new_tokens, metavar="N",
                          help=f"token budget of each completion (default {card.max_new_tokens})")  # fmt: skip
    sampling.add_argument("--temperature", type=float, default=card.temperature,
                          help=f"default {card.temperature}; 0 means greedy")  # fmt: skip
    sampling.add_argument("--top-p", type=float, default=card.top_p, help=f"nucleus sampling (default {card.top_p})")
    sampling.add_argument("--top-k", type=int, default=card.top_k, help=f"default {card.top_k}; 0 disables top-k")
    sampling.add_argument("--greedy", action="store_true", help="no sampling: always the most likely token")
    sampling.add_argument("-n", "--num-completions", type=int, default=1, metavar="N", help="completions per prompt")
    sampling.add_argument("--seed", type=int, help="seed the sampling, for repeatable completions")
    sampling.add_argument("--stop", action="append", metavar="TEXT",
                          help="stop sequence, replacing the defaults (repeatable; \\n, \\t, \\r escapes); "
                          "default: " + " ".join(repr(s) for s in DEFAULT_STOP_SEQUENCES))  # fmt: skip
    sampling.add_argument("--no-stop", action="store_true", help="no stop sequences: only end-of-text and the budget")
    output = parser.add_argument_group("output")
    output.add_argument("--stream", action="store_true", help="print the completion as it is generated")
    output.add_argument("--json", action="store_true",
                        help="print one JSON object: completions, stop reasons, token counts, timing")  # fmt: skip
    args = parser.parse_args(argv)
    if args.stop and args.no_stop:
        parser.error("--stop and --no-stop exclude each other")
    if args.stream and args.json:
        parser.error("--stream and --json exclude each other")
    return args


def settings_from_arguments(args: argparse.Namespace) -> Settings:
    if args.no_stop:
        stop_sequences = ()
    elif args.stop:
        stop_sequences = tuple(unescape(stop) for stop in args.stop)
    else:
        stop_sequences = DEFAULT_STOP_SEQUENCES
    return Settings(
        max_new_tokens=args.max_new_tokens,
        greedy=args.greedy,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        num_completions=args.num_completions,
        stop_sequences=stop_sequences,
        seed=args.seed,
    )


class _PrintingListener(StreamListener):
    def __init__(self, headers: bool):
        self.headers = headers

    def begin(self, prompt_index, index):
        if self.headers:
            print(header(prompt_index, index), flush=True)

    def text(self, piece):
        sys.stdout.write(piece)
        sys.stdout.flush()

    def end(self, completion):
        print(flush=True)


def header(prompt_index: int, index: int) -> str:
    return f"=== prompt {prompt_index + 1}, completion {index + 1} ==="


def run(args: argparse.Namespace):
    prompts = args.prompts + [read_prompt_file(name) for name in args.file]
    reject_empty(prompts)  # before the model loads: a bad command line fails at once
    settings = settings_from_arguments(args)
    started = time.perf_counter()
    completer = load_from_arguments(args)
    loaded = time.perf_counter()
    several = len(prompts) * settings.num_completions > 1
    if args.stream:
        completer.stream(prompts, settings, _PrintingListener(headers=several))
        return
    completions = completer.complete(prompts, settings)
    finished = time.perf_counter()
    if args.json:
        generated = sum(completion.completion_tokens for completion in completions)
        timing = {
            "load_seconds": round(loaded - started, 3),
            "generate_seconds": round(finished - loaded, 3),
            "tokens_per_second": round(generated / max(finished - loaded, 1e-9), 1),
        }
        result = {"model": args.model, "completions": [asdict(c) for c in completions], "timing": timing}
        print(json.dumps(result, indent=2))
        return
    for completion in completions:
        if several:
            print(header(completion.prompt_index, completion.index))
        print(completion.text)


def main(argv=None) -> int:
    args = parse_arguments(argv)
    quiet_libraries()
    try:
        run(args)
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # every failure is one line for the user, never a traceback
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
