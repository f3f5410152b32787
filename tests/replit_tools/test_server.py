"""serve.py end to end, on 127.0.0.1 only: started with a tiny model, called with the `openai` client (plain and
streaming) and with raw HTTP; completions compared with the command line's and, under a load of concurrent clients,
with the same requests made alone; clients that leave or stall, bad requests, a request that breaks its batch
(a fault injected), full queues, authentication and browsers answered as docs/serving.md says; then stopped. Every
wait is bounded."""

import concurrent.futures
import http.client
import json
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest
import torch
from completion_helpers import DEMO, SCRIPT_ENV, hub_folder, one_torch_thread, stop_process  # noqa: F401
from conftest import ROOT

from replit_tools.completion import Settings
from replit_tools.loading import load_completer
from replit_tools.postprocessing import DEFAULT_STOP_SEQUENCES

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi", reason="serve.py needs fastapi and uvicorn (requirements.txt)")
pytest.importorskip("uvicorn", reason="serve.py needs fastapi and uvicorn (requirements.txt)")

PROMPT = "def fibonacci(n):"
STARTUP_SECONDS = 120
API_KEY = "test-key-0123"
# The strict server's limits: small enough to reach in a test.
PLAYGROUND = "http://playground.example"  # a web page's origin
STRICT = ["--api-key", API_KEY, "--max-body-bytes", "4096", "--read-timeout", "1", "--max-queued", "2",
          "--max-batch-size", "2", "--cors-origin", PLAYGROUND]  # fmt: skip


