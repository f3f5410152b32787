"""serve.py under load: the throughput of concurrent clients (batched) against the same requests one after another,
and the latency of a lone request, for this server and for the standard-library server it replaced.

    python3 benchmarks/bench_server.py                       # the demo model, 16 clients, 64 tokens each
    python3 benchmarks/bench_server.py --model replit-code-v1-3b --clients 8

Both servers run as subprocesses on 127.0.0.1 with the same model and settings. Requests are greedy, without stop
sequences (each generates exactly --max-tokens tokens unless the model ends its text), one distinct prompt per
client. The previous server is read from git (`--baseline`, a commit whose replit_tools/server.py is the
ThreadingHTTPServer one) and run with today's tokenizer file (the one of that time needed protobuf).
"""

import argparse
import http.client
import json
import os
import platform
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from replit_tools.options import at_least  # noqa: E402  (no torch: the servers run in subprocesses)
BASELINE = "624b54b"  # the last commit with the standard-library server (one request at a time, behind a lock)
PROMPTS = [
    "def fibonacci(n):",
    "import os\n\n\ndef list_files(path):",
    "class Stack:\n    def __init__(self):",
    "def is_prime(n):\n",
    "import json\n\n\ndef load(path):\n",
    "def quicksort(items):",
    "from dataclasses import dataclass\n\n\n@dataclass\nclass Point:\n",
    "def read_lines(path):\n    with open(path) as f:",
    "def gcd(a, b):",
    "import re\n\nWORD = re.compile(",
    "def flatten(nested):\n",
    "class Node:\n    def __init__(self, value):\n",
    "def merge(a, b):\n    result = []\n",
    "def count_words(text):",
    "import argparse\n\n\ndef main():\n    parser = argparse.ArgumentParser(",
    "def binary_search(items, target):",
]


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown CPU"


def start(command: list[str], env: dict) -> tuple[subprocess.Popen, int]:
    errors = tempfile.TemporaryFile(mode="w+")  # shown if the server does not start
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True, env=env)
    ready, _, _ = select.select([process.stdout], [], [], 300)
    line = process.stdout.readline() if ready else ""
    if not line.startswith("Serving "):
        process.kill()
        process.wait()
        errors.seek(0)
        raise SystemExit(f"the server did not start: {line!r}\n{errors.read()[-3000:]}")
    return process, int(line.rsplit(":", 1)[1].split("/")[0])


def baseline_command(ref: str, server_args: list[str], folder: Path) -> list[str]:
    """The previous server: the repository as it was at `ref` (its package too, which the server imports from),
    unpacked from git into `folder`."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], capture_output=True)
    if archive.returncode:
        raise SystemExit(f"error: --baseline {ref}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    # The tokenizer of that time read spiece.model with protobuf, which no requirements file installs: today's
    # gives the same ids, and the tokenizer is not what is measured.
    shutil.copy(ROOT / "replit_lm_tokenizer.py", folder / "replit_lm_tokenizer.py")
    return [sys.executable, str(folder / "serve.py"), *server_args]


def complete(port: int, prompt: str, max_tokens: int) -> tuple[str, float]:
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stop": []})
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        answer = json.loads(response.read())
    finally:
        connection.close()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {answer}")
    return answer["choices"][0]["text"], time.perf_counter() - started


def concurrently(port: int, prompts: list[str], max_tokens: int) -> tuple[list[str], float]:
    results = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts))

    def client(i):
        barrier.wait()
        try:
            results[i] = complete(port, prompts[i], max_tokens)[0]
        except (OSError, RuntimeError) as error:  # the previous server resets connections beyond its backlog of 5
            results[i] = error

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, time.perf_counter() - started


def one_after_another(port: int, prompts: list[str], max_tokens: int) -> tuple[list[str], float]:
    started = time.perf_counter()
    texts = [complete(port, prompt, max_tokens)[0] for prompt in prompts]
    return texts, time.perf_counter() - started


def batch_count(port: int) -> int | None:
    """Batches the server has run (serve.py's /health says; the previous server's does not)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("GET", "/health")
        return json.loads(connection.getresponse().read()).get("batches")
    finally:
        connection.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "demo"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--clients", type=at_least(1), default=16)
    parser.add_argument("--max-tokens", type=at_least(1), default=64)
    parser.add_argument("--repeats", type=at_least(1), default=11, help="lone requests timed (the median is shown)")
    parser.add_argument("--baseline", default=BASELINE, help="git commit of the previous server (none: skip it)")
    parser.add_argument("--threads", type=at_least(1),
                        help="torch threads of the servers (OMP_NUM_THREADS; default: torch's)")  # fmt: skip
    args = parser.parse_args()
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.clients)]
    server_args = ["--model", args.model, "--device", args.device, "--port", "0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)

    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs; server torch threads: {args.threads or 'default'})")
    print(f"model: {args.model}; {args.clients} clients, {args.max_tokens} tokens each, greedy, no stop sequences")

    with tempfile.TemporaryDirectory() as folder:
        commands = {"serve.py": [sys.executable, str(ROOT / "serve.py"), *server_args, "--log-level", "warning"]}
        if args.baseline != "none":
            commands[f"baseline {args.baseline}"] = baseline_command(args.baseline, server_args, Path(folder))
        servers = {}
        try:
            for name, command in commands.items():
                servers[name] = start(command, env)
            ports = {name: port for name, (_, port) in servers.items()}
            for port in ports.values():
                complete(port, PROMPTS[0], args.max_tokens)  # warm-up
            # Lone requests to each server in turn, so that both see the same load from the rest of the machine.
            times = {name: [] for name in ports}
            for _ in range(args.repeats):
                for name, port in ports.items():
                    times[name].append(complete(port, PROMPTS[0], args.max_tokens)[1])
            latencies = {name: statistics.median(values) for name, values in times.items()}
            for name, port in ports.items():
                alone, sequential = one_after_another(port, prompts, args.max_tokens)
                batches = batch_count(port)
                together, concurrent = concurrently(port, prompts, args.max_tokens)
                batches = "" if batches is None else f" in {batch_count(port) - batches} batches"
                same = sum(a == b for a, b in zip(alone, together))
                failed = sum(isinstance(answer, Exception) for answer in together)
                print(
                    f"{name}: lone request {latencies[name]:.3f} s (median of {args.repeats}); {args.clients} "
                    f"requests one after another {sequential:.2f} s, concurrently {concurrent:.2f} s{batches}: "
                    f"throughput ratio {sequential / concurrent:.2f}x; {same}/{args.clients} concurrent answers "
                    "equal to the lone ones" + (f", {failed} failed (connection reset or error)" if failed else ""),
                    flush=True,
                )
        finally:
            for process, _ in servers.values():
                process.terminate()
                process.wait(timeout=30)
    if len(latencies) == 2:
        new, old = latencies.values()
        print(f"lone-request latency, serve.py / baseline: {new / old:.2f}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
