"""The OpenAI-compatible HTTP API end to end, with the real `openai` package as the client.

The package's stack serves it next to gRPC (`http_port=0`), on the same core and workers, so
the tests compare the two faces directly. Auth and limits get their own HTTP front over the same
workers (as test_security does for gRPC), so no second Ray cluster is started.
"""

import json
import ssl
import time

import httpx2 as httpx
import openai
import pytest
import ray
from prometheus_client import generate_latest

from services.auth import ServerTls, parse_token_file
from services.gateway.client import InferenceClient
from services.gateway.core import GatewayConfig, InferenceCore
from services.gateway.metrics import GatewayMetrics
from services.gateway.server import GatewaySettings, http_server
from tests.services.gateway.support import BLOCK_TOKENS, wait_for
from tests.support.tls import self_signed

pytestmark = pytest.mark.integration

SYSTEM = (
    "You are the support assistant of a KV-cache store. Paged attention keeps the cache in "
    "fixed-size blocks, and a prefix cache hashes each block with everything before it. "
) * 3
TOKENS = """
token-acme-000000000000000000000000 acme
token-globex-00000000000000000000000 globex
"""
ACME = "token-acme-000000000000000000000000"


def base_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/v1"


@pytest.fixture(scope="module")
def api(stack):
    with openai.OpenAI(
        base_url=base_url(stack.http_port), api_key="unused", max_retries=0, timeout=120
    ) as client:
        yield client


@pytest.fixture(scope="module")
def grpc_client(stack):
    with InferenceClient(stack.target, timeout_s=120) as client:
        yield client


@pytest.fixture(scope="module")
def model(stack):
    return stack.pool.info.model


@pytest.fixture
def front(stack):
    """`front(gateway_config, **settings)`: an HTTP front of its own over the stack's workers."""
    started = []

    def start(gateway: GatewayConfig | None = None, **settings):
        config = GatewaySettings(store_target="unused", port=0, http_port=0, grace_s=1, **settings)
        metrics = GatewayMetrics()
        core = InferenceCore(stack.pool, stack.core.sessions, metrics, gateway)
        server = http_server(config, core, stack.pool.info.model, lambda: True)
        server.start()
        started.append(server)
        return server.port, metrics

    yield start
    for server in started:
        server.stop(1)


def metric(registry, name: str, labels: dict[str, str] | None = None) -> float:
    value = registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


# --- completions, streamed and not ------------------------------------------------------------


def test_chat_completion_matches_grpc_greedy_text(api, grpc_client, stack, model):
    messages = [{"role": "user", "content": "Name three colours."}]
    reply = api.chat.completions.create(
        model=model, messages=messages, max_tokens=12, temperature=0
    )
    grpc = grpc_client.generate(messages=messages, max_new_tokens=12)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.model == model
    assert reply.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant"
    assert choice.message.content == grpc.text
    assert choice.finish_reason == {"eos": "stop"}.get(grpc.finish_reason, grpc.finish_reason)
    usage = reply.usage
    assert usage.prompt_tokens == grpc.usage["prompt_tokens"] > 0
    assert usage.completion_tokens == grpc.usage["completion_tokens"] <= 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    extras = reply.model_extra["kvpool"]
    assert extras["worker"] in stack.pool.live()
    assert set(extras["cached_tokens_by_tier"]) == {"local", "node", "store"}
    assert extras["plan"] == grpc.usage["plan"]
    assert extras["recomputed_tokens"] == grpc.usage["recomputed_tokens"]
    assert usage.prompt_tokens_details.cached_tokens == sum(
        extras["cached_tokens_by_tier"].values()
    )