def start_server(model, *args: str, env=SCRIPT_ENV, program=(str(ROOT / "serve.py"),)) -> tuple[subprocess.Popen, str]:
    """serve.py (or `program`, Python's arguments) on a free port (it prints its address once the model is loaded)."""
    command = [sys.executable, *program, "--model", str(model), "--port", "0",
               "--served-model-name", "tiny", "--log-level", "warning", *args]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        ready, _, _ = select.select([server.stdout], [], [], STARTUP_SECONDS)
        line = server.stdout.readline() if ready else ""
        assert line.startswith("Serving "), f"serve.py did not start in {STARTUP_SECONDS} s: {line!r}"
        return server, line.split(" on ")[1].strip()
    except BaseException:
        stop_process(server)
        raise


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return hub_folder(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def served(tiny):
    server, base_url = start_server(tiny)
    try:
        yield base_url, openai.OpenAI(base_url=base_url, api_key="unused", timeout=60, max_retries=0)
    finally:
        stop_process(server)


@pytest.fixture(scope="module")
def strict(tiny):
    """A server with an API key, small limits, and one web origin allowed."""
    server, base_url = start_server(tiny, *STRICT)
    try:
        yield base_url
    finally:
        stop_process(server)


@pytest.fixture(scope="module")
def demo_served():
    if not (DEMO / "config.json").exists():
        pytest.skip("the demo model (demo/) is not built")
    server, base_url = start_server(DEMO)
    try:
        yield base_url
    finally:
        stop_process(server)


# serve.py with faults injected into generation, by prompt: a batch with a prompt that says BROKEN fails (an error of
# the model), one with REFUSED too (a CompletionError: a request that cannot be served), one with SLOW starts after
# 2 s (the requests that arrive meanwhile queue, and share the next batch), and a batch where a prompt that says
# LATE runs with others fails once another row has streamed text (once: alone, that prompt is completed).
FAULTY_SERVE = """
import sys, time
from replit_tools.completion import Completer, CompletionError
from replit_tools.server import main

generate_rows = Completer.generate_rows
late_failures = []


def faulty(self, rows, settings):
    prompts = " ".join(row.prompt_text for row in rows)
    if "SLOW" in prompts:
        time.sleep(2)
    if "BROKEN" in prompts:
        raise RuntimeError("the model broke")
    if "REFUSED" in prompts:
        raise CompletionError("this prompt is refused")
    late = [row for row in rows if "LATE" in row.prompt_text]
    others = [row for row in rows if row not in late]

    def fail_late():
        if not late_failures and any(row.streamed and not row.done for row in others):
            late_failures.append(1)
            raise RuntimeError("the model broke late")
        return False

    for row in late:
        row.cancelled = fail_late
    generate_rows(self, rows, settings)


Completer.generate_rows = faulty
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def faulty_served():
    if not (DEMO / "config.json").exists():
        pytest.skip("the demo model (demo/) is not built")
    server, base_url = start_server(DEMO, program=("-c", FAULTY_SERVE), env={**SCRIPT_ENV, "PYTHONPATH": str(ROOT)})
    try:
        yield base_url
    finally:
        stop_process(server)


def greedy(model, prompts, max_new_tokens=24, n=1, stops=DEFAULT_STOP_SEQUENCES) -> list[str]:
    """The command line's greedy completions (in process)."""
    settings = Settings(greedy=True, max_new_tokens=max_new_tokens, num_completions=n, stop_sequences=stops)
    return [completion.text for completion in load_completer(model).complete(prompts, settings)]


# --- HTTP helpers: bounded in time ------------------------------------------------------------------------------


def address(base_url: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(base_url)
    return parts.hostname, parts.port


def call(base_url: str, body, path="/completions", headers=None, method="POST", timeout=60):
    """(status, headers, answer): the JSON answer, or for a stream {"texts", "finish", "usage"} by choice index."""
    connection = http.client.HTTPConnection(*address(base_url), timeout=timeout)
    try:
        data = None if body is None else body if isinstance(body, (bytes, str)) else json.dumps(body)
        connection.request(method, "/v1" + path, data, {"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        if response.getheader("Content-Type", "").startswith("text/event-stream"):
            return response.status, response.headers, read_stream(response)
        return response.status, response.headers, json.loads(response.read() or b"null")
    finally:
        connection.close()


def read_stream(response) -> dict:
    texts, finish, usage, done = {}, {}, None, False
    for line in response:
        line = line.decode().strip()
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            done = True
            break
        chunk = json.loads(line[len("data: ") :])
        assert "error" not in chunk, chunk
        for choice in chunk["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
            if choice["finish_reason"]:
                finish[choice["index"]] = choice["finish_reason"]
        usage = chunk.get("usage") or usage
    assert done, "the stream ended without [DONE]"
    return {"texts": texts, "finish": finish, "usage": usage}


def answer_head(base_url: str, method: str, path: str, headers=None) -> tuple[int, http.client.HTTPMessage]:
    """The status and headers of a request without a body (the answer's body, whatever it is, is dropped)."""
    connection = http.client.HTTPConnection(*address(base_url), timeout=30)
    try:
        connection.request(method, "/v1" + path, headers=headers or {})
        response = connection.getresponse()
        response.read()
        return response.status, response.headers
    finally:
        connection.close()


def raw(base_url: str, data: bytes, wait: float = 10) -> bytes:
    """What the server answers to `data` sent as is, read until it closes the connection (or `wait` seconds)."""
    with socket.create_connection(address(base_url), timeout=wait) as sock:
        sock.sendall(data)
        answer, deadline = b"", time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                piece = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not piece:
                break
            answer += piece
            head, _, rest = answer.partition(b"\r\n\r\n")
            lines = head.lower().split(b"\r\n")
            lengths = [line.split(b":")[1] for line in lines if line.startswith(b"content-length:")]
            if lengths and len(rest) >= int(lengths[0]):
                break  # the whole answer (the connection may stay open)
        return answer


def stats(base_url: str) -> dict:
    connection = http.client.HTTPConnection(*address(base_url), timeout=30)
    try:
        connection.request("GET", "/health")
        return json.loads(connection.getresponse().read())
    finally:
        connection.close()


def wait_until(condition, seconds: float = 20):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


# --- Completions ------------------------------------------------------------------------------------------------


def test_completions_plain_and_streaming_equal_the_command_lines(tiny, served):
    base_url, client = served
    # The tiny random model may write nothing but whitespace after a prompt (its vocabulary is trained on this
    # repository's files, so any commit can change that): the first prompt it completes with text is used.
    prompts = (PROMPT, "import os\n", "x = 1\n", "class Stack:\n", "for i in range(3):\n")
    prompt, expected = next(((p, text) for p in prompts if (text := greedy(tiny, [p])[0])), (None, None))
    assert prompt is not None, f"the tiny model completes none of {prompts} with text"
    plain = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0)
    assert plain.choices[0].text == expected
    assert plain.choices[0].finish_reason in ("stop", "length") and plain.model == "tiny"
    assert plain.usage.completion_tokens >= 1 and plain.usage.prompt_tokens >= 1

    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0, stream=True))
    assert "".join(choice.text for chunk in chunks for choice in chunk.choices) == expected
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    # One chunk per piece of text released, then the finishing one. How many pieces there are depends on the tiny
    # random model (some of its tokens decode to nothing); that they arrive while generating is what the mid-stream
    # disconnect test relies on.
    assert len(chunks) >= 2 and chunks[-1].choices[0].text == ""


def test_several_prompts_completions_and_stop_sequences(tiny, served):
    _, client = served
    prompts = [PROMPT, "import os\n"]
    expected = greedy(tiny, prompts, n=2, stops=("\n",))
    for stream in (False, True):
        response = client.completions.create(
            model="tiny", prompt=prompts, n=2, max_tokens=24, temperature=0, stop="\n", stream=stream,
            stream_options={"include_usage": True} if stream else None,
        )  # fmt: skip
        chunks = list(response) if stream else [response]
        texts = ["", "", "", ""]
        for chunk in chunks:
            for choice in chunk.choices:
                texts[choice.index] += choice.text
        assert texts == expected
        assert chunks[-1].usage.prompt_tokens > 0 and chunks[-1].usage.completion_tokens >= 4


def test_sampled_completions_with_a_seed_repeat(served):
    base_url, _ = served
    body = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0.8, "n": 3, "seed": 7, "stop": []}
    first, second = call(base_url, body), call(base_url, body)
    assert first[0] == second[0] == 200
    assert [c["text"] for c in first[2]["choices"]] == [c["text"] for c in second[2]["choices"]]


def test_whole_and_tiny_temperatures_are_served(served):
    """The openai client sends temperature=2 as the JSON integer 2, which transformers' sampling refuses as a
    temperature (a 500 before); a temperature too small to sample with is greedy, as 0 is (it failed inside the
    sampling)."""
    base_url, _ = served
    body = {"prompt": PROMPT, "max_tokens": 8, "stop": [], "seed": 3}
    for temperature in (2, 5, 2.0):
        status, _, answer = call(base_url, {**body, "temperature": temperature})
        assert status == 200 and len(answer["choices"]) == 1, answer
    greedy_answer = call(base_url, {**body, "temperature": 0})[2]["choices"][0]["text"]
    for temperature in (1e-300, 1e-40, 1e-6):
        status, _, answer = call(base_url, {**body, "temperature": temperature})
        assert status == 200 and answer["choices"][0]["text"] == greedy_answer, (temperature, answer)


def test_models_and_health(served):
    base_url, client = served
    assert [model.id for model in client.models.list()] == ["tiny"]
    assert stats(base_url)["status"] == "ok"


def test_head_answers_the_read_only_endpoints_like_get(served, strict):
    """HEAD (load balancers' and uptime checks' probe) was a 405. On one keep-alive connection, so that a body sent
    after a HEAD answer would garble the next answer."""
    connection = http.client.HTTPConnection(*address(served[0]), timeout=30)
    try:
        for path in ("/health", "/v1/models"):
            connection.request("HEAD", path)
            head = connection.getresponse()
            assert head.status == 200 and head.read() == b"" and head.getheader("Content-Type") == "application/json"
            connection.request("GET", path)
            assert json.loads(connection.getresponse().read())
    finally:
        connection.close()
    status, headers, _ = call(served[0], None, path="/completions", method="HEAD")
    assert status == 405 and headers["Allow"] == "POST"
    allowed = call(served[0], None, path="/models", method="POST")[1]["Allow"]
    assert sorted(allowed.split(", ")) == ["GET", "HEAD"]
    assert call(strict, None, path="/models", method="HEAD")[0] == 401
    assert call(strict, None, path="/models", method="HEAD", headers={"Authorization": f"Bearer {API_KEY}"})[0] == 200


def test_concurrent_clients_are_batched_and_answered_as_alone(served):
    """32 clients at once, different requests (prompts, budgets, stop sequences, n, plain and streaming): none
    dropped, every answer equal to the same request made alone, and the model ran them in batches."""
    base_url, _ = served
    prompts = [PROMPT, "import os\n", "class Stack:\n    def push(self, item):", "def add(a, b):\n    return",
               "for i in range(10):", "# a comment\n", "def main():\n", "x = ["]  # fmt: skip
    requests = [
        {"prompt": prompts[i % len(prompts)], "max_tokens": 6 + (i * 7) % 30, "temperature": 0,
         "stop": ["\n"] if i % 3 == 0 else None, "n": 2 if i % 5 == 0 else 1, "stream": i % 2 == 0}
        for i in range(32)
    ]  # fmt: skip
    alone = [call(base_url, body) for body in requests]
    before = stats(base_url)
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda body: call(base_url, body), requests, timeout=120))
    after = stats(base_url)
    for body, (status, _, answer), (status_alone, _, answer_alone) in zip(requests, together, alone):
        assert status == status_alone == 200, answer
        if body["stream"]:
            assert answer["texts"] == answer_alone["texts"] and answer["finish"] == answer_alone["finish"], body
        else:
            assert answer["choices"] == answer_alone["choices"], body
    assert after["requests"] - before["requests"] == len(requests)
    assert after["batches"] - before["batches"] < len(requests) / 2  # batched, not one by one
    assert after["max_batch_rows"] > 1


