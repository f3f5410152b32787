"""Code completion with replit-code-v1-3b: the model card's sampling settings and post-processing, for prompts
completed in one left-padded batch or streamed one after the other. The command line (cli.py), the server
(server.py) and the evaluation (evaluation.py) all complete through `Completer`.

The server batches completions of different requests: `Completer.generate_rows` runs one `generate` call for rows
that each have their own prompt, token budget, stop sequences and listener, and drops a row from the batch (a
per-row done flag of a StoppingCriteria) as soon as it is finished or cancelled."""

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import transformers
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from .options import DEFAULT_STOP_SEQUENCES, CompletionError, Settings, reject_empty
from .postprocessing import (
    FinishedCompletion,
    StopSequenceCriteria,
    StreamingPostprocessor,
    completion_ids,
    decode,
    find_stop,
    finish_completion,
)


def generation_config(settings: Settings, tokenizer) -> GenerationConfig:
    sampling = dict(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k)
    sampling = sampling if settings.do_sample else {}
    return GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        do_sample=settings.do_sample,
        # Greedy completions of a prompt are all the same: one is computed.
        num_return_sequences=settings.num_completions if settings.do_sample else 1,
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


@dataclass(eq=False)
class Row:
    """One completion computed in a batch of rows (`Completer.generate_rows`): its prompt, budget and stop sequences,
    and whom to tell. Rows of one batch share the sampling settings; everything else is the row's own.

    `on_text` (streaming) receives the post-processed text as it is generated, `on_end` the finished completion
    (pieces and completion are exactly what `Completer.stream` would give). Both are called on the thread that runs
    `generate_rows`. `cancelled()` is read at every decoding step: once true, the row stops (no `on_end`)."""

    prompt_ids: list[int]
    prompt_text: str  # the prompt as the tokenizer gives it back: what the stop rules read before the completion
    max_new_tokens: int
    stop_sequences: tuple[str, ...] = DEFAULT_STOP_SEQUENCES
    on_text: Callable[[str], None] | None = None
    on_end: Callable[[FinishedCompletion], None] | None = None
    cancelled: Callable[[], bool] = lambda: False
    generated_ids: list[int] = field(default_factory=list)
    finished: FinishedCompletion | None = None
    was_cancelled: bool = False
    _postprocessor: StreamingPostprocessor | None = None  # what streaming lets through, for rows with on_text

    def __post_init__(self):
        if self.on_text is not None:
            self._postprocessor = StreamingPostprocessor(self.stop_sequences, self.prompt_text)

    @property
    def done(self) -> bool:
        return self.finished is not None or self.was_cancelled

    @property
    def streamed(self) -> bool:
        """Whether `on_text` has received some of its text: generating it again would repeat that."""
        return self._postprocessor is not None and bool(self._postprocessor.shown)


class _RowSteps(StoppingCriteria):
    """Follows every row of a batch at each decoding step: records its new token, streams its text, finishes it at
    end-of-text, at a stop sequence or at its own token budget, and notices cancellation. Its per-row done flags
    take finished and cancelled rows out of the batch's decoding (generate stops when every row is done)."""

    def __init__(self, tokenizer, rows: list[Row]):
        self.tokenizer = tokenizer
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        for row, token in zip(self.rows, input_ids[:, -1].tolist()):
            if row.done:
                continue
            if row.cancelled():
                row.was_cancelled = True
            else:
                self.add(row, token)
        return torch.tensor([row.done for row in self.rows], dtype=torch.bool, device=input_ids.device)

    def add(self, row: Row, token: int):
        row.generated_ids.append(token)
        stopped = token == self.tokenizer.eos_token_id or len(row.generated_ids) >= row.max_new_tokens
        if row.on_text is not None or row.stop_sequences:
            text = decode(self.tokenizer, completion_ids(self.tokenizer, row.generated_ids))
            if row.on_text is not None:
                piece = row._postprocessor.update(text)
                if piece:
                    row.on_text(piece)
                stopped = stopped or row._postprocessor.stopped
            else:
                stopped = stopped or find_stop(text, row.stop_sequences, row.prompt_text) is not None
        if stopped:
            self.finish(row)

    def finish(self, row: Row):
        row.finished = finish_completion(
            self.tokenizer, row.generated_ids, row.stop_sequences, row.prompt_text, row.max_new_tokens
        )
        if row.on_text is not None:
            rest = row._postprocessor.finish(row.finished.text)
            if rest:
                row.on_text(rest)
        if row.on_end is not None:
            row.on_end(row.finished)