def test_streamed_chat_equals_the_unstreamed_reply_and_reports_usage(api, model):
    messages = [{"role": "user", "content": "Count to five."}]
    whole = api.chat.completions.create(
        model=model, messages=messages, max_tokens=16, temperature=0
    )
    chunks = list(
        api.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == whole.choices[0].finish_reason
    assert finals[0].model_extra["kvpool"]["worker"]
    usage_chunk = chunks[-1]  # with include_usage: last, with no choices
    assert usage_chunk.choices == []
    assert usage_chunk.usage.completion_tokens == whole.usage.completion_tokens
    assert usage_chunk.usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_a_stream_without_include_usage_has_no_usage_chunk(api, model):
    chunks = list(
        api.completions.create(
            model=model, prompt="Once upon a time", max_tokens=6, temperature=0, stream=True
        )
    )
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_text_completion_streamed_and_not_match_grpc(api, grpc_client, model):
    prompt = "The capital of France is"
    whole = api.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0)
    grpc = grpc_client.generate(prompt=prompt, max_new_tokens=10)
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    assert whole.choices[0].text == grpc.text
    assert whole.usage.completion_tokens == len(grpc.token_ids)
    streamed = api.completions.create(
        model=model, prompt=prompt, max_tokens=10, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == grpc.text
    # A prompt given as token ids is the same prompt.
    ids = api.completions.create(
        model=model, prompt=_prompt_ids(grpc_client, prompt), max_tokens=10, temperature=0
    )
    assert ids.choices[0].text == grpc.text


def _prompt_ids(grpc_client, prompt: str) -> list[int]:
    """The prompt's token ids, as the workers tokenize it (a session keeps them)."""
    session = f"ids-{time.monotonic_ns()}"
    grpc_client.generate(prompt=prompt, max_new_tokens=1, session_id=session)
    ids = list(grpc_client.get_session(session).token_ids)[:-1]
    grpc_client.delete_session(session)
    return ids


def test_a_shared_system_prompt_is_reported_as_cached_tokens(api, model):
    def ask(question: str):
        return api.chat.completions.create(
            model=model,
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
            max_tokens=4,
            temperature=0,
        )

    first = ask("How big is a block?")
    second = ask("What does the prefix cache hash?")
    assert first.usage.prompt_tokens > 4 * BLOCK_TOKENS
    assert second.usage.prompt_tokens_details.cached_tokens >= 4 * BLOCK_TOKENS
    tiers = second.model_extra["kvpool"]["cached_tokens_by_tier"]
    assert tiers["local"] + tiers["store"] == second.usage.prompt_tokens_details.cached_tokens


def test_stop_strings_max_tokens_and_seed_behave_as_in_grpc(api, grpc_client, model):
    prompt = "Stop here: the quick brown fox"
    free = grpc_client.generate(prompt=prompt, max_new_tokens=24)
    stop = free.text[len(free.text) // 2 :][:3]
    assert stop.strip(), f"no usable stop string in {free.text!r}"
    grpc = grpc_client.generate(prompt=prompt, max_new_tokens=24, stop=[stop])
    http = api.completions.create(
        model=model, prompt=prompt, max_tokens=24, temperature=0, stop=stop
    )
    assert http.choices[0].text == grpc.text and stop not in http.choices[0].text
    assert http.choices[0].finish_reason == "stop" == grpc.finish_reason

    short = api.completions.create(model=model, prompt=prompt, max_tokens=3, temperature=0)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"

    def sampled(seed: int) -> str:
        reply = api.completions.create(
            model=model, prompt=prompt, max_tokens=12, temperature=1.0, seed=seed
        )
        return reply.choices[0].text

    assert sampled(7) == sampled(7)
    assert (
        sampled(7)
        == grpc_client.generate(prompt=prompt, max_new_tokens=12, temperature=1.0, seed=7).text
    )


def test_kvpool_sessions_through_the_extras_field(api, grpc_client, model):
    session = f"http-session-{time.monotonic_ns()}"
    first = api.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Remember: " + SYSTEM}],
        max_tokens=4,
        temperature=0,
        extra_body={"kvpool": {"session_id": session}},
    )
    assert first.model_extra["kvpool"]["session_id"] == session
    second = api.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "And then?"}],
        max_tokens=4,
        temperature=0,
        extra_body={"kvpool": {"session_id": session}},
    )
    # The second turn's prompt is the whole conversation, its history cached.
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + first.usage.completion_tokens
    assert second.usage.prompt_tokens_details.cached_tokens >= 4 * BLOCK_TOKENS
    assert grpc_client.get_session(session).turns == 2
    grpc_client.delete_session(session)