# --- Clients that leave -----------------------------------------------------------------------------------------

# Seconds of work for the demo model: inside a docstring it has opened, it writes until the budget runs out.
# A request the demo model answers with all 1000 tokens (greedy, it goes on counting), so that a client can leave
# while it runs; the demo's greedy docstring after PROMPT now ends after 21 tokens, too soon to leave.
LONG = {"prompt": "x = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,", "max_tokens": 1000, "temperature": 0, "stop": []}


def send_request(base_url: str, body: dict) -> socket.socket:
    """A connection that has sent `body` to /v1/completions; closing it leaves the request."""
    sock = socket.create_connection(address(base_url), timeout=30)
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))  # fmt: skip
    return sock


def test_a_client_leaving_mid_stream_frees_the_model(demo_served):
    before = stats(demo_served)
    with send_request(demo_served, {**LONG, "stream": True}) as sock:
        received, deadline = b"", time.monotonic() + 30
        while b"data: " not in received and time.monotonic() < deadline:  # until generation has begun
            received += sock.recv(65536)
        assert b"data: " in received
    assert wait_until(lambda: stats(demo_served)["cancelled_rows"] == before["cancelled_rows"] + 1)
    after = stats(demo_served)
    assert after["running_rows"] == 0
    assert after["generated_tokens"] - before["generated_tokens"] < LONG["max_tokens"]


