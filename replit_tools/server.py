"""An OpenAI-compatible completion server for replit-code-v1-3b: POST /v1/completions (plain and streaming),
GET (and HEAD) /v1/models and /health, on FastAPI and uvicorn.

    python3 serve.py --model ~/replit-code-v1-3b --port 8000

Completions are those of the command line (the same loading, settings and post-processing). Requests that arrive
while the model is busy are completed together in the next batched `generate` call; a request whose client goes
away leaves its batch at the next decoding step. docs/serving.md has the endpoints, limits, authentication, and
why this HTTP stack.

Threads: uvicorn's event loop reads, checks and answers requests; one model thread (`BatchScheduler`) owns the model
and runs the batches; the loop hands it requests through a queue and receives their text through per-request queues.
"""

import argparse
import asyncio
import collections
import copy
import hmac
import ipaddress
import json
import logging
import math
import socket
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from pathlib import Path

import h11
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from .completion import Completer, Completion, CompletionError, Row, Settings
from .loading import load_from_arguments, quiet_libraries
from .commands import API_KEY_ENV, server_arguments
from .options import SEEDS, one_line
from .postprocessing import DEFAULT_STOP_SEQUENCES, STOP_LENGTH, FinishedCompletion

# OpenAI request fields this server cannot honour, with the value that asks for nothing (and is accepted).
UNSUPPORTED_FIELDS = {
    "echo": False,
    "logprobs": None,
    "best_of": 1,
    "logit_bias": {},
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "suffix": "",
}
MAX_COMPLETIONS_PER_REQUEST = 16  # prompts times n
MAX_STOP_SEQUENCES = 16
MAX_STOP_SEQUENCE_CHARS = 256
MAX_SEED = SEEDS - 1
# Prompts up to this many characters in all are tokenized on the event loop (about a millisecond), longer ones on
# a worker thread: a hand-off to another thread costs more than that on a busy machine.
INLINE_TOKENIZATION_CHARS = 16384

logger = logging.getLogger("uvicorn.error")  # uvicorn's own log, on standard error


class RequestError(Exception):
    """A request the server refuses, answered as OpenAI does: HTTP 4xx and {"error": {"message", ...}}."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        status: HTTPStatus = HTTPStatus.BAD_REQUEST,
        headers: dict | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.param = param
        self.status = status
        self.headers = headers
        self.code = code


# --- Requests ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; the command line sets them (see `main`)."""

    context_length: int  # the model's, in tokens
    max_chars_per_token: int  # the longest piece of the vocabulary: a prompt of C characters has >= C / this tokens
    max_body_bytes: int = 1 << 20
    # prompts times n: a request runs in one batch, so no more than --max-batch-size
    max_completions: int = MAX_COMPLETIONS_PER_REQUEST


@dataclass(frozen=True)
class CompletionRequest:
    prompts: list[str]
    settings: Settings
    stream: bool
    include_usage: bool


def _number(body: dict, name: str, default, integer: bool = False):
    """body[name] if it is a finite number (an integer when `integer`), `default` if absent or null. JSON true and
    false are not numbers here; NaN and Infinity (a JSON extension that Python's parser accepts) are refused."""
    value = body.get(name)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if not isinstance(value, kinds) or isinstance(value, bool):
        wanted = "an integer" if integer else "a number"
        raise RequestError(f"{name} must be {wanted}, not {type(value).__name__}", param=name)
    if not math.isfinite(value):
        raise RequestError(f"{name} must be a finite number, not {value}", param=name)
    return value