def test_models_and_health(api, stack, model):
    listed = api.models.list()
    assert [m.id for m in listed.data] == [model]
    assert api.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("gpt-4o")
    health = httpx.get(f"http://127.0.0.1:{stack.http_port}/health", timeout=10)
    assert health.status_code == 200 and health.json() == {"status": "ok"}


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_kwargs", "message"),
    [
        ({"max_tokens": 0}, "max_new_tokens must be between 1 and"),
        ({"temperature": -1.0}, "temperature must be in"),
        ({"n": 2}, "n: not supported"),
        ({"logprobs": True}, "logprobs: not supported"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "role must be one of"),
        ({"messages": []}, "messages is empty"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        ({"max_tokens": "ten"}, "max_tokens: Input should be a valid integer"),
        ({"extra_body": {"kvpool": {"sesion_id": "x"}}}, "kvpool.sesion_id: Extra inputs"),
        ({"extra_body": {"kvpool": {"session_id": "no spaces"}}}, "session_id must be"),
        ({"max_tokens": 4090, "messages": [{"role": "user", "content": "x " * 100}]}, "context"),
    ],
)
def test_bad_input_is_400_in_openais_error_shape(api, model, request_kwargs, message):
    kwargs = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    kwargs.update(request_kwargs)
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as caught:
            api.chat.completions.create(stream=stream, **kwargs)
        assert caught.value.status_code == 400
        error = caught.value.body
        assert error["type"] == "invalid_request_error" and message in error["message"], error


def test_an_unknown_model_is_404(api):
    with pytest.raises(openai.NotFoundError) as caught:
        api.completions.create(model="gpt-4o", prompt="hi", max_tokens=2)
    assert "this gateway serves" in caught.value.body["message"]


def test_malformed_bodies_unknown_routes_and_oversized_bodies(stack, front, model):
    url = f"http://127.0.0.1:{stack.http_port}"
    bad_json = httpx.post(f"{url}/v1/completions", content=b"{not json", timeout=10)
    assert bad_json.status_code == 400
    assert bad_json.json()["error"]["type"] == "invalid_request_error"
    missing = httpx.post(f"{url}/v1/embeddings", json={}, timeout=10)
    assert missing.status_code == 404 and "no route" in missing.json()["error"]["message"]
    wrong_method = httpx.get(f"{url}/v1/completions", timeout=10)
    assert wrong_method.status_code == 405

    port, _ = front(max_request_bytes=2048)
    big = {"model": model, "prompt": "x" * 4096, "max_tokens": 2}
    too_large = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=big, timeout=10)
    assert too_large.status_code == 413
    assert "exceeds the gateway's limit of 2048 bytes" in too_large.json()["error"]["message"]

    def chunked():  # no Content-Length: the limit counts the bytes as they come
        yield json.dumps(big).encode()

    streamed = httpx.post(f"http://127.0.0.1:{port}/v1/completions", content=chunked(), timeout=10)
    assert streamed.status_code == 413


def test_missing_or_wrong_tokens_are_401_and_tokens_pick_the_tenant(front, stack, model):
    port, metrics = front(auth=parse_token_file(TOKENS))
    anonymous = httpx.post(
        f"http://127.0.0.1:{port}/v1/completions",
        json={"model": model, "prompt": "hi", "max_tokens": 2},
        timeout=10,
    )
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["type"] == "authentication_error"
    assert "missing bearer token" in anonymous.json()["error"]["message"]
    with openai.OpenAI(base_url=base_url(port), api_key="token-acme-0000", max_retries=0) as wrong:
        with pytest.raises(openai.AuthenticationError, match="bearer token not accepted"):
            wrong.completions.create(model=model, prompt="hi", max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
    health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10)
    assert health.status_code == 200  # health needs no token, as gRPC's

    with openai.OpenAI(base_url=base_url(port), api_key=ACME, max_retries=0) as acme:
        acme.completions.create(model=model, prompt="hi", max_tokens=2, temperature=0)
        assert metric(metrics.registry, "kvpool_gateway_requests_total", {"tenant": "acme"}) == 1
        with pytest.raises(openai.BadRequestError, match="its token acts for 'acme'"):
            acme.completions.create(
                model=model, prompt="hi", max_tokens=2, extra_body={"kvpool": {"tenant": "globex"}}
            )


