"""Workers reach a store that wants a token over TLS, and keep tenants apart in L1 and the store."""

import pytest

from services.auth import ServerTls, TokenTable, channel_credentials
from services.store.client import StoreClient
from services.store.server import StoreConfig, StoreServer
from tests.support.tls import self_signed
from workers.api import PromptInput, SamplingParams, WorkDone, WorkerConfig, WorkRequest
from workers.kv.hashing import Namespace, block_key, chain_hashes, tenant_salt
from workers.worker import KVWorker

TOKEN = "worker-store-token-0123456789"
PROMPT = "Tenants keep their own blocks. " * 12


@pytest.fixture(scope="module")
def secure_store(tmp_path_factory):
    cert, key = self_signed(tmp_path_factory.mktemp("tls"))
    server = StoreServer(
        StoreConfig(
            host="127.0.0.1",
            port=0,
            auth=TokenTable({TOKEN: ""}),
            tls=ServerTls(cert.read_bytes(), key.read_bytes()),
        )
    )
    server.start()
    yield server, cert.read_bytes()
    server.stop(0)


def run(worker: KVWorker, request: WorkRequest) -> WorkDone:
    done = list(worker.generate(request))[-1]
    assert isinstance(done, WorkDone)
    return done


def test_worker_writes_and_reads_through_a_token_and_tls(secure_store):
    server, ca = secure_store
    config = WorkerConfig(
        model="tiny-random", codec="fp16", block_tokens=16, store_target=server.target,
        store_auth_token=TOKEN, store_tls_ca=ca, fetch_plan="fetch",
    )  # fmt: skip
    assert TOKEN not in repr(config)
    a, b = KVWorker(config, "a"), KVWorker(config, "b")
    try:
        prompt = tuple(a.prompts.encode_input(PromptInput(prompt=PROMPT)))
        params = SamplingParams(max_new_tokens=2)
        first = run(a, WorkRequest(prompt, params, tenant="acme"))
        assert first.usage.cached_tokens == 0
        assert a.flush(10)
        assert a.stats().writes.stored > 0 and a.stats().writes.failed == 0
        hashes = chain_hashes(a.namespace("acme"), prompt)
        creds = channel_credentials(ca)
        with StoreClient(server.target, auth_token=TOKEN, credentials=creds) as client:
            assert client.lookup([block_key(h) for h in hashes]) == len(hashes)

        # Same tenant on another worker: from the store. Another tenant: nothing, in either tier.
        assert run(b, WorkRequest(prompt, params, tenant="acme")).usage.cached_store_tokens > 0
        other_here = run(a, WorkRequest(prompt, params, tenant="globex"))
        assert other_here.usage.cached_tokens == 0  # a's L1 holds acme's blocks, not globex's
        assert a.stats().store_errors == 0 and b.stats().store_errors == 0
    finally:
        a.close()
        b.close()


def test_with_a_namespace_secret_no_one_without_it_can_compute_a_tenants_keys(secure_store):
    """Issue 14, item 6: with the tenant's name as the salt, anyone who could reach the store
    computed a victim's keys, and Lookup told whether a prompt had been sent."""
    server, ca = secure_store
    secret = b"namespace-secret-0123456789abcdef"
    config = WorkerConfig(
        model="tiny-random", codec="fp16", block_tokens=16, store_target=server.target,
        store_auth_token=TOKEN, store_tls_ca=ca, namespace_secret=secret,
    )  # fmt: skip
    assert secret.decode() not in repr(config)
    worker = KVWorker(config, "keyed")
    try:
        prompt = tuple(worker.prompts.encode_input(PromptInput(prompt="A private prompt. " * 10)))
        run(worker, WorkRequest(prompt, SamplingParams(max_new_tokens=2), tenant="victim"))
        assert worker.flush(10)
        info = worker.info()
        guessed = chain_hashes(
            Namespace(info.fingerprint, "fp16", block_tokens=16, tenant="victim"), prompt
        )
        keyed = chain_hashes(worker.namespace("victim"), prompt)
        assert worker.namespace("victim").tenant == tenant_salt("victim", secret)
        creds = channel_credentials(ca)
        with StoreClient(server.target, auth_token=TOKEN, credentials=creds) as client:
            assert client.lookup([block_key(h) for h in guessed]) == 0  # nothing to learn
            assert client.lookup([block_key(h) for h in keyed]) == len(keyed)
    finally:
        worker.close()
