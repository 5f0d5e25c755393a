"""RedisClusterStore on a real three-master, three-replica Redis Cluster on loopback ports.

The StorageBackend contract it shares with one Redis runs in test_redis_backend.py (parametrized);
here: keys spread over the shards, the prefix answer equal to one Redis's, a master killed
mid-workload, sessions, and the URL.
"""

import random
import re
import shutil
import subprocess
import sys
import threading
import time

import pytest
import redis

from kvpool.errors import InvalidArgument, KvpoolError, Unavailable
from services.gateway.sessions import Session, SessionStore
from services.store.backends import check_backend_spec, open_backend, redact_url
from services.store.backends.redis import RedisStore
from services.store.backends.redis_cluster import ClusterUrl, RedisClusterStore
from services.store.client import StoreClient
from services.store.server import StoreConfig, StoreServer
from tests.support.redis import free_port
from tests.support.redis_cluster import RedisClusterProcess, require_redis_cluster

pytestmark = pytest.mark.integration


def key(i: int) -> str:
    return f"kvpool:blk:{i:064x}"


@pytest.fixture
def cluster_store(redis_cluster):
    backend = RedisClusterStore(redis_cluster.url)
    yield backend
    backend.close()


def _commandstat(port: int, name: str) -> int:
    stats = redis.Redis(port=port).info("commandstats")
    return stats.get(f"cmdstat_{name}", {}).get("calls", 0)


def test_a_chain_spreads_over_every_master_and_lookup_asks_each_once(redis_cluster, cluster_store):
    chain = [key(i) for i in range(64)]
    assert cluster_store.put_many([(k, b"v") for k in chain], None) == 64
    masters = redis_cluster.master_ports()
    held = [redis.Redis(port=port).dbsize() for port in masters]
    assert sum(held) == 64 and all(n > 0 for n in held)  # no hash tags: every shard has some
    before = [_commandstat(port, "exists") for port in masters]
    assert cluster_store.lookup(chain) == 64
    asked = [_commandstat(port, "exists") - b for port, b in zip(masters, before, strict=True)]
    assert asked == held  # each master asked about exactly its own keys


@pytest.mark.parametrize("seed", range(6))
def test_the_longest_prefix_equals_one_redis_answer_on_the_same_keys(
    seed, cluster_store, redis_server
):
    single = RedisStore(redis_server)
    rng = random.Random(seed)
    chain = [key(rng.getrandbits(64)) for _ in range(64)]
    items = [(k, f"value {i}".encode()) for i, k in enumerate(chain)]
    for backend in (single, cluster_store):
        backend.put_many(items, None)
    gaps = rng.sample(chain, rng.randint(0, 3))
    for backend in (single, cluster_store):
        backend.delete(gaps)
    for length in (0, 1, 17, 64):
        assert cluster_store.lookup(chain[:length]) == single.lookup(chain[:length])
    assert cluster_store.get_many(chain) == single.get_many(chain)  # order kept
    assert cluster_store.delete(chain) == single.delete(chain) == 64 - len(gaps)
    single.close()


def test_repeated_keys_in_one_call(cluster_store):
    assert cluster_store.put_many([("a", b"1"), ("b", b"2"), ("a", b"3")], None) == 3
    assert cluster_store.get_many(["a", "b", "a"]) == [b"3", b"2", b"3"]
    assert cluster_store.delete(["a", "a", "b"]) == 2


def test_stats_add_up_every_master(redis_cluster, cluster_store):
    cluster_store.put_many([(key(i), b"x" * 1000) for i in range(30)], None)
    stats = cluster_store.stats()
    assert stats.keys == 30
    assert stats.backend == redis_cluster.url
    assert stats.bytes is not None and stats.bytes > 30_000
    assert stats.capacity_bytes is None  # no maxmemory set on the nodes
    assert stats.evictions == 0 and stats.dropped == 0


