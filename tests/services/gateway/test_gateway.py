"""The gateway end to end: real gRPC, a real local Ray with two workers, the store over Redis."""

import json
import threading

import grpc
import pytest
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import generate_latest

from kvpool.errors import InvalidArgument, NotFound
from tests.services.gateway.support import BLOCK_TOKENS, drained, wait_for

pytestmark = pytest.mark.integration

DOC = (
    "Paged attention keeps the KV cache in fixed-size blocks, and a prefix cache hashes each "
    "block with everything before it so that equal prefixes share their blocks. "
) * 4


def full_blocks(n_tokens: int) -> int:
    return n_tokens // BLOCK_TOKENS * BLOCK_TOKENS


def test_worker_b_reuses_blocks_that_worker_a_stored(stack, client):
    cold = client.generate(prompt="Share: " + DOC, max_new_tokens=20)
    a = cold.usage["worker"]
    assert cold.usage["cached_tokens"] == 0
    for handle in stack.pool.live().values():
        ray.get(handle.flush.remote())
    with drained(stack, a):
        warm = client.generate(prompt="Share: " + DOC, max_new_tokens=20)
    assert warm.usage["worker"] != a
    assert warm.usage["cached_tokens_by_tier"]["store"] == full_blocks(warm.usage["prompt_tokens"])
    assert warm.usage["cached_tokens_by_tier"]["local"] == 0
    assert warm.token_ids == cold.token_ids and warm.text == cold.text
    # Left alone, the router sends the prompt back to a worker holding it in L1.
    local = client.generate(prompt="Share: " + DOC, max_new_tokens=20)
    assert local.usage["cached_tokens_by_tier"]["local"] > 0
    assert local.token_ids == cold.token_ids


def test_prefill_warms_the_store_for_every_worker(stack, client):
    doc = "Prefilled: " + DOC
    response = client.prefill(prompt=doc)
    assert response.stored_tokens == full_blocks(response.prompt_tokens) > 0
    with drained(stack, response.worker):
        done = client.generate(prompt=doc, max_new_tokens=4)
    assert done.usage["worker"] != response.worker
    assert done.usage["cached_tokens_by_tier"]["store"] == response.stored_tokens


def test_a_session_continues_on_another_worker(stack, client):
    first = client.generate(
        messages=[{"role": "user", "content": "Remember this: " + DOC}],
        max_new_tokens=12,
        session_id="chat-1",
    )
    assert first.usage["session_id"] == "chat-1"
    for handle in stack.pool.live().values():
        ray.get(handle.flush.remote())
    with drained(stack, first.usage["worker"]):
        second = client.generate(
            messages=[{"role": "user", "content": "Now say it shorter."}],
            max_new_tokens=12,
            session_id="chat-1",
        )
    assert second.usage["worker"] != first.usage["worker"]
    history = first.usage["prompt_tokens"] + first.usage["completion_tokens"]
    assert second.usage["prompt_tokens"] > history
    # Everything of turn one (prompt and reply) that fills a block came from the store.
    assert second.usage["cached_tokens_by_tier"]["store"] == full_blocks(history - 1)

    session = client.get_session("chat-1")
    assert session.turns == 2
    assert len(session.token_ids) == second.usage["prompt_tokens"] + len(second.token_ids)
    assert list(session.token_ids[-len(second.token_ids) :]) == list(second.token_ids)
    assert "Now say it shorter." in session.text

    client.delete_session("chat-1")
    with pytest.raises(NotFound, match="chat-1"):
        client.get_session("chat-1")


def test_sessions_belong_to_their_tenant(client):
    client.generate(prompt="hello", max_new_tokens=2, session_id="mine", tenant="acme")
    assert client.get_session("mine", tenant="acme").turns == 1
    with pytest.raises(NotFound):
        client.get_session("mine", tenant="globex")


def test_failover_mid_stream_gives_the_uninterrupted_text(stack, client):
    prompt = "Failover: " + DOC
    baseline = client.generate(prompt=prompt, max_new_tokens=300, tenant="baseline")
    assert baseline.finish_reason == "length"

    tokens, text, last = [], [], None
    killed = None
    for chunk in client.stream(prompt=prompt, max_new_tokens=300):
        tokens.extend(chunk.token_ids)
        text.append(chunk.text)
        last = chunk
        if killed is None and len(tokens) >= 5:
            busy = [w for w in stack.pool.router.workers() if stack.pool.router.in_flight(w)]
            assert len(busy) == 1
            killed = busy[0]
            ray.kill(stack.pool.handle(killed), no_restart=True)
    assert killed is not None
    assert last.usage.failovers == 1 and last.usage.worker != killed
    assert tokens == list(baseline.token_ids)  # nothing repeated, nothing missing
    assert "".join(text) == baseline.text
    # The dead worker is replaced in the background.
    wait_for(lambda: len(stack.pool.live()) == 2, 180, "a replacement worker")
    assert killed not in stack.pool.live()


