"""An OpenAI-compatible completion server for replit-code-v1-3b: POST /v1/completions (plain and streaming),
GET /v1/models and GET /health, on the Python standard library's HTTP server.

    python3 serve.py --model ~/replit-code-v1-3b --port 8000

Completions are those of the command line (the same loading, settings and post-processing); docs/serving.md says
how this server compares with `transformers serve`.

Requests are served one generation at a time (a lock around the model); /v1/models and /health answer meanwhile.
"""

import argparse
import json
import sys
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .completion import Completer, Completion, CompletionError, Settings, StreamListener
from .loading import add_model_arguments, load_from_arguments, one_line, quiet_libraries
from .postprocessing import DEFAULT_STOP_SEQUENCES, STOP_LENGTH

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
MAX_COMPLETIONS_PER_REQUEST = 16


class RequestError(Exception):
    """A request the server refuses, answered as OpenAI does: HTTP 4xx and {"error": {"message", ...}}."""

    def __init__(self, message: str, param: str | None = None, status: HTTPStatus = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.param = param
        self.status = status


def _typed(body: dict, name: str, types: tuple, default):
    """body[name] if it has one of `types` (JSON true and false are not numbers here), `default` if absent."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, types) or isinstance(value, bool):
        raise RequestError(f"{name} has the wrong type: {type(value).__name__}", param=name)
    return value


def parse_request(body: dict) -> tuple[list[str], Settings]:
    """The prompts and settings of a /v1/completions request body; the model card's defaults where it says
    nothing (OpenAI's are meant for chat models)."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    for name, nothing in UNSUPPORTED_FIELDS.items():
        if body.get(name) not in (None, nothing):
            raise RequestError(f"{name} is not supported by this server", param=name)
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise RequestError("prompt must be a string or a non-empty list of strings", param="prompt")
    stop = body.get("stop")
    if stop is None:
        stop_sequences = DEFAULT_STOP_SEQUENCES
    else:
        stop_sequences = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop_sequences, (list, tuple)) or not all(isinstance(s, str) for s in stop_sequences):
        raise RequestError("stop must be a string or a list of strings", param="stop")
    num_completions = _typed(body, "n", (int,), 1)
    if num_completions * len(prompts) > MAX_COMPLETIONS_PER_REQUEST:
        raise RequestError(f"at most {MAX_COMPLETIONS_PER_REQUEST} completions per request", param="n")
    defaults = Settings()  # the model card's
    try:
        settings = Settings(
            max_new_tokens=_typed(body, "max_tokens", (int,), defaults.max_new_tokens),
            temperature=_typed(body, "temperature", (int, float), defaults.temperature),
            top_p=_typed(body, "top_p", (int, float), defaults.top_p),
            top_k=_typed(body, "top_k", (int,), defaults.top_k),
            num_completions=num_completions,
            stop_sequences=tuple(stop_sequences),
            seed=_typed(body, "seed", (int,), None),
        )
    except CompletionError as error:
        raise RequestError(str(error)) from error
    return prompts, settings


def choice(text: str, index: int, finish_reason: str | None) -> dict:
    return {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}


def choice_index(prompt_index: int, index: int, settings: Settings) -> int:
    """OpenAI numbers the choices of all prompts in one sequence: prompt by prompt, n each."""
    return prompt_index * settings.num_completions + index


def finish_reason(completion: Completion) -> str:
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


class CompletionServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, completer: Completer, model_id: str):
        super().__init__(address, CompletionHandler)
        self.completer = completer
        self.model_id = model_id
        self.generation_lock = threading.Lock()


class _ServerSentEvents(StreamListener):
    """Streams completions as OpenAI's text_completion chunks, one server-sent event each."""

    def __init__(self, handler: "CompletionHandler", response_id: str, settings: Settings):
        self.handler = handler
        self.response_id = response_id
        self.settings = settings
        self.choice_index = 0

    def begin(self, prompt_index, index):
        self.choice_index = choice_index(prompt_index, index, self.settings)

    def text(self, piece):
        self.send_chunk([choice(piece, self.choice_index, None)])

    def end(self, completion):
        self.send_chunk([choice("", self.choice_index, finish_reason(completion))])

    def send_chunk(self, choices: list, usage_counts: dict | None = None):
        self.send(self.handler.completion_object(self.response_id, choices, usage_counts))

    def send(self, data):
        payload = data if isinstance(data, str) else json.dumps(data)
        self.handler.wfile.write(f"data: {payload}\n\n".encode())
        self.handler.wfile.flush()