def test_a_client_leaving_a_plain_request_frees_the_model(demo_served):
    before = stats(demo_served)
    with send_request(demo_served, LONG):
        assert wait_until(lambda: stats(demo_served)["running_rows"] == 1)
    assert wait_until(lambda: stats(demo_served)["cancelled_rows"] == before["cancelled_rows"] + 1)
    after = stats(demo_served)
    assert after["running_rows"] == 0
    assert after["generated_tokens"] - before["generated_tokens"] < LONG["max_tokens"]
    # The model is free: a short request is answered at once.
    started = time.monotonic()
    assert call(demo_served, {"prompt": PROMPT, "max_tokens": 4})[0] == 200
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("stream", [False, True])
def test_a_short_request_is_answered_before_the_long_one_in_its_batch(demo_served, stream):
    """A request queued with a long one shares its batch, and is answered as soon as its own rows are done, not when
    the batch ends (an editor's 4-token completion held for someone's 1000 tokens)."""
    short = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stream": stream}
    with concurrent.futures.ThreadPoolExecutor(1) as pool, send_request(demo_served, LONG) as busy:
        assert wait_until(lambda: stats(demo_served)["running_rows"] == 1)
        with send_request(demo_served, LONG):
            answered = pool.submit(call, demo_served, short)
            assert wait_until(lambda: stats(demo_served)["queued_requests"] == 2)
            busy.close()  # its client leaves: the two waiting requests share the next batch
            status, _, answer = answered.result(timeout=60)
            assert status == 200, answer
            # The long one of the batch is still being written: its row alone is left running.
            assert stats(demo_served)["running_rows"] == 1
    assert wait_until(lambda: stats(demo_served)["running_rows"] == 0)


def test_demo_model_serves(demo_served):
    client = openai.OpenAI(base_url=demo_served, api_key="unused", timeout=60, max_retries=0)
    plain = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=32, temperature=0)
    streamed = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=32, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == plain.choices[0].text
    assert plain.choices[0].text == greedy(DEMO, [PROMPT], max_new_tokens=32)[0]


# --- A request that breaks its batch ----------------------------------------------------------------------------


def behind_a_slow_request(base_url: str, pool, run: dict):
    """Starts the requests of `run` (name: function of the base URL) while a slow request holds the model, so that
    they share the next batch; their answers by name, and how many batches the model ran meanwhile."""
    slow = pool.submit(call, base_url, {"prompt": "# SLOW\n", "max_tokens": 2, "temperature": 0})
    assert wait_until(lambda: stats(base_url)["running_rows"] == 1)
    before = stats(base_url)["batches"]
    answers = {name: pool.submit(request, base_url) for name, request in run.items()}
    assert wait_until(lambda: stats(base_url)["queued_requests"] == len(run))
    assert slow.result(timeout=30)[0] == 200
    answers = {name: answer.result(timeout=60) for name, answer in answers.items()}
    return answers, stats(base_url)["batches"] - before