def test_limits_are_the_grpc_ones_resource_exhausted_is_429(front, model):
    port, metrics = front(GatewayConfig(max_sessions=1, max_new_tokens=8))
    with openai.OpenAI(base_url=base_url(port), api_key="unused", max_retries=0) as api:
        with pytest.raises(openai.BadRequestError, match="exceeds the gateway's limit"):
            api.completions.create(model=model, prompt="hi", max_tokens=9)
        one = f"limit-a-{time.monotonic_ns()}"
        api.completions.create(
            model=model, prompt="hi", max_tokens=2, extra_body={"kvpool": {"session_id": one}}
        )
        for stream in (False, True):
            with pytest.raises(openai.RateLimitError) as caught:
                api.completions.create(
                    model=model,
                    prompt="hi",
                    max_tokens=2,
                    stream=stream,
                    extra_body={"kvpool": {"session_id": f"limit-b-{time.monotonic_ns()}"}},
                )
            assert caught.value.status_code == 429
            assert caught.value.body["code"] == "rate_limit_exceeded"
            assert "live sessions already" in caught.value.body["message"]
    rejected = {"limit": "max_sessions"}
    assert metric(metrics.registry, "kvpool_gateway_limit_rejections_total", rejected) == 2


# --- disconnects and metrics -------------------------------------------------------------------


def test_a_client_that_disconnects_mid_stream_cancels_the_generation(api, stack, model):
    registry = stack.metrics.registry
    route = {"route": "/v1/completions"}
    before = metric(registry, "kvpool_gateway_http_disconnects_total", route)
    finished_before = metric(registry, "kvpool_gateway_completion_tokens_total", {"tenant": ""})
    # 4,000 tiny-random tokens take 30 s or more on these machines (2,000 took 13 s): a worker
    # that stops within 10 s of the disconnect was cancelled, not finished.
    stream = api.completions.create(
        model=model, prompt="Go on forever:", max_tokens=4000, temperature=0, stream=True
    )
    next(iter(stream))
    stream.close()  # drops the connection
    # The core acts on a cancel between two tokens: the gateway counts the disconnect at the
    # next one (later when the stack is still busy with an earlier test's worker replacement).
    wait_for(
        lambda: metric(registry, "kvpool_gateway_http_disconnects_total", route) == before + 1,
        60,
        "the gateway to count the disconnect",
    )
    wait_for(lambda: all(s.in_flight == 0 for s in stack.pool.stats()), 10, "the worker to stop")
    assert metric(registry, "kvpool_gateway_in_flight") == 0
    # Cancelled, not finished: no usage was recorded for it.
    after = metric(registry, "kvpool_gateway_completion_tokens_total", {"tenant": ""})
    assert after == finished_before


def test_http_metrics_label_route_templates_not_raw_paths(api, stack, model):
    api.models.list()
    for name in ("a", "b", "c"):
        with pytest.raises(openai.NotFoundError):
            api.models.retrieve(f"no-such-model-{name}")
    httpx.get(f"http://127.0.0.1:{stack.http_port}/random/{time.monotonic_ns()}", timeout=10)
    registry = stack.metrics.registry
    name = "kvpool_gateway_http_requests_total"
    ok = {"route": "/v1/models", "method": "GET", "status": "200"}
    assert metric(registry, name, ok) >= 1
    by_template = {"route": "/v1/models/{model:path}", "method": "GET", "status": "404"}
    assert metric(registry, name, by_template) >= 3
    assert metric(registry, name, {"route": "unmatched", "method": "GET", "status": "404"}) >= 1
    text = generate_latest(registry).decode()
    samples = [line for line in text.splitlines() if line.startswith(name)]
    assert not any("no-such-model" in s or "random/" in s for s in samples)