class Completer:
    """A model and its tokenizer, completing prompts with the model card's post-processing."""

    def __init__(self, model, tokenizer):
        """model: a ReplitLM; tokenizer: its ReplitLMTokenizer (or the fast twin)."""
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

    def encode_prompts(self, prompts: list[str], max_new_tokens: int) -> tuple[list[list[int]], list[str]]:
        """Each prompt's token ids (no padding) and its text as the tokenizer gives it back; CompletionError for a
        prompt that cannot be completed with max_new_tokens (`_check_lengths`) or is empty."""
        reject_empty(prompts)
        ids = self.tokenizer(prompts)["input_ids"]
        self._check_lengths([len(prompt_ids) for prompt_ids in ids], max_new_tokens)
        return ids, [decode(self.tokenizer, prompt_ids) for prompt_ids in ids]

    def generate_rows(self, rows: list[Row], settings: Settings):
        """Complete `rows` in one left-padded `generate` call with the sampling of `settings` (its max_new_tokens,
        num_completions and stop_sequences are ignored: each row has its own). Rows finish, stream and are
        cancelled independently (see `Row`); one still unfinished when generation ends finishes then."""
        width = max(len(row.prompt_ids) for row in rows)
        max_new_tokens = max(row.max_new_tokens for row in rows)
        if width + max_new_tokens > self.context_length:
            raise CompletionError(
                f"a batch of {width} prompt tokens and {max_new_tokens} new tokens exceeds the context of "
                f"{self.context_length} tokens"
            )
        pad = self.tokenizer.pad_token_id
        input_ids = [[pad] * (width - len(row.prompt_ids)) + list(row.prompt_ids) for row in rows]
        attention_mask = [[0] * (width - len(row.prompt_ids)) + [1] * len(row.prompt_ids) for row in rows]
        one_each = replace(settings, max_new_tokens=max_new_tokens, num_completions=1)
        steps = _RowSteps(self.tokenizer, rows)
        self._seed(settings)
        with torch.inference_mode():
            self.model.generate(
                input_ids=torch.tensor(input_ids, device=self.model.device),
                attention_mask=torch.tensor(attention_mask, device=self.model.device),
                generation_config=generation_config(one_each, self.tokenizer),
                stopping_criteria=StoppingCriteriaList([steps]),
            )
        for row in rows:
            if not row.done:
                steps.finish(row)

    @staticmethod
    def _seed(settings: Settings):
        if settings.seed is not None:
            transformers.set_seed(settings.seed)

    def _check_lengths(self, lengths: list[int], max_new_tokens: int):
        """CompletionError, saying why, unless prompts of these lengths in tokens can each be completed: at least one
        token, and room in the context for max_new_tokens more."""
        for number, length in enumerate(lengths, start=1):
            which = "the prompt" if len(lengths) == 1 else f"prompt {number}"
            if length == 0:  # not empty as text: SentencePiece's normalization drops control characters
                raise CompletionError(f"{which} has no tokens: the tokenizer drops all of its characters")
            if length + max_new_tokens > self.context_length:
                raise CompletionError(
                    f"{which} is {length} token{'s' * (length != 1)}: with {max_new_tokens} new tokens it exceeds "
                    f"the model's context of {self.context_length} tokens; shorten it or ask for fewer new tokens"
                )

    def _encode(self, prompts: list[str], settings: Settings) -> _Prompts:
        """The prompts as one left-padded batch, after checking that each can be completed (tokenized once)."""
        reject_empty(prompts)
        encoded = self.tokenizer(prompts, padding=True, return_tensors="pt")
        lengths = encoded["attention_mask"].sum(dim=1).tolist()
        self._check_lengths(lengths, settings.max_new_tokens)
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
                generation_config=generation_config(settings, self.tokenizer),
                stopping_criteria=stopping,
                streamer=streamer,
            )
        return sequences[:, prompt_length:].cpu()

    def _finish(self, generated_ids, batch: _Prompts, row: int, settings: Settings, prompt_index: int, index: int):
        """The post-processed completion of the batch's prompt `row`, numbered (prompt_index, index)."""
        finished = finish_completion(self.tokenizer, generated_ids, settings.stop_sequences, batch.texts[row])
        return Completion(**vars(finished), prompt_index=prompt_index, index=index, prompt_tokens=batch.lengths[row])