def test_a_request_that_breaks_its_batch_fails_alone(faulty_served):
    """A batch broken by one request failed every request in it. Its requests are now run again one by one: the
    others get their completions, the bad ones their error (500 for the model's, 400 for a request refused)."""
    base_url = faulty_served
    good = {
        "plain": {"prompt": PROMPT, "max_tokens": 8, "temperature": 0},
        "streamed": {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stream": True},
        "two": {"prompt": "import os\n", "max_tokens": 8, "temperature": 0, "n": 2},
    }
    bad = {name: {"prompt": f"# {name}\n", "max_tokens": 8, "temperature": 0} for name in ("BROKEN", "REFUSED")}
    requests = {**good, **bad}
    with concurrent.futures.ThreadPoolExecutor(len(requests) + 1) as pool:
        run = {name: lambda url, body=body: call(url, body) for name, body in requests.items()}
        answers, batches = behind_a_slow_request(base_url, pool, run)
    assert batches == 1 + 1 + len(requests)  # the slow one's, the broken one, then each request alone
    for name, body in good.items():
        (status, _, answer), alone = answers[name], call(base_url, body)[2]
        # A plain answer is compared by its choices, a stream's as `call` reads it: {"texts", "finish", "usage"}.
        assert status == 200 and (answer.get("choices") or answer.get("texts")), name
        assert answer.get("choices", answer) == alone.get("choices", alone), name
    status, _, answer = answers["BROKEN"]
    assert status == 500 and answer["error"] == {"message": "the model broke", "type": "server_error",
                                                 "param": None, "code": None}  # fmt: skip
    status, _, answer = answers["REFUSED"]
    assert status == 400 and answer["error"]["message"] == "this prompt is refused"
    assert answer["error"]["type"] == "invalid_request_error"


def test_a_stream_that_had_begun_when_its_batch_failed_ends_with_an_error(faulty_served):
    """A stream cannot start again without repeating what it sent: when its batch fails after its first text, it
    ends with an error event (which the openai client raises), while the batch's other requests run again alone."""
    base_url = faulty_served
    client = openai.OpenAI(base_url=base_url, api_key="unused", timeout=60, max_retries=0)

    def stream(_):
        texts = []
        try:
            for chunk in client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0,
                                                   stream=True):  # fmt: skip
                texts.append(chunk.choices[0].text)
        except openai.APIError as error:
            return "".join(texts), error.message
        return "".join(texts), None

    late = {"prompt": "# LATE\n" + LONG["prompt"], "max_tokens": 40, "temperature": 0, "stop": []}
    plain = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    run = {"stream": stream, "late": lambda url: call(url, late), "plain": lambda url: call(url, plain)}
    with concurrent.futures.ThreadPoolExecutor(len(run) + 1) as pool:
        answers, batches = behind_a_slow_request(base_url, pool, run)
    # The slow one, the shared one, LATE alone, and the plain request alone unless it had finished in the shared
    # batch before LATE broke it (its 8 tokens against the stream's first text: once in a CI run); never the stream.
    assert batches in (1 + 1 + 1, 1 + 1 + 2)
    text, error = answers["stream"]
    assert error == "generation failed in a batch shared with other requests after this stream had begun: retry"
    assert text and greedy(DEMO, [PROMPT], max_new_tokens=24)[0].startswith(text)  # what it sent, once
    for name, body in (("late", late), ("plain", plain)):
        assert answers[name][0] == 200 and answers[name][2]["choices"] == call(base_url, body)[2]["choices"], name


# --- Bad requests -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["", "   \n\t"])
@pytest.mark.parametrize("stream", [False, True])
def test_empty_prompt_is_a_clear_400(served, prompt, stream):
    _, client = served
    with pytest.raises(openai.BadRequestError, match="empty"):
        client.completions.create(model="tiny", prompt=prompt, max_tokens=8, stream=stream)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": PROMPT, "max_tokens": 125}, "prompt"),  # with the prompt, longer than the tiny model's context
        ({"prompt": PROMPT, "max_tokens": 500}, "max_tokens"),  # longer than the context by itself
        ({"prompt": PROMPT}, "max_tokens"),  # the default, 128, is the tiny model's whole context
        ({"prompt": PROMPT * 1000, "max_tokens": 8}, "prompt"),  # refused on its length in characters
        ({"prompt": PROMPT, "max_tokens": 8, "temperature": -1}, "temperature"),
        ('{"prompt": "x", "max_tokens": 8, "temperature": Infinity}', "temperature"),
        ('{"prompt": "x", "max_tokens": 8, "temperature": NaN}', "temperature"),
        ({"prompt": PROMPT, "max_tokens": 8, "top_p": 0}, "top_p"),
        ({"prompt": PROMPT, "max_tokens": 8, "top_k": 1.5}, "top_k"),
        ({"prompt": PROMPT, "max_tokens": "many"}, "max_tokens"),
        ({"prompt": PROMPT, "max_tokens": True}, "max_tokens"),
        ({"prompt": PROMPT, "max_tokens": 8, "seed": -1}, "seed"),
        ({"prompt": PROMPT, "max_tokens": 8, "seed": 2**64}, "seed"),
        ({"prompt": PROMPT, "max_tokens": 8, "n": 0}, "n"),
        ({"prompt": PROMPT, "max_tokens": 8, "n": 17}, "n"),
        ({"prompt": PROMPT, "max_tokens": 8, "stream": "yes"}, "stream"),
        ({"prompt": PROMPT, "max_tokens": 8, "stream": True, "stream_options": "x"}, "stream_options"),
        ({"prompt": PROMPT, "max_tokens": 8, "stream": True, "stream_options": {"include_usage": 1}}, "stream_options"),
        ({"prompt": PROMPT, "max_tokens": 8, "stream_options": {"include_usage": True}}, "stream_options"),
        ({"prompt": PROMPT, "max_tokens": 8, "stop": [""]}, "stop"),
        ({"prompt": PROMPT, "max_tokens": 8, "stop": 3}, "stop"),
        ({"prompt": "\x01\x02", "max_tokens": 8}, "prompt"),  # no tokens: SentencePiece drops control characters
        ({"prompt": "def f(\ud800):"}, "prompt"),  # a lone surrogate (json.dumps writes it as \ud800)
        ({"prompt": PROMPT, "max_tokens": 8, "stop": ["\udfff"]}, "stop"),
        ({"prompt": PROMPT, "max_tokens": 8, "logprobs": 3}, "logprobs"),
        ({"prompt": PROMPT, "max_tokens": 8, "suffix": "\n    return x"}, "suffix"),
        ({"prompt": [1, 2, 3]}, "prompt"),
        ({"prompt": [PROMPT] * 17}, "prompt"),
        ({}, "prompt"),
        ([PROMPT], None),
        ("{not json", None),
        (b'{"prompt": "\xff"}', None),  # not UTF-8
        ('{"prompt": "x", "max_tokens": 8}'.encode("utf-16"), None),  # JSON, but not UTF-8 either
        ("[" * 100000, None),  # nested too deep for the parser
    ],
)
def test_bad_requests_are_a_clear_400(served, body, param):
    status, _, answer = call(served[0], body)
    assert status == 400, answer
    assert answer["error"]["type"] == "invalid_request_error" and answer["error"]["param"] == param
    assert answer["error"]["message"]
    if param and body and isinstance(body, dict) and param in body:
        assert param in answer["error"]["message"]