def test_client_cancel_stops_the_worker(stack, client):
    stream = client.stream(prompt="Cancel: " + DOC, max_new_tokens=2000)
    next(stream)
    stream.close()  # cancels the call
    wait_for(lambda: all(s.in_flight == 0 for s in stack.pool.stats()), 30, "the worker to stop")


@pytest.mark.parametrize(
    ("request_kwargs", "message"),
    [
        ({"prompt": ""}, "prompt is empty"),
        ({"prompt": "   "}, "prompt is empty"),
        ({}, "set one of prompt, messages or token_ids"),
        ({"messages": []}, "messages is empty"),
        ({"token_ids": [1, -5, 3]}, "token ids must be integers in [0, "),
        ({"prompt": "hi", "max_new_tokens": -1}, "max_new_tokens must be between 1 and"),
        ({"prompt": "hi", "max_new_tokens": 0}, "max_new_tokens must be between 1 and"),
        ({"prompt": "hi", "max_new_tokens": 10**6}, "max_new_tokens must be between 1 and"),
        ({"token_ids": [5] * 4090, "max_new_tokens": 64}, "exceeds the model's context of 4096"),
        ({"prompt": "hi", "temperature": -1.0}, "temperature must be in"),
        ({"prompt": "hi", "session_id": "no spaces"}, "session_id must be"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "role must be one of"),
    ],
)
def test_bad_requests_are_invalid_argument_with_a_clear_message(client, request_kwargs, message):
    with pytest.raises(InvalidArgument) as caught:
        client.generate(**request_kwargs)
    assert "INVALID_ARGUMENT" in str(caught.value) and message in str(caught.value)


def test_unknown_sessions_are_not_found(client):
    with pytest.raises(NotFound, match="'ghost' does not exist"):
        client.get_session("ghost")
    with pytest.raises(NotFound, match="'ghost' does not exist"):
        client.delete_session("ghost")


def test_health_and_metrics(stack, client):
    with grpc.insecure_channel(stack.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(service="kvpool.v1.Inference"))
        assert status.status == health_pb2.HealthCheckResponse.SERVING
    client.generate(prompt="metrics please", max_new_tokens=2, tenant="acme")
    text = generate_latest(stack.metrics.registry).decode()
    assert 'kvpool_gateway_calls_total{code="OK",method="Generate"}' in text
    assert 'kvpool_gateway_prompt_tokens_total{tenant="acme"}' in text
    assert "kvpool_gateway_workers_live 2.0" in text
    assert text.count("kvpool_worker_l1_bytes{") == 2


def test_concurrent_streams_all_complete(client):
    results, errors = [], []

    def one(i: int) -> None:
        try:
            results.append(client.generate(prompt=f"Request {i}: " + DOC, max_new_tokens=8))
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(results) == 6
    assert len({r.usage["worker"] for r in results}) == 2  # load spread over both workers


def test_kvpool_generate_target_prints_the_json_contract(stack, capsys):
    from kvpool.cli import main

    argv = ["generate", "--target", stack.target, "Hello there", "--max-new-tokens", "3"]
    assert main([*argv, "--json", "--session", "cli-1", "--tenant", "acme"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"text", "token_ids", "finish_reason", "usage"}
    assert len(out["token_ids"]) == 3 and out["finish_reason"] == "length"
    usage = out["usage"]
    assert usage["session_id"] == "cli-1" and usage["worker"]
    assert set(usage["cached_tokens_by_tier"]) == {"local", "node", "store"}
    assert usage["plan"] in ("none", "fetch", "recompute", "split")
    assert {"prompt_tokens", "cached_tokens", "completion_tokens", "ttft_ms"} <= set(usage)

    assert main([*argv, "--raw"]) == 0  # streams text, then a usage line on stderr
    assert "prompt=" in capsys.readouterr().err

    assert main(["generate", "--target", stack.target, "   "]) == 2
    assert "prompt is empty" in capsys.readouterr().err


def test_kvpool_gateway_serve_needs_a_store(capsys):
    from kvpool.cli import main

    assert main(["gateway", "serve", "--workers", "1"]) == 2
    assert "--store HOST:PORT is required" in capsys.readouterr().err


def test_streams_batched_on_the_workers_equal_each_alone(stack, client):
    """Continuous batching through the real actors: concurrent streams share each worker's
    decode steps (the worker's stats say so) and each gives exactly its output alone."""
    prompts = [f"Batched {i}: " + DOC[: 50 * (i + 1)] for i in range(6)]
    alone = [client.generate(prompt=p, max_new_tokens=120, tenant="alone") for p in prompts]
    steps_before = sum(s.batch_steps for s in stack.pool.stats())
    results: dict[int, object] = {}

    def one(i: int) -> None:
        results[i] = client.generate(prompt=prompts[i], max_new_tokens=120, tenant="batched")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [results[i].token_ids for i in range(len(prompts))] == [a.token_ids for a in alone]
    stats = stack.pool.stats()
    assert max(s.batch_largest for s in stats) >= 2
    assert sum(s.batch_steps for s in stats) > steps_before
    text = generate_latest(stack.metrics.registry).decode()
    assert text.count("kvpool_worker_batch_steps_total{") == 2
