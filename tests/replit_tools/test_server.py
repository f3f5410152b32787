"""serve.py end to end: started on 127.0.0.1 with a tiny model, called with the `openai` client (plain and
streaming), its completions compared with the command line's, bad requests answered with HTTP 4xx; then stopped."""

import json
import select
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from completion_helpers import DEMO, SCRIPT_ENV, hub_folder, one_torch_thread  # noqa: F401
from conftest import ROOT

from replit_tools.completion import Settings
from replit_tools.loading import load_completer
from replit_tools.postprocessing import DEFAULT_STOP_SEQUENCES

openai = pytest.importorskip("openai")

PROMPT = "def fibonacci(n):"
STARTUP_SECONDS = 120


def start_server(model) -> tuple[subprocess.Popen, str]:
    """serve.py on a free port (it prints its address once the model is loaded)."""
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "serve.py"), "--model", str(model), "--port", "0", "--served-model-name", "tiny"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=SCRIPT_ENV,
    )
    try:
        ready, _, _ = select.select([server.stdout], [], [], STARTUP_SECONDS)
        line = server.stdout.readline() if ready else ""
        assert line.startswith("Serving "), f"serve.py did not start in {STARTUP_SECONDS} s: {line!r}"
        return server, line.split(" on ")[1].strip()
    except BaseException:
        stop_server(server)
        raise


def stop_server(server: subprocess.Popen):
    server.terminate()
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return hub_folder(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def served(tiny):
    server, base_url = start_server(tiny)
    try:
        yield base_url, openai.OpenAI(base_url=base_url, api_key="unused", timeout=60, max_retries=0)
    finally:
        stop_server(server)


def greedy(model, prompts, max_new_tokens=24, n=1, stops=DEFAULT_STOP_SEQUENCES) -> list[str]:
    """The command line's greedy completions (in process)."""
    settings = Settings(greedy=True, max_new_tokens=max_new_tokens, num_completions=n, stop_sequences=stops)
    return [completion.text for completion in load_completer(model).complete(prompts, settings)]


def test_completions_plain_and_streaming_equal_the_command_lines(tiny, served):
    base_url, client = served
    expected = greedy(tiny, [PROMPT])[0]
    plain = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0)
    assert plain.choices[0].text == expected
    assert plain.choices[0].finish_reason in ("stop", "length") and plain.model == "tiny"
    assert plain.usage.completion_tokens >= 1 and plain.usage.prompt_tokens >= 1

    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0, stream=True))
    assert "".join(choice.text for chunk in chunks for choice in chunk.choices) == expected
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert len(chunks) > 2  # the text came in pieces


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


def test_models_endpoint(served):
    _, client = served
    assert [model.id for model in client.models.list()] == ["tiny"]


@pytest.mark.parametrize("prompt", ["", "   \n\t"])
@pytest.mark.parametrize("stream", [False, True])
def test_empty_prompt_is_a_clear_400(served, prompt, stream):
    _, client = served
    with pytest.raises(openai.BadRequestError, match="empty"):
        client.completions.create(model="tiny", prompt=prompt, max_tokens=8, stream=stream)


def post(base_url: str, body) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{base_url}/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": PROMPT, "max_tokens": 500}, "prompt"),  # longer than the tiny model's context
        ({"prompt": PROMPT, "temperature": -1}, None),
        ({"prompt": PROMPT, "max_tokens": "many"}, "max_tokens"),
        ({"prompt": PROMPT, "logprobs": 3}, "logprobs"),
        ({"prompt": PROMPT, "suffix": "\n    return x"}, "suffix"),
        ({"prompt": [1, 2, 3]}, "prompt"),
        ({}, "prompt"),
    ],
)
def test_bad_requests_are_a_clear_400(served, body, param):
    status, answer = post(served[0], body)
    assert status == 400
    assert answer["error"]["type"] == "invalid_request_error" and answer["error"]["param"] == param
    assert answer["error"]["message"]


@pytest.mark.skipif(not (DEMO / "config.json").exists(), reason="the demo model (demo/) is not built")
def test_demo_model_serves():
    server, base_url = start_server(DEMO)
    try:
        client = openai.OpenAI(base_url=base_url, api_key="unused", timeout=60, max_retries=0)
        plain = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=32, temperature=0)
        streamed = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=32, temperature=0, stream=True)
        assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == plain.choices[0].text
        assert plain.choices[0].text == greedy(DEMO, [PROMPT], max_new_tokens=32)[0]
    finally:
        stop_server(server)