def test_bad_http_is_a_4xx_not_a_500(served, strict):
    base_url = served[0]
    head = b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
    assert raw(base_url, head + b"Content-Length: abc\r\n\r\n{}").startswith(b"HTTP/1.1 400 ")
    answer = raw(base_url, head + b"Content-Length: 1000000000000000\r\n\r\n{}")
    assert answer.startswith(b"HTTP/1.1 413 ") and b"larger than" in answer
    assert raw(base_url, b"GET /v1/nowhere HTTP/1.1\r\nHost: test\r\n\r\n").startswith(b"HTTP/1.1 404 ")
    # Headers beyond h11's 16 KiB are not buffered further.
    assert raw(base_url, b"GET / HTTP/1.1\r\nHost: test\r\nX: " + b"y" * 20000).startswith(b"HTTP/1.1 400 ")
    # A body over --max-body-bytes (4096 on the strict server), whether its length is declared or chunked.
    status, headers, answer = call(strict, {"prompt": "x" * 5000}, headers={"Authorization": f"Bearer {API_KEY}"})
    assert status == 413 and "4096" in answer["error"]["message"]
    chunked = b"".join(b"%x\r\n%s\r\n" % (1000, b" " * 1000) for _ in range(5)) + b"0\r\n\r\n"
    answer = raw(strict, head + f"Authorization: Bearer {API_KEY}\r\n".encode()
                 + b"Transfer-Encoding: chunked\r\n\r\n" + chunked)  # fmt: skip
    assert answer.startswith(b"HTTP/1.1 413 ")


# --- Limits: slow clients, full queue ---------------------------------------------------------------------------


def test_slow_clients_time_out_and_do_not_hold_the_server(strict):
    """--read-timeout 1: a client that never finishes its headers, or its body, gets 408 and is disconnected;
    meanwhile, others are served."""
    started = time.monotonic()
    stalled = []
    try:
        for _ in range(50):
            sock = socket.create_connection(address(strict), timeout=10)
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: te")
            stalled.append(sock)
        status = call(strict, {"prompt": PROMPT, "max_tokens": 4}, headers={"Authorization": f"Bearer {API_KEY}"})[0]
        assert status == 200
        for sock in stalled:
            answer = sock.recv(1024)
            assert answer.startswith(b"HTTP/1.1 408 "), answer
    finally:
        for sock in stalled:
            sock.close()
    assert time.monotonic() - started < 8
    half_body = (b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\n"
                 b"Authorization: Bearer %s\r\n\r\n{\"prompt\"" % API_KEY.encode())  # fmt: skip
    started = time.monotonic()
    assert raw(strict, half_body).startswith(b"HTTP/1.1 408 ")
    assert 0.5 < time.monotonic() - started < 8


def test_a_full_queue_is_a_429_with_retry_after(strict):
    """--max-queued 2, --max-batch-size 2: of a burst of 12 requests, those that find 2 waiting are refused."""
    body = {"prompt": PROMPT, "max_tokens": 60, "temperature": 0, "stop": []}
    barrier = threading.Barrier(12)

    def request(_):
        barrier.wait(timeout=30)
        return call(strict, body, headers={"Authorization": f"Bearer {API_KEY}"})

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(request, range(12), timeout=120))
    statuses = sorted(status for status, _, _ in answers)
    assert set(statuses) == {200, 429} and statuses.count(200) >= 2, statuses
    for status, headers, answer in answers:
        if status == 429:
            assert headers["Retry-After"] == "1" and "busy" in answer["error"]["message"]


