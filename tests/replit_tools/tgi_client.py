"""A client of TGI's model server, run by the Python of a TGI server environment (tests/replit_tools/test_export.py
starts it there): it talks to `text-generation-server serve` on its Unix socket as TGI's router does (Info, Warmup,
ClearCache, then one Prefill, and Decode calls until every request has finished, the finished ones filtered out of
the batch before each as the router filters them), greedy, and prints as JSON, per prompt, the prompt's token ids
and the generated token ids, log-probabilities and text. (The prompt's log-probabilities are not kept: TGI gives a
left-padded prompt one more than it has tokens.)

    python tgi_client.py SOCKET MAX_NEW_TOKENS PROMPT...
"""

import json
import sys

import grpc
from text_generation_server.pb import generate_pb2 as pb
from text_generation_server.pb import generate_pb2_grpc

MAX_INPUT_TOKENS = 1000


def batch_of(batch_id: int, prompts: list[str], max_new_tokens: int) -> pb.Batch:
    greedy = pb.NextTokenChooserParameters(temperature=1.0, repetition_penalty=1.0, frequency_penalty=0.0, top_k=0,
                                           top_p=1.0, typical_p=1.0, do_sample=False, seed=0)  # fmt: skip
    stop = pb.StoppingCriteriaParameters(max_new_tokens=max_new_tokens, stop_sequences=[], ignore_eos_token=False)
    requests = [
        pb.Request(id=i, inputs=prompt, input_chunks=pb.Input(chunks=[pb.InputChunk(text=prompt)]),
                   truncate=MAX_INPUT_TOKENS, parameters=greedy, stopping_parameters=stop, prefill_logprobs=True)
        for i, prompt in enumerate(prompts)
    ]  # fmt: skip
    return pb.Batch(id=batch_id, requests=requests, size=len(requests),
                    max_tokens=len(prompts) * (MAX_INPUT_TOKENS + max_new_tokens))  # fmt: skip


def main(socket_path: str, max_new_tokens: int, prompts: list[str]) -> list[dict]:
    server = generate_pb2_grpc.TextGenerationServiceStub(grpc.insecure_channel(f"unix://{socket_path}"))
    info = server.Info(pb.InfoRequest())
    server.Warmup(pb.WarmupRequest(batch=batch_of(0, prompts, max_new_tokens), max_input_tokens=MAX_INPUT_TOKENS,
                                   max_prefill_tokens=len(prompts) * MAX_INPUT_TOKENS,
                                   max_total_tokens=MAX_INPUT_TOKENS + max_new_tokens))  # fmt: skip
    server.ClearCache(pb.ClearCacheRequest())
    results = [{"prompt_ids": [], "ids": [], "logprobs": [], "text": None} for _ in prompts]
    response = server.Prefill(pb.PrefillRequest(batch=batch_of(1, prompts, max_new_tokens)))
    while True:
        for generation in response.generations:
            result = results[generation.request_id]
            if generation.HasField("prefill_tokens"):
                result["prompt_ids"] = list(generation.prefill_tokens.ids)
            result["ids"] += list(generation.tokens.ids)
            result["logprobs"] += list(generation.tokens.logprobs)
            if generation.HasField("generated_text"):
                result["text"] = generation.generated_text.text
        if not response.HasField("batch"):  # every request has finished
            break
        batch = response.batch
        running = [i for i in batch.request_ids if results[i]["text"] is None]
        if len(running) < len(batch.request_ids):
            batch = server.FilterBatch(pb.FilterBatchRequest(batch_id=batch.id, request_ids=running)).batch
        response = server.Decode(pb.DecodeRequest(batches=[batch]))
    return [{"dtype": info.dtype, "device": info.device_type} | result for result in results]


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])))
