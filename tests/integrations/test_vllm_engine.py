"""`--engine vllm`: two Ray workers whose engine is vLLM (each a vLLM process in `make vllm`'s
venv, with kvpool's connector), behind the real gRPC gateway and its OpenAI-compatible HTTP API,
over a real KVStore on a real redis-server, serving SmolLM2-135M on CPU.

One stack for the whole module (two vLLM engines take half a minute to start): a prompt computed
on one worker is loaded from the store by the other, a tenant gets nothing from another, a
session moves between workers, a cancelled stream aborts its vLLM request, stop strings,
max_tokens, seeds and limits behave as on the transformers engine, and a worker killed
mid-stream is replaced while its stream goes on with the same greedy text (last: it leaves one
worker until the replacement is up).
"""

from pathlib import Path

import openai
import pytest
import ray

from kvpool.errors import InvalidArgument
from services.gateway.client import InferenceClient
from services.stack import local_stack
from services.store.redis_process import RedisProcess
from services.store.server import StoreConfig
from tests.services.gateway.support import drained, wait_for
from workers.api import WorkerConfig

pytestmark = [pytest.mark.integration, pytest.mark.model]

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT.parent / "shared" / "corpus"
BLOCK_TOKENS = 64


def _texts() -> list[str]:
    texts = sorted(CORPUS.glob("*.txt")) if CORPUS.is_dir() else []
    if len(texts) < 4:  # the corpus lives beside the checkout; a fresh clone elsewhere has none
        texts = sorted((ROOT / "docs").glob("*.md"))
    return [" ".join(t.read_text().split()[:300]) for t in texts[:4]]


SHARED, TENANTS, SESSION, KILLED = _texts()


@pytest.fixture(scope="module")
def stack():
    assert (ROOT / ".venv-vllm" / "bin" / "python").exists(), "make vllm builds .venv-vllm"
    redis = RedisProcess().start()
    store = StoreConfig(backend=redis.url, port=0, grace_s=0)
    # fp32 blocks: the float32 engine's own values, so outputs from a store hit equal a miss's;
    # fetch pinned, so a stored prefix is always loaded (auto would too on this CPU, by estimate).
    worker = WorkerConfig(
        engine="vllm", codec="fp32", block_tokens=BLOCK_TOKENS, fetch_plan="fetch", max_batch=4
    )
    try:
        with local_stack(worker, workers=2, store=store, grace_s=2, http_port=0) as stack:
            yield stack
    finally:
        redis.close()


@pytest.fixture(scope="module")
def client(stack):
    with InferenceClient(stack.gateway.target, timeout_s=300) as c:
        yield c


def full_blocks(tokens: int) -> int:
    """Prompt tokens the connector can load: whole blocks, short of the last token."""
    return (tokens - 1) // BLOCK_TOKENS * BLOCK_TOKENS


def test_the_workers_run_vllm_and_report_its_namespace(stack):
    info = stack.gateway.pool.info
    assert info.fingerprint.startswith("vllm|") and info.codec == "fp32"
    assert info.block_tokens == BLOCK_TOKENS and info.device == "cpu"
    assert len(stack.gateway.pool.live()) == 2


def test_a_prompt_computed_on_one_worker_is_loaded_from_the_store_by_the_other(stack, client):
    cold = client.generate(prompt=SHARED, max_new_tokens=16)
    a = cold.usage["worker"]
    assert cold.usage["cached_tokens"] == 0 and cold.usage["plan"] == "none"
    stack.flush()
    with drained(stack.gateway, a):
        warm = client.generate(prompt=SHARED, max_new_tokens=16)
    b = warm.usage["worker"]
    assert b != a
    prompt_tokens = warm.usage["prompt_tokens"]
    assert warm.usage["cached_tokens_by_tier"] == {
        "local": 0, "store": full_blocks(prompt_tokens), "node": 0,
    }  # fmt: skip
    assert warm.usage["plan"] == "fetch"
    assert warm.text == cold.text and warm.token_ids == cold.token_ids
    # Both workers' vLLM prefix caches hold it now: the next one is a local hit on either.
    again = client.generate(prompt=SHARED, max_new_tokens=16)
    assert again.usage["cached_tokens_by_tier"]["local"] >= full_blocks(prompt_tokens)
    assert again.usage["cached_tokens_by_tier"]["store"] == 0
    assert again.text == cold.text


def test_a_tenant_gets_nothing_from_another(stack, client):
    first = client.generate(prompt=TENANTS, max_new_tokens=4, tenant="acme")
    stack.flush()
    with drained(stack.gateway, first.usage["worker"]):
        other = client.generate(prompt=TENANTS, max_new_tokens=4, tenant="globex")
        same = client.generate(prompt=TENANTS, max_new_tokens=4, tenant="acme")
    assert other.usage["cached_tokens"] == 0
    # The same tenant on the same worker does load it: the salt, not the worker, kept globex out.
    assert other.usage["worker"] == same.usage["worker"]
    assert same.usage["cached_tokens_by_tier"]["store"] == full_blocks(same.usage["prompt_tokens"])


def test_a_session_continues_on_the_other_worker_from_the_store(stack, client):
    first = client.generate(prompt=SESSION, max_new_tokens=8, session_id="vllm-chat")
    stack.flush()
    with drained(stack.gateway, first.usage["worker"]):
        second = client.generate(prompt=" And then?", max_new_tokens=8, session_id="vllm-chat")
    assert second.usage["worker"] != first.usage["worker"]
    assert second.usage["prompt_tokens"] > first.usage["prompt_tokens"] + 8
    # The first turn's prompt blocks come from the store (its output's were never saved).
    assert second.usage["cached_tokens_by_tier"]["store"] >= full_blocks(
        first.usage["prompt_tokens"]
    )
    assert client.get_session("vllm-chat").turns == 2