class CompletionHandler(BaseHTTPRequestHandler):
    server: CompletionServer
    server_version = "replit-code-completions/1"
    disable_nagle_algorithm = True  # each streamed piece goes out at once, not after the client's delayed ACK

    def do_GET(self):
        if self.path == "/v1/models":
            model = {"id": self.server.model_id, "object": "model", "created": 0, "owned_by": "local"}
            self.send_json({"object": "list", "data": [model]})
        elif self.path == "/health":
            self.send_json({"status": "ok"})
        else:
            self.send_error_json(RequestError(f"no such endpoint: GET {self.path}", status=HTTPStatus.NOT_FOUND))

    def do_POST(self):
        if self.path != "/v1/completions":
            self.send_error_json(RequestError(f"no such endpoint: POST {self.path}", status=HTTPStatus.NOT_FOUND))
            return
        try:
            body = self.read_json()
            prompts, settings = parse_request(body)
            if body.get("stream"):
                include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
                self.stream_completions(prompts, settings, include_usage)
            else:
                self.send_completions(prompts, settings)
        except RequestError as error:
            self.send_error_json(error)
        except CompletionError as error:  # the prompt cannot be completed as asked (empty, too long)
            self.send_error_json(RequestError(str(error), param="prompt"))
        except Exception as error:  # a failure of the server, not of the request
            self.log_error("generation failed: %s", one_line(error))
            self.send_error_json(RequestError(one_line(error), status=HTTPStatus.INTERNAL_SERVER_ERROR))

    def send_completions(self, prompts: list[str], settings: Settings):
        with self.server.generation_lock:
            completions = self.server.completer.complete(prompts, settings)
        choices = [
            choice(c.text, choice_index(c.prompt_index, c.index, settings), finish_reason(c)) for c in completions
        ]
        self.send_json(self.completion_object(f"cmpl-{uuid.uuid4().hex}", choices, usage(completions)))

    def stream_completions(self, prompts: list[str], settings: Settings, include_usage: bool):
        events = _ServerSentEvents(self, f"cmpl-{uuid.uuid4().hex}", settings)
        with self.server.generation_lock:
            # Checked before the first byte goes out, so that a bad prompt is still an HTTP 400.
            self.server.completer.check_prompts(prompts, settings)
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            try:
                completions = self.server.completer.stream(prompts, settings, events)
            except (BrokenPipeError, ConnectionResetError):
                return  # the client left: generation stopped with it
            except Exception as error:
                self.log_error("generation failed: %s", one_line(error))
                events.send({"error": {"message": one_line(error), "type": "server_error", "param": None}})
                return
        if include_usage:
            events.send_chunk([], usage(completions))
        events.send("[DONE]")

    def completion_object(self, response_id: str, choices: list, usage_counts: dict | None = None) -> dict:
        response = {
            "id": response_id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.server.model_id,
            "choices": choices,
        }
        if usage_counts is not None:
            response["usage"] = usage_counts
        return response

    def read_json(self):
        length = int(self.headers.get("Content-Length") or 0)
        try:
            return json.loads(self.rfile.read(length) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RequestError(f"the request body is not JSON: {error}") from error

    def send_json(self, data: dict, status: HTTPStatus = HTTPStatus.OK):
        payload = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def send_error_json(self, error: RequestError):
        kind = "invalid_request_error" if error.status < 500 else "server_error"
        body = {"error": {"message": str(error), "type": kind, "param": error.param, "code": None}}
        self.send_json(body, error.status)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port)")
    parser.add_argument("--served-model-name", help="the model's id in the API (default: --model's last part)")
    args = parser.parse_args(argv)
    quiet_libraries()
    try:
        completer = load_from_arguments(args)
        model_id = args.served_model_name or Path(args.model).name
        server = CompletionServer((args.host, args.port), completer, model_id)
    except Exception as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 1
    host, port = server.server_address[:2]
    # Tests and scripts read this line to learn the port.
    print(f"Serving {server.model_id} on http://{host}:{port}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0