def test_stopping_lets_an_open_stream_finish_then_refuses_connections(model, stack):
    config = GatewaySettings(store_target="unused", port=0, http_port=0, grace_s=30)
    core = InferenceCore(stack.pool, stack.core.sessions, GatewayMetrics(), None)
    stopping = {"now": False}
    server = http_server(config, core, model, lambda: not stopping["now"])
    server.start()
    with openai.OpenAI(base_url=base_url(server.port), api_key="x", max_retries=0) as api:
        stream = api.completions.create(
            model=model, prompt="Drain:", max_tokens=40, temperature=0, stream=True
        )
        first = next(iter(stream))
        stopping["now"] = True  # what GatewayServer.stop says first
        health = httpx.get(f"http://127.0.0.1:{server.port}/health", timeout=10)
        assert health.status_code == 503
        with pytest.raises(openai.InternalServerError) as caught:  # 503: a new request
            api.completions.create(model=model, prompt="late", max_tokens=2)
        assert caught.value.status_code == 503 and "shutting down" in caught.value.message
        server.begin_stop()
        rest = list(stream)  # the open stream runs to its end
        assert first.choices and rest[-1].choices[0].finish_reason in ("stop", "length")
        server.stop(30)
        with pytest.raises(openai.APIConnectionError):
            api.models.list()


def test_a_client_that_gives_up_on_an_unstreamed_reply_cancels_it(stack, model):
    registry = stack.metrics.registry
    route = {"route": "/v1/chat/completions"}
    before = metric(registry, "kvpool_gateway_http_disconnects_total", route)
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Go on forever:"}],
        "max_tokens": 4000,
        "temperature": 0,
    }
    url = f"http://127.0.0.1:{stack.http_port}/v1/chat/completions"
    requests_before = metric(registry, "kvpool_gateway_requests_total", {"tenant": ""})
    # The client gives up well before 4,000 tokens are done: with a 5 s read timeout a quick
    # machine finished them about when the client left, and a reply written to a closed socket
    # is no disconnect.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url, json=body, timeout=httpx.Timeout(10, read=1.5))
    # The generation had started (not a client gone before its body was read).
    assert metric(registry, "kvpool_gateway_requests_total", {"tenant": ""}) == requests_before + 1
    try:
        wait_for(
            lambda: metric(registry, "kvpool_gateway_http_disconnects_total", route) == before + 1,
            60,
            "the gateway to count the disconnect",
        )
    except AssertionError as exc:
        in_flight = [(s.worker_id, s.in_flight) for s in stack.pool.stats()]
        gauge = metric(registry, "kvpool_gateway_in_flight")
        raise AssertionError(f"{exc}; workers in flight {in_flight}, gateway {gauge}") from None
    wait_for(lambda: all(s.in_flight == 0 for s in stack.pool.stats()), 10, "the worker to stop")


def test_the_http_api_serves_tls_with_the_grpc_certificate(front, model, tmp_path):
    cert, key = self_signed(tmp_path)
    port, _ = front(tls=ServerTls(cert.read_bytes(), key.read_bytes()))
    trusting = httpx.Client(verify=ssl.create_default_context(cafile=str(cert)))
    with openai.OpenAI(
        base_url=f"https://127.0.0.1:{port}/v1", api_key="x", max_retries=0, http_client=trusting
    ) as api:
        assert [m.id for m in api.models.list().data] == [model]
    with pytest.raises(httpx.RemoteProtocolError):  # plaintext to a TLS port
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=10)


def test_an_error_after_the_first_token_arrives_as_an_error_event(front, stack, model):
    port, _ = front(GatewayConfig(max_failovers=0))
    with openai.OpenAI(base_url=base_url(port), api_key="x", max_retries=0, timeout=120) as api:
        stream = api.completions.create(
            model=model, prompt="Lost mid-stream:", max_tokens=2000, temperature=0, stream=True
        )
        chunks = iter(stream)
        next(chunks)
        busy = [w for w in stack.pool.router.workers() if stack.pool.router.in_flight(w)]
        assert len(busy) == 1
        ray.kill(stack.pool.handle(busy[0]), no_restart=True)
        with pytest.raises(openai.APIError, match="gave up after 0 failovers"):
            for _ in chunks:
                pass
    wait_for(lambda: len(stack.pool.live()) == 2, 180, "a replacement worker")