def test_stop_strings_max_tokens_seeds_and_limits_behave_as_on_the_transformers_engine(
    stack, client
):
    whole = client.generate(prompt=SHARED[:400], max_new_tokens=24)
    assert whole.finish_reason == "length" and len(whole.token_ids) == 24
    words = whole.text.split()
    stop = next(w for w in words[2:] if whole.text.index(w) > 0)
    stopped = client.generate(prompt=SHARED[:400], max_new_tokens=24, stop=[stop])
    assert stopped.finish_reason == "stop" and stopped.usage["failovers"] == 0
    assert stopped.text == whole.text[: whole.text.index(stop)]
    short = client.generate(prompt=SHARED[:400], max_new_tokens=5)
    assert short.token_ids == whole.token_ids[:5] and short.finish_reason == "length"

    def sampled(seed: int) -> tuple[int, ...]:
        return client.generate(
            prompt="Once upon a time", max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=50,
            seed=seed,
        ).token_ids  # fmt: skip

    assert sampled(7) == sampled(7)
    assert sampled(7) != sampled(8)
    with pytest.raises(InvalidArgument, match="exceeds the model's context of 8192"):
        client.generate(token_ids=[5] * 8190, max_new_tokens=16)
    with pytest.raises(InvalidArgument, match="does not bound a request's cache"):
        client.generate(prompt="hi", max_new_tokens=4, max_cache_tokens=256)


def test_the_end_of_text_token_ends_a_reply_unless_ignore_eos(client):
    messages = [{"role": "user", "content": "Hi!"}]
    reply = client.generate(messages=messages, max_new_tokens=64)
    assert reply.finish_reason == "eos" and len(reply.token_ids) < 64
    forced = client.generate(messages=messages, max_new_tokens=64, ignore_eos=True)
    assert forced.finish_reason == "length" and len(forced.token_ids) == 64
    assert forced.token_ids[: len(reply.token_ids)] == reply.token_ids


def test_the_openai_sdk_streams_from_a_vllm_worker_and_a_client_that_leaves_aborts_it(stack):
    base = f"http://127.0.0.1:{stack.gateway.http_port}/v1"
    model = stack.gateway.pool.info.model
    with openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=300) as api:
        reply = api.chat.completions.create(
            model=model, messages=[{"role": "user", "content": SHARED}], max_tokens=8,
            temperature=0,
        )  # fmt: skip
        assert reply.usage.prompt_tokens > BLOCK_TOKENS and reply.choices[0].message.content
        extras = reply.model_extra["kvpool"]
        assert extras["worker"] in stack.gateway.pool.live()
        assert reply.usage.prompt_tokens_details.cached_tokens == sum(
            extras["cached_tokens_by_tier"].values()
        )
        stream = api.completions.create(
            model=model, prompt="Count: one, two,", max_tokens=2000, temperature=0, stream=True,
            extra_body={"ignore_eos": True},  # vLLM's extension, which the gateway takes too
        )  # fmt: skip
        chunks = iter(stream)
        assert next(chunks).choices
        busy = [s for s in stack.gateway.pool.stats() if s.in_flight]
        assert len(busy) == 1 and busy[0].batch_running == 1
        stream.close()  # the client leaves: 2,000 tokens would take over a minute here
    wait_for(
        lambda: all(s.in_flight == 0 and s.batch_running == 0 for s in stack.gateway.pool.stats()),
        30,
        "the vLLM request to be aborted",
    )


def _engine_processes(worker_id: str) -> list[int]:
    """The pids of `worker_id`'s vLLM engine processes (its `--worker` argument names them)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:  # it ended meanwhile
            continue
        if b"kvpool.integrations.vllm_process" in args and worker_id.encode() in args:
            found.append(int(cmdline.parent.name))
    return found


def test_a_worker_killed_mid_stream_is_replaced_and_the_stream_goes_on(stack, client):
    baseline = client.generate(prompt=KILLED, max_new_tokens=40)
    assert baseline.finish_reason == "length"
    stack.flush()
    pool = stack.gateway.pool
    tokens, text, last, killed = [], [], None, None
    for chunk in client.stream(prompt=KILLED, max_new_tokens=40):
        tokens.extend(chunk.token_ids)
        text.append(chunk.text)
        last = chunk
        if killed is None and len(tokens) >= 5:
            busy = [w for w in pool.router.workers() if pool.router.in_flight(w)]
            assert len(busy) == 1
            killed = busy[0]
            assert _engine_processes(killed)
            ray.kill(pool.handle(killed), no_restart=True)
    assert killed is not None and last is not None
    assert last.usage.failovers == 1 and last.usage.worker != killed
    assert tokens == list(baseline.token_ids)  # nothing repeated, nothing missing
    assert "".join(text) == baseline.text
    # The killed actor's vLLM process goes with it, and a replacement starts.
    wait_for(lambda: not _engine_processes(killed), 30, "the killed worker's vLLM process to end")
    wait_for(lambda: len(pool.live()) == 2, 300, "a replacement worker")
    assert killed not in pool.live()
    assert pool.replacements >= 1