def test_sessions_round_trip_through_a_store_on_the_cluster(redis_cluster):
    server = StoreServer(StoreConfig(backend=redis_cluster.url, port=0, grace_s=1))
    with server, StoreClient(server.target, timeout_s=5) as client:
        sessions = SessionStore(client, ttl_s=60)
        now = time.time()
        session = Session("chat-1", "tenant-a", (1, 2, 3), turns=1, created_unix_s=now,
                          updated_unix_s=now)  # fmt: skip
        sessions.save(session)
        assert sessions.get("tenant-a", "chat-1").token_ids == (1, 2, 3)
        sessions.delete("tenant-a", "chat-1")
        assert sessions.find("tenant-a", "chat-1") is None


def test_a_master_killed_mid_workload_loses_no_request(fresh_redis_cluster):
    """SIGKILL a master while clients run: misses while its replica takes over, never errors."""
    cluster = fresh_redis_cluster
    config = StoreConfig(backend=cluster.url, port=0, grace_s=1)
    errors: list[BaseException] = []
    done = threading.Event()
    calls = [0, 0]  # before and after the promotion
    promoted = threading.Event()

    def workload(worker: int) -> None:
        with StoreClient(server.target, timeout_s=5, retries=0) as client:
            n = 0
            while not done.is_set():
                chain = [key(worker << 32 | n << 8 | i) for i in range(16)]
                items = [(k, k.encode()) for k in chain]
                try:
                    client.put_many(items)
                    present = client.lookup(chain)
                    got = client.get_many(chain)
                    # What comes back is right, whatever is missing.
                    assert all(got[k] == k.encode() for k in got)
                    assert 0 <= present <= 16
                    if promoted.is_set():  # the new master serves every slot again
                        assert client.put_many(items) == 16
                        assert client.lookup(chain) == 16
                        assert len(client.get_many(chain)) == 16
                except (KvpoolError, AssertionError) as exc:
                    errors.append(exc)
                    return
                calls[promoted.is_set()] += 1
                n += 1

    with StoreServer(config) as server:
        threads = [threading.Thread(target=workload, args=(w,)) for w in range(2)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        dead = cluster.kill_master()
        cluster.wait_promoted(dead)
        time.sleep(0.5)  # let the store find the new master (it refreshes its slot map)
        promoted.set()
        time.sleep(1.5)
        done.set()
        for thread in threads:
            thread.join(30)
        stats = server.backend.stats()
    assert errors == []
    assert calls[0] > 0 and calls[1] > 0
    assert stats.dropped is not None and stats.dropped > 0  # the failing shard was counted


def test_an_unreachable_cluster_is_unavailable_naming_it():
    url = f"redis+cluster://127.0.0.1:{free_port()}"
    store = RedisClusterStore(url)
    with pytest.raises(Unavailable, match=re.escape(f"Redis Cluster at {url} is unreachable")):
        store.lookup(["a"])
    store.close()


def test_cluster_urls():
    parsed = ClusterUrl.parse("redis+cluster://app:pw@r1.example:7000,10.0.0.2:7001")
    assert parsed.seeds == (("r1.example", 7000), ("10.0.0.2", 7001))
    assert parsed.options["username"] == "app" and parsed.options["password"] == "pw"
    assert "ssl" not in parsed.options
    tls = ClusterUrl.parse("rediss+cluster://r:7000/0?ssl_ca_certs=/ca.pem")
    assert tls.options["ssl"] is True and tls.options["ssl_ca_certs"] == "/ca.pem"
    assert ClusterUrl.parse("redis+cluster://r:7000?ssl_cert_reqs=none").seeds == (("r", 7000),)
    no_path = ClusterUrl.parse("rediss+cluster://a:1,b:2?ssl_ca_certs=/etc/ca.pem")
    assert no_path.seeds == (("a", 1), ("b", 2))
    assert no_path.options["ssl_ca_certs"] == "/etc/ca.pem"
    for bad in ("redis+cluster://r", "redis+cluster://r:7000,", "redis+cluster://:7000"):
        with pytest.raises(InvalidArgument, match=r"use redis\+cluster://host:port"):
            ClusterUrl.parse(bad)
    with pytest.raises(InvalidArgument, match="only database 0"):
        ClusterUrl.parse("redis+cluster://r:7000/2")
    with pytest.raises(InvalidArgument, match="not both"):
        RedisClusterStore("redis+cluster://u:pw@r:7000", password="x")
    check_backend_spec("redis+cluster://r:7000,r:7001")
    check_backend_spec("rediss+cluster://r:7000")
    assert isinstance(open_backend("redis+cluster://r:1", max_memory_bytes=1), RedisClusterStore)
    secret = "redis+cluster://app:topsecret@r1:7000,r2:7001"
    assert redact_url(secret) == "redis+cluster://app:***@r1:7000,r2:7001"


def test_the_documented_cluster_acl_user_is_enough(redis_cluster):
    """The least-privilege user docs/store.md gives for a cluster can do all the store does."""
    rule = "on >pw ~kvpool:* resetchannels -@all +get +set +exists +del +dbsize +info +ping"
    rule += " +command +cluster|slots +cluster|shards"
    for node in redis_cluster.nodes:  # ACLs are per node: a cluster does not share them
        redis.Redis(port=node.port).execute_command("ACL", "SETUSER", "kvpool", *rule.split())
    store = RedisClusterStore(redis_cluster.url.replace("://", "://kvpool:pw@"))
    chain = [key(i) for i in range(20)]
    assert store.put_many([(k, b"v") for k in chain], ttl_s=60) == 20
    assert store.lookup(chain) == 20
    assert store.get_many(chain[:2]) == [b"v", b"v"]
    assert store.stats().keys == 20
    assert store.delete(chain) == 20
    with pytest.raises(Unavailable, match="refused the credentials"):
        store.put_many([("other:1", b"v")], None)  # keys outside kvpool:* are refused
    store.close()


def test_a_bad_cluster_url_is_a_usage_error_of_the_cli():
    backend = ["--backend", "redis+cluster://:s3cret@nohost"]
    proc = subprocess.run(
        [sys.executable, "-m", "kvpool.cli", "store", "serve", "--processes", "2", *backend],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "bad seed" in proc.stderr and "Traceback" not in proc.stderr
    assert "s3cret" not in proc.stderr and "***" in proc.stderr  # the password stays hidden


def test_the_dropped_counter_is_exported(redis_cluster):
    from prometheus_client import generate_latest

    with StoreServer(StoreConfig(backend=redis_cluster.url, port=0, grace_s=1)) as server:
        text = generate_latest(server.metrics.registry).decode()
    assert "kvpool_store_backend_dropped_total 0.0" in text


def test_rediss_cluster_urls_use_tls_and_verify_the_nodes(tmp_path):
    require_redis_cluster()
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    openssl = "openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=127.0.0.1"
    openssl += " -addext subjectAltName=IP:127.0.0.1"
    subprocess.run(
        [*openssl.split(), "-keyout", str(key_file), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    with RedisClusterProcess(tls_cert_key=(cert, key_file)) as cluster:
        assert cluster.url.startswith("rediss+cluster://")
        trusted = RedisClusterStore(cluster.url)
        chain = [key(i) for i in range(32)]
        assert trusted.put_many([(k, b"over tls") for k in chain], None) == 32
        assert trusted.lookup(chain) == 32  # every shard, each over TLS
        assert trusted.get_many(chain[:1]) == [b"over tls"]
        trusted.close()
        untrusted = RedisClusterStore(cluster.url.partition("?")[0])  # self-signed: refused
        with pytest.raises(Unavailable, match=r"rediss\+cluster://"):
            untrusted.lookup(chain)
        untrusted.close()