def test_a_request_larger_than_a_batch_is_refused(strict):
    """--max-batch-size 2: a request runs in one batch, so 3 completions (prompts times n) are a 400, not a batch of
    3."""
    auth = {"Authorization": f"Bearer {API_KEY}"}
    for body in ({"prompt": PROMPT, "max_tokens": 2, "n": 3}, {"prompt": [PROMPT] * 3, "max_tokens": 2}):
        status, _, answer = call(strict, body, headers=auth)
        assert status == 400 and "at most 2" in answer["error"]["message"], answer
    assert call(strict, {"prompt": PROMPT, "max_tokens": 2, "n": 2}, headers=auth)[0] == 200
    assert stats(strict)["max_batch_rows"] <= 2


# --- Browsers ---------------------------------------------------------------------------------------------------


def test_cors_only_for_the_origins_given(served, strict):
    """--cors-origin (the strict server has one): a browser's preflight OPTIONS is answered before authentication (a
    browser sends no key with it), and the answers to that origin, errors included, carry Access-Control-Allow-Origin.
    Another origin, or a server without the flag, gets no CORS headers; OPTIONS there is a 405 that says Allow."""
    preflight = {"Origin": PLAYGROUND, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"}  # fmt: skip
    status, headers = answer_head(strict, "OPTIONS", "/completions", preflight)
    assert status == 200 and headers["Access-Control-Allow-Origin"] == PLAYGROUND
    assert "POST" in headers["Access-Control-Allow-Methods"]
    assert headers["Access-Control-Allow-Headers"] == preflight["Access-Control-Request-Headers"]
    body = {"prompt": PROMPT, "max_tokens": 2}
    for stream in (False, True):
        for key, expected in (({"Authorization": f"Bearer {API_KEY}"}, 200), ({}, 401)):
            status, headers, _ = call(strict, {**body, "stream": stream}, headers={"Origin": PLAYGROUND, **key})
            assert status == expected and headers["Access-Control-Allow-Origin"] == PLAYGROUND
            assert headers["Access-Control-Expose-Headers"] == "Retry-After"
    elsewhere = {"Origin": "http://elsewhere.example"}
    status, headers, _ = call(strict, body, headers={**elsewhere, "Authorization": f"Bearer {API_KEY}"})
    assert status == 200 and "Access-Control-Allow-Origin" not in headers
    status, headers = answer_head(strict, "OPTIONS", "/completions", {**preflight, **elsewhere})
    assert status == 400 and "Access-Control-Allow-Origin" not in headers

    base_url = served[0]
    for path, allowed in (("/completions", ["POST"]), ("/models", ["GET", "HEAD"])):
        status, headers, answer = call(base_url, None, path=path, method="OPTIONS", headers=preflight)
        assert status == 405 and sorted(headers["Allow"].split(", ")) == allowed, answer
        assert answer["error"]["type"] == "invalid_request_error"
        assert not any(name.lower().startswith("access-control-") for name in headers)
    status, headers, _ = call(base_url, body, headers={"Origin": PLAYGROUND})
    assert status == 200 and not any(name.lower().startswith("access-control-") for name in headers)


@pytest.mark.parametrize("origin", ["http://localhost:5173/", "localhost:5173", "http://", "ftp://x", "http://a/b"])
def test_a_cors_origin_a_browser_never_sends_is_refused(origin, capsys):
    """An origin with a path (a trailing "/" too) or without a scheme would never match a browser's Origin header."""
    from replit_tools.commands import server_arguments

    with pytest.raises(SystemExit) as exit:
        server_arguments(["--cors-origin", origin])
    assert exit.value.code == 2 and "--cors-origin" in capsys.readouterr().err
    assert server_arguments(["--cors-origin", "*", "--cors-origin", PLAYGROUND]).cors_origin == ["*", PLAYGROUND]


# --- Authentication ---------------------------------------------------------------------------------------------


def test_api_key(strict):
    body = {"prompt": PROMPT, "max_tokens": 4}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        status, response_headers, answer = call(strict, body, headers=headers)
        assert status == 401 and response_headers["WWW-Authenticate"] == "Bearer"
        assert answer["error"]["code"] == "invalid_api_key"
    assert call(strict, None, path="/models", method="GET")[0] == 401
    assert stats(strict)["status"] == "ok"  # /health stays open
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=strict, api_key="wrong", max_retries=0).models.list()
    client = openai.OpenAI(base_url=strict, api_key=API_KEY, timeout=60, max_retries=0)
    assert client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4).choices[0].finish_reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="the Triton kernel runs here")