def _text(value: str, name: str) -> str:
    """`value` if it can be encoded as UTF-8 (JSON's \\ud800 escapes give Python strings with lone surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise RequestError(
            f"{name} is not valid Unicode: a lone surrogate at character {error.start}", param=name
        ) from None
    return value


def parse_request(body, limits: Limits) -> CompletionRequest:
    """The prompts and settings of a /v1/completions request body; the model card's defaults where it says
    nothing (OpenAI's are meant for chat models). Every field is checked here: a bad one is a RequestError naming
    it. Prompt lengths in tokens are checked later (`Completer.encode_prompts`), after this cheap bound on
    characters."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    for name, nothing in UNSUPPORTED_FIELDS.items():
        if body.get(name) not in (None, nothing):
            raise RequestError(f"{name} is not supported by this server", param=name)
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise RequestError("prompt must be a string or a non-empty list of strings", param="prompt")
    if len(prompts) > limits.max_completions:
        raise RequestError(f"at most {limits.max_completions} prompts per request", param="prompt")
    for p in prompts:
        _text(p, "prompt")

    stop = body.get("stop")
    stop_sequences = DEFAULT_STOP_SEQUENCES if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop_sequences, (list, tuple)) or not all(isinstance(s, str) for s in stop_sequences):
        raise RequestError("stop must be a string or a list of strings", param="stop")
    if len(stop_sequences) > MAX_STOP_SEQUENCES:
        raise RequestError(f"at most {MAX_STOP_SEQUENCES} stop sequences", param="stop")
    for s in stop_sequences:
        if not s or len(s) > MAX_STOP_SEQUENCE_CHARS:
            raise RequestError(f"a stop sequence must have 1 to {MAX_STOP_SEQUENCE_CHARS} characters", param="stop")
        _text(s, "stop")

    n = _number(body, "n", 1, integer=True)
    if n < 1:
        raise RequestError("n must be at least 1", param="n")
    if n * len(prompts) > limits.max_completions:
        raise RequestError(f"at most {limits.max_completions} completions per request (prompts times n)", "n")
    defaults = Settings()  # the model card's
    max_tokens = _number(body, "max_tokens", defaults.max_new_tokens, integer=True)
    if not 1 <= max_tokens < limits.context_length:
        default = "" if "max_tokens" in body else f" (default {defaults.max_new_tokens})"
        raise RequestError(
            f"max_tokens{default} must be 1 to {limits.context_length - 1}: the model's context is "
            f"{limits.context_length} tokens, prompt included",
            param="max_tokens",
        )
    temperature = _number(body, "temperature", defaults.temperature)
    if temperature < 0:
        raise RequestError("temperature must be 0 (greedy) or more", param="temperature")
    top_p = _number(body, "top_p", defaults.top_p)
    if not 0 < top_p <= 1:
        raise RequestError("top_p must be in (0, 1]", param="top_p")
    top_k = _number(body, "top_k", defaults.top_k, integer=True)
    if top_k < 0:
        raise RequestError("top_k must be 0 (no top-k filtering) or more", param="top_k")
    seed = _number(body, "seed", None, integer=True)
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise RequestError(f"seed must be 0 to {MAX_SEED}", param="seed")

    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise RequestError("stream must be true or false", param="stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise RequestError('stream_options must be an object, e.g. {"include_usage": true}', param="stream_options")
    if options is not None and not stream:  # as OpenAI and vLLM answer: no stream, nothing for them to change
        raise RequestError("stream_options is only allowed when stream is true", param="stream_options")
    include_usage = (options or {}).get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise RequestError("stream_options.include_usage must be true or false", param="stream_options")

    # A prompt of C characters is at least C / max_chars_per_token tokens: a far too long one is refused here,
    # before the tokenizer spends time and memory on it.
    budget = (limits.context_length - max_tokens) * limits.max_chars_per_token
    for number, p in enumerate(prompts, start=1):
        if len(p) > budget:
            which = "the prompt" if len(prompts) == 1 else f"prompt {number}"
            raise RequestError(
                f"{which} is {len(p)} characters: with {max_tokens} new tokens it cannot fit the model's context "
                f"of {limits.context_length} tokens; shorten it or ask for fewer new tokens",
                param="prompt",
            )
    settings = Settings(
        max_new_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        num_completions=n,
        stop_sequences=tuple(stop_sequences),
        seed=seed,
    )
    return CompletionRequest(prompts, settings, bool(stream), bool(include_usage))


def choice(text: str, index: int, finish_reason: str | None) -> dict:
    return {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}


def finish_reason(completion: FinishedCompletion) -> str:
    """OpenAI's finish_reason: "length" when the token budget ended it, "stop" for end-of-text or a stop sequence."""
    return "length" if completion.stop_reason == STOP_LENGTH else "stop"


def usage(completions: list[Completion]) -> dict:
    # Each prompt counts once, however many completions it got.
    prompt_tokens = sum(c.prompt_tokens for c in completions if c.index == 0)
    completion_tokens = sum(c.completion_tokens for c in completions)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


# --- Batching ---------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Job:
    """One request's completions, from the event loop to the model thread and back. The model thread reports
    through `events` (an asyncio.Queue of the request's loop): ("text", choice index, piece) and ("end", choice
    index) while streaming, ("done",) as soon as the job's own rows are finished and every completion is in
    `completions` (its batch may go on for others), or ("error", message, HTTP status)."""

    rows: list[Row]
    settings: Settings
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    completions: dict = field(default_factory=dict)  # choice index -> Completion
    cancelled: threading.Event = field(default_factory=threading.Event)
    unfinished_rows: int = 0

    @property
    def key(self):
        """Jobs with equal keys can share a `generate` call: the sampling settings are the batch's. Greedy ones all
        can; a seeded one runs alone, so that its seed gives what it gives alone."""
        s = self.settings
        if not s.do_sample:
            return ("greedy",)
        if s.seed is not None:
            return ("seeded", id(self))
        return ("sample", s.temperature, s.top_p, s.top_k)

    @property
    def width(self) -> int:
        return max(len(row.prompt_ids) for row in self.rows)

    def send(self, *event):
        """Called on the model thread."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop has closed: the server is stopping
            pass

    def row_finished(self):
        """Called on the model thread once per row, after its completions are in."""
        self.unfinished_rows -= 1
        if not self.unfinished_rows:
            self.send("done")

    def fail(self, message: str, status: int):
        if self.unfinished_rows:
            self.send("error", message, status)


def make_job(request: CompletionRequest, prompt_ids, prompt_texts, loop) -> Job:
    """The rows of a request: n per prompt when sampling, one per prompt when greedy (its n completions are the
    same, computed once and reported under each choice index)."""
    settings = request.settings
    job = Job(rows=[], settings=settings, loop=loop)
    distinct = settings.num_completions if settings.do_sample else 1
    for prompt_index, (ids, text) in enumerate(zip(prompt_ids, prompt_texts)):
        first = prompt_index * settings.num_completions
        for index in range(distinct):
            indexes = range(first + index, first + settings.num_completions, distinct)

            def on_text(piece, indexes=indexes):
                for i in indexes:
                    job.send("text", i, piece)

            def on_end(finished, indexes=indexes, first=first, prompt_index=prompt_index, prompt_tokens=len(ids)):
                for i in indexes:
                    job.completions[i] = Completion(
                        **vars(finished), prompt_index=prompt_index, index=i - first, prompt_tokens=prompt_tokens
                    )
                    if request.stream:
                        job.send("end", i)
                job.row_finished()

            job.rows.append(
                Row(
                    prompt_ids=ids,
                    prompt_text=text,
                    max_new_tokens=settings.max_new_tokens,
                    stop_sequences=settings.stop_sequences,
                    on_text=on_text if request.stream else None,
                    on_end=on_end,
                    cancelled=job.cancelled.is_set,
                )
            )
    job.unfinished_rows = len(job.rows)
    return job


class QueueFull(Exception):
    pass


class SchedulerStopped(Exception):
    pass


SHUTTING_DOWN = "the server is shutting down"
# Not the batch's own error: that may be about another client's request.
BATCH_FAILED_MID_STREAM = "generation failed in a batch shared with other requests after this stream had begun: retry"


class BatchScheduler:
    """The model thread: takes the waiting jobs, oldest first, and completes those that can share a batch (equal
    `Job.key`, at most `max_batch_rows` rows, prompts and budgets within the context) in one `generate` call; then
    the next. A job whose client has gone (`cancel`) leaves the queue at once, or its batch at the next step. A batch
    that fails is run again job by job (`_run`)."""

    def __init__(self, completer: Completer, max_batch_rows: int = 16, max_queued: int = 256, gather_s: float = 0.02):
        self.completer = completer
        self.max_batch_rows = max_batch_rows
        self.max_queued = max_queued
        self.gather_s = gather_s  # how long a batch waits for requests that are being read and tokenized
        self._queue: collections.deque[Job] = collections.deque()
        self._admitting = 0  # requests between their arrival and `submit`
        self._running: list[Job] = []
        self._condition = threading.Condition()
        self._closed = False
        self.counters = collections.Counter()
        self._thread = threading.Thread(target=self._work, name="model", daemon=True)
        self._thread.start()

    @contextmanager
    def admission(self):
        """Around reading, checking and submitting a request: a batch about to start waits (up to `gather_s`)
        for the requests in here, so that a burst of requests shares one batch. A lone request does not wait:
        `submit` ends its admission as it queues it."""
        admitting = [True]
        with self._condition:
            self._admitting += 1
        try:
            yield admitting
        finally:
            with self._condition:
                if admitting[0]:
                    self._admitting -= 1
                    self._condition.notify_all()

    def submit(self, job: Job, admitting: list[bool]):
        """Queue `job` (QueueFull if --max-queued are waiting, SchedulerStopped after `stop`); `admitting` is what
        `admission` gave."""
        with self._condition:
            if self._closed:
                raise SchedulerStopped()
            if len(self._queue) >= self.max_queued:
                self.counters["refused_requests"] += 1
                raise QueueFull(len(self._queue))
            self._queue.append(job)
            self.counters["requests"] += 1
            admitting[0] = False
            self._admitting -= 1
        # The model thread is woken once the event loop has run what is ready now: the other requests of a burst
        # that arrived together are then queued too, and share the batch (at no cost to a lone request).
        job.loop.call_soon(self._wake)

    def _wake(self):
        with self._condition:
            self._condition.notify_all()

    def cancel(self, job: Job):
        """The client has gone: the job leaves the queue, or its rows leave their batch at the next decoding step."""
        if job.cancelled.is_set():
            return
        job.cancelled.set()
        with self._condition:
            if job in self._queue:
                self._queue.remove(job)
                self.counters["cancelled_rows"] += len(job.rows)
                self.counters["cancelled_rows_queued"] += len(job.rows)

    def stats(self) -> dict:
        with self._condition:
            return {
                "queued_requests": len(self._queue),
                "running_rows": sum(not row.done for job in self._running for row in job.rows),
                **{name: self.counters[name] for name in STAT_COUNTERS},
            }

    def stop(self, reason: str = SHUTTING_DOWN):
        """Take no more jobs, and end the queued and running ones now with a 503 (`reason`); a running batch stops
        at its next step. The server calls this as its shutdown begins, so that its open requests are answered."""
        with self._condition:
            self._closed = True
            jobs = [*self._queue, *self._running]
            self._queue.clear()
            for job in jobs:
                job.cancelled.set()
            self._condition.notify_all()
        for job in jobs:
            job.fail(reason, HTTPStatus.SERVICE_UNAVAILABLE)

    def close(self):
        """`stop`, then wait for the model thread to end."""
        self.stop()
        self._thread.join(timeout=10)

    def _work(self):
        while True:
            with self._condition:
                self._condition.wait_for(lambda: self._queue or self._closed)
                if self._closed:
                    return
                if self._admitting:
                    self._condition.wait_for(lambda: not self._admitting or self._closed, timeout=self.gather_s)
                if self._closed or not self._queue:  # closed, or its jobs cancelled meanwhile
                    continue
                jobs = self._take_batch()
                self._running = jobs
            try:
                self._run(jobs)
            finally:
                with self._condition:
                    self._running = []

    def _take_batch(self) -> list[Job]:
        """The oldest job, and the later ones that can join its batch, removed from the queue."""
        first = self._queue[0]
        jobs, rows, width, budget = [], 0, 0, 0
        context = self.completer.context_length
        for job in list(self._queue):
            if job.key != first.key:
                continue
            new_width, new_budget = max(width, job.width), max(budget, job.settings.max_new_tokens)
            if jobs and (rows + len(job.rows) > self.max_batch_rows or new_width + new_budget > context):
                continue
            jobs.append(job)
            self._queue.remove(job)
            rows, width, budget = rows + len(job.rows), new_width, new_budget
        return jobs

    def _run(self, jobs: list[Job]):
        error = self._generate(jobs)
        if error is None:
            return
        if len(jobs) == 1:
            self._fail(jobs[0], error)
            return
        # One request can break a batch that others share: each unfinished job runs again alone, so that only a
        # job that fails alone gets an error. A stream that has shown some text cannot start again without
        # repeating it: it ends with an error event.
        logger.warning("a batch of %d requests failed (%s): running them one by one", len(jobs), one_line(error))
        for job in jobs:
            if job.cancelled.is_set() or not job.unfinished_rows:
                continue
            unfinished = [row for row in job.rows if not row.done]
            if any(row.streamed for row in unfinished):
                logger.error("generation failed after a stream had begun: %s", one_line(error))
                job.fail(BATCH_FAILED_MID_STREAM, HTTPStatus.INTERNAL_SERVER_ERROR)
                continue
            job.rows = [replace(row, generated_ids=[]) for row in unfinished]  # from the prompt: none of it was sent
            alone = self._generate([job])
            if alone is not None:
                self._fail(job, alone)

    @staticmethod
    def _fail(job: Job, error: Exception):
        """Tell `job` that its generation (alone) failed: a CompletionError says what the request should change,
        any other error is a failure of the server or the model."""
        logger.error("generation failed: %s", one_line(error))
        status = HTTPStatus.BAD_REQUEST if isinstance(error, CompletionError) else HTTPStatus.INTERNAL_SERVER_ERROR
        job.fail(one_line(error), status)

    def _generate(self, jobs: list[Job]) -> Exception | None:
        """One `generate` call for the rows of `jobs`; the exception it raised, if any."""
        rows = [row for job in jobs for row in job.rows]
        started = time.perf_counter()
        error = None
        try:
            self.completer.generate_rows(rows, jobs[0].settings)  # each job is told "done" as its rows finish
        except Exception as raised:
            error = raised
        cancelled = sum(row.was_cancelled for row in rows)
        with self._condition:
            self.counters["batches"] += 1
            self.counters["rows"] += len(rows)
            self.counters["max_batch_rows"] = max(self.counters["max_batch_rows"], len(rows))
            self.counters["cancelled_rows"] += cancelled
            self.counters["generated_tokens"] += sum(len(row.generated_ids) for row in rows)
        logger.debug(
            "batch of %d rows (%d cancelled) in %.2f s", len(rows), cancelled, time.perf_counter() - started
        )
        return error


# Cumulative counts that /health reports.
STAT_COUNTERS = (
    "requests",
    "refused_requests",
    "batches",
    "rows",
    "max_batch_rows",
    "generated_tokens",
    "cancelled_rows",
    "cancelled_rows_queued",
)


# --- HTTP -------------------------------------------------------------------------------------------------------


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def create_app(
    completer: Completer,
    model_id: str,
    limits: Limits,
    scheduler: BatchScheduler,
    api_key: str | None = None,
    cors_origins: list[str] | None = None,
):
    """The FastAPI application: the endpoints, authentication, limits and errors (the HTTP stack's own limits,
    timeouts and backlog are uvicorn's, set in `serve`). `cors_origins`: the web origins whose pages may call it
    from a browser (--cors-origin)."""
    app = FastAPI(title="replit-code-v1-3b", openapi_url=None, docs_url=None, redoc_url=None)
    if cors_origins:
        # A browser asks first (a preflight OPTIONS) before a page of another origin posts JSON or sends
        # Authorization, and shows it no answer without Access-Control-Allow-Origin. Opt-in: otherwise any page
        # the user visits could use the server. Naming an origin is also the consent that Chrome's private network
        # access asks of a server on localhost; Retry-After is exposed for the clients' retries of a 429.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
            allow_private_network=True,
            expose_headers=["Retry-After"],
        )

    @app.exception_handler(RequestError)
    async def request_error(request, error: RequestError):
        headers = dict(error.headers or {})
        if error.status == HTTPStatus.REQUEST_ENTITY_TOO_LARGE:
            headers["Connection"] = "close"  # the rest of the body is not read
        body = error_body(str(error), error.status, error.param, error.code)
        return JSONResponse(body, status_code=error.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, error: HTTPException):  # 404, 405: OpenAI's error shape too
        message = f"{error.detail}: {request.method} {request.url.path}"
        return JSONResponse(error_body(message, error.status_code), error.status_code, headers=error.headers)

    @app.exception_handler(Exception)
    async def server_error(request, error: Exception):
        logger.error("request failed: %s", one_line(error))
        return JSONResponse(error_body(one_line(error), 500), status_code=500)

    def authorize(request: Request):
        """Bearer-token authentication, as the OpenAI API and vLLM do it (the openai client sends its api_key so)."""
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise RequestError(
                "invalid or missing API key: send the header Authorization: Bearer <key>",
                status=HTTPStatus.UNAUTHORIZED,
                headers={"WWW-Authenticate": "Bearer"},
                code="invalid_api_key",
            )

    authorized = [Depends(authorize)]
    # HEAD as well as GET on the read-only endpoints, as Starlette's own routes have it (FastAPI's @app.get answers
    # HEAD with 405): load balancers and uptime checks probe with HEAD. uvicorn sends the headers without the body.
    read_only = ["GET", "HEAD"]

    @app.api_route("/health", methods=read_only)
    async def health():
        return {"status": "ok", **scheduler.stats()}

    @app.api_route("/v1/models", methods=read_only, dependencies=authorized)
    async def models():
        model = {"id": model_id, "object": "model", "created": 0, "owned_by": "local"}
        return {"object": "list", "data": [model]}

    def completion_object(response_id: str, choices: list, usage_counts: dict | None = None) -> dict:
        response = {
            "id": response_id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": model_id,
            "choices": choices,
        }
        if usage_counts is not None:
            response["usage"] = usage_counts
        return response

    async def read_json(request: Request):
        """The body as JSON, refused (413) beyond limits.max_body_bytes without reading further."""
        declared = request.headers.get("content-length")  # h11 has checked that it is a number
        too_large = RequestError(
            f"the request body is larger than {limits.max_body_bytes} bytes", status=HTTPStatus.REQUEST_ENTITY_TOO_LARGE
        )
        if declared is not None and int(declared) > limits.max_body_bytes:
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_body_bytes:
                raise too_large
        try:  # decoded here: json.loads would take UTF-16 and UTF-32 too, and UTF-8-encoded surrogates
            return json.loads(bytes(body).decode("utf-8") or "null")
        except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise RequestError(f"the request body is not JSON: {one_line(error)}") from None

    async def admit(request: Request) -> tuple[CompletionRequest, Job]:
        with scheduler.admission() as admitting:
            parsed = parse_request(await read_json(request), limits)
            try:
                max_new_tokens = parsed.settings.max_new_tokens
                if sum(map(len, parsed.prompts)) <= INLINE_TOKENIZATION_CHARS:
                    ids, texts = completer.encode_prompts(parsed.prompts, max_new_tokens)
                else:
                    ids, texts = await run_in_threadpool(completer.encode_prompts, parsed.prompts, max_new_tokens)
            except CompletionError as error:  # an empty prompt, or one too long
                raise RequestError(str(error), param="prompt") from None
            job = make_job(parsed, ids, texts, asyncio.get_running_loop())
            try:
                scheduler.submit(job, admitting)
            except QueueFull as full:
                raise RequestError(
                    f"the server is busy ({full} requests waiting): retry shortly",
                    status=HTTPStatus.TOO_MANY_REQUESTS,
                    headers={"Retry-After": "1"},
                ) from None
            except SchedulerStopped:
                raise RequestError(SHUTTING_DOWN, status=HTTPStatus.SERVICE_UNAVAILABLE) from None
            return parsed, job

    @app.post("/v1/completions", dependencies=authorized)
    async def completions(request: Request):
        try:
            parsed, job = await admit(request)
        except ClientDisconnect:
            return Response(status_code=499)  # nginx's "client closed request": nobody reads it
        response_id = f"cmpl-{uuid.uuid4().hex}"
        if parsed.stream:
            events = server_sent_events(job, response_id, parsed.include_usage)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        finished = await wait_for(job, request)
        if finished is None:
            return Response(status_code=499)
        if finished[0] == "error":
            _, message, status = finished
            return JSONResponse(error_body(message, status), status_code=status)
        ordered = [job.completions[i] for i in sorted(job.completions)]
        choices = [choice(c.text, i, finish_reason(c)) for i, c in zip(sorted(job.completions), ordered)]
        return completion_object(response_id, choices, usage(ordered))

    async def wait_for(job: Job, request: Request):
        """The job's last event, or None if the client went away first (then the job is cancelled)."""

        async def last_event():
            while (event := await job.events.get())[0] not in ("done", "error"):
                pass
            return event

        async def client_gone():
            # The body has been read: the next ASGI message is the disconnection.
            while (await request.receive())["type"] != "http.disconnect":
                pass

        finished, gone = asyncio.ensure_future(last_event()), asyncio.ensure_future(client_gone())
        try:
            await asyncio.wait({finished, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (finished, gone):
                task.cancel()
        if finished.done() and not finished.cancelled():
            return finished.result()
        scheduler.cancel(job)
        return None

    async def server_sent_events(job: Job, response_id: str, include_usage: bool):
        """OpenAI's text_completion chunks, one server-sent event each, then [DONE]. Starlette cancels this
        generator when the client disconnects; `finally` then takes the job out of its batch."""

        def event(data) -> str:
            return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"

        try:
            while True:
                kind, *data = await job.events.get()
                if kind == "text":
                    index, piece = data
                    yield event(completion_object(response_id, [choice(piece, index, None)]))
                elif kind == "end":
                    (index,) = data
                    reason = finish_reason(job.completions[index])
                    yield event(completion_object(response_id, [choice("", index, reason)]))
                elif kind == "done":
                    if include_usage:
                        ordered = [job.completions[i] for i in sorted(job.completions)]
                        yield event(completion_object(response_id, [], usage(ordered)))
                    yield event("[DONE]")
                    return
                else:
                    message, status = data
                    yield event(error_body(message, status))
                    return
        finally:
            scheduler.cancel(job)

    return app


_REQUEST_READ = (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR)  # h11 states of a client whose request is in


class ReadTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus a deadline for receiving each request: its headers and body must arrive within
    `read_timeout` seconds of the connection (or of the previous response); otherwise the server answers 408 if it
    has not answered yet, and closes the connection. uvicorn has no such timeout of its own (its keep-alive timeout
    starts only after a response, and any byte resets it), so a client could otherwise hold a connection open
    forever by never finishing its headers or body. `serve` sets `read_timeout` in a subclass."""

    read_timeout = 30.0
    _read_deadline = None

    def connection_made(self, transport):
        super().connection_made(transport)
        self._arm_read_deadline()

    def data_received(self, data: bytes):
        super().data_received(data)
        if self.conn.their_state in _REQUEST_READ:
            self._disarm_read_deadline()

    def on_response_complete(self):
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state not in _REQUEST_READ:
            self._arm_read_deadline()  # the next request, or the rest of this one's body

    def connection_lost(self, exc):
        self._disarm_read_deadline()
        super().connection_lost(exc)

    def _arm_read_deadline(self):
        self._disarm_read_deadline()
        self._read_deadline = self.loop.call_later(self.read_timeout, self._read_timed_out)

    def _disarm_read_deadline(self):
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _read_timed_out(self):
        self._read_deadline = None
        if self.transport.is_closing() or self.conn.their_state in _REQUEST_READ:
            return
        # 408 unless this request was answered already (refused before its body came: 401, 413, ...).
        if self.cycle is None or not self.cycle.response_started or self.conn.their_state is h11.IDLE:
            self.transport.write(
                b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain; charset=utf-8\r\n"
                b"Connection: close\r\nContent-Length: 22\r\n\r\nrequest not received\r\n"
            )
        self.transport.close()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve beyond this machine


def listen(host: str, port: int, backlog: int) -> socket.socket:
    """The listening socket, bound here rather than by uvicorn so that --port 0 gives a port to print."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=backlog)
    sock.set_inheritable(True)
    return sock


def main(argv=None) -> int:
    return run(server_arguments(argv))


def run(args: argparse.Namespace) -> int:
    """serve.py after its command line was read (commands.server_arguments)."""
    if args.api_key is None and not is_loopback(args.host) and not args.allow_unauthenticated:
        print(
            f"error: --host {args.host} listens beyond this machine without an API key: give --api-key KEY (or set "
            f"{API_KEY_ENV}), or --allow-unauthenticated to let anyone who reaches the port use it",
            file=sys.stderr,
        )
        return 2
    quiet_libraries()
    try:
        sock = listen(args.host, args.port, args.backlog)  # first: a port in use is told before a long load
    except OSError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 1
    try:
        completer = load_from_arguments(args)
    except KeyboardInterrupt:
        sock.close()
        return 130
    except Exception as error:
        sock.close()
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 1
    model_id = args.served_model_name or Path(args.model).name
    try:
        serve(completer, model_id, sock, args)
    except KeyboardInterrupt:  # Ctrl-C: uvicorn shut down gracefully, then passed the interrupt on
        return 130
    return 0


def max_chars_per_token(tokenizer) -> int:
    """The most characters one token can decode to: its longest piece (SentencePiece's ▁ is one space; a byte
    piece like <0xE2> is one byte, fewer characters than its name)."""
    return max(len(piece) for piece in tokenizer.get_vocab())


def serve(completer: Completer, model_id: str, sock: socket.socket, args: argparse.Namespace):
    """Run uvicorn on `sock` until SIGINT or SIGTERM; print the address once it is ready."""
    limits = Limits(
        completer.context_length,
        max_chars_per_token(completer.tokenizer),
        args.max_body_bytes,
        min(MAX_COMPLETIONS_PER_REQUEST, args.max_batch_size),
    )
    scheduler = BatchScheduler(completer, args.max_batch_size, args.max_queued)
    app = create_app(completer, model_id, limits, scheduler, args.api_key, args.cors_origin)
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    log_config["handlers"]["access"]["stream"] = "ext://sys.stderr"  # standard output has the address only
    config = uvicorn.Config(
        app,
        http=type("ReadTimeoutH11Protocol", (ReadTimeoutH11Protocol,), {"read_timeout": args.read_timeout}),
        ws="none",
        lifespan="off",
        log_config=log_config,
        log_level=args.log_level,
        timeout_keep_alive=args.timeout_keep_alive,
        timeout_graceful_shutdown=5,
        backlog=args.backlog,
        h11_max_incomplete_event_size=16 * 1024,  # request line and headers (h11's default): more is HTTP 400
        server_header=False,
    )
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    ready = f"Serving {model_id} on http://{shown}:{port}/v1"

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                print(ready, flush=True)  # tests and scripts read this line to learn the port

        async def shutdown(self, sockets=None):
            # Before uvicorn waits for the open requests: they are answered at once (503, or an error event ending
            # a stream) rather than cancelled without an answer when its wait runs out.
            scheduler.stop()
            await super().shutdown(sockets)

    try:
        Server(config).run(sockets=[sock])
    finally:
        scheduler.close()
        sock.close()