def test_a_server_that_could_answer_nothing_does_not_start(tiny):
    """attn_impl='triton' without a GPU (and without Triton's interpreter): refused at start, in one line, rather
    than a server whose every request would fail."""
    env = {name: value for name, value in SCRIPT_ENV.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(ROOT / "serve.py"), "--model", str(tiny), "--attn-impl", "triton",
                             "--port", "0"], capture_output=True, timeout=120, env=env, text=True)  # fmt: skip
    assert result.returncode == 1 and result.stdout == "", result.stdout
    assert result.stderr.startswith("error: attn_impl='triton' needs a CUDA device") and result.stderr.count("\n") == 1


def test_listening_beyond_localhost_needs_a_key(tiny, capsys, monkeypatch):
    """Refused with a one-line error before the model loads or a port opens."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "serve.py"), "--model", str(tiny), "--host", "0.0.0.0", "--port", "0"],
        capture_output=True, text=True, timeout=120, env={**SCRIPT_ENV, "REPLIT_API_KEY": ""},
    )  # fmt: skip
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--api-key" in lines[0] and "--allow-unauthenticated" in lines[0]

    from replit_tools import server

    monkeypatch.delenv("REPLIT_API_KEY", raising=False)
    for host in ("::", "192.168.1.10", "example.org"):
        assert server.main(["--model", "/nowhere", "--host", host]) == 2
        assert "--allow-unauthenticated" in capsys.readouterr().err
    assert [server.is_loopback(host) for host in ("127.0.0.1", "127.1.2.3", "::1", "localhost")] == [True] * 4


@pytest.mark.parametrize("key", ["", " key", "key\n", "sekr\u00eft", "a\tb"])
def test_an_api_key_no_request_could_carry_is_refused(key, capsys):
    """An empty key let a bare "Authorization: Bearer" in, past the guard on listening beyond localhost; the
    others could never be matched (a header is printable ASCII, its ends stripped)."""
    from replit_tools.commands import server_arguments

    with pytest.raises(SystemExit) as exit:
        server_arguments(["--host", "0.0.0.0", "--api-key", key])
    assert exit.value.code == 2 and "--api-key" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_a_read_timeout_that_is_no_positive_number_is_refused(value, capsys):
    """NaN passed a `<= 0` check, and a deadline of NaN seconds fires at once: every slow request was a 408."""
    from replit_tools.commands import server_arguments

    with pytest.raises(SystemExit) as exit:
        server_arguments(["--read-timeout", value])
    assert exit.value.code == 2 and "--read-timeout must be positive" in capsys.readouterr().err


@pytest.mark.parametrize("port", ["-1", "65536"])
def test_a_port_out_of_range_is_refused(port):
    """socket.bind raises OverflowError for it, which is no OSError: serve.py ended in a traceback."""
    done = subprocess.run([sys.executable, str(ROOT / "serve.py"), "--port", port], capture_output=True, text=True,
                          timeout=60, env=SCRIPT_ENV)  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"error: --port must be 0 to 65535 (0: any free port), got {port}" in done.stderr


def test_a_port_in_use_is_told_before_the_model_loads():
    """The port is bound first: a user learns it is taken at once, not after loading the model (here the model
    folder does not even exist)."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])
        done = subprocess.run([sys.executable, str(ROOT / "serve.py"), "--model", "/nonexistent/replit", "--port",
                               port], capture_output=True, text=True, timeout=120, env=SCRIPT_ENV)  # fmt: skip
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("error: ") and "in use" in done.stderr and done.stderr.count("\n") == 1


def test_stopping_answers_the_open_requests():
    """SIGTERM while a plain and a streamed request run: both are answered at once, the plain one with a 503 in
    OpenAI's error shape and the stream with an error event (they were cut off without an answer when uvicorn's
    wait for them ran out), and the server exits."""
    if not (DEMO / "config.json").exists():
        pytest.skip("the demo model (demo/) is not built")
    server, base_url = start_server(DEMO)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool, send_request(base_url, {**LONG, "stream": True}) as sock:
            plain = pool.submit(call, base_url, LONG)
            assert wait_until(lambda: stats(base_url)["running_rows"] + stats(base_url)["queued_requests"] == 2)
            server.terminate()
            stopped = time.monotonic()
            status, _, answer = plain.result(timeout=30)
            assert status == 503 and answer["error"]["message"] == "the server is shutting down", answer
            streamed = b""
            while piece := sock.recv(65536):
                streamed += piece
            last_event = streamed.rsplit(b"data: ", 1)[1].split(b"\n\n")[0]
            assert json.loads(last_event)["error"]["message"] == "the server is shutting down"
            assert time.monotonic() - stopped < 4
        server.wait(timeout=30)
    finally:
        stop_process(server)
