"""RedisStore against a real redis-server on a loopback port.

The contract tests (those taking `store`) also run against RedisClusterStore on a real
three-master cluster (tests/support/redis_cluster.py); the cluster's own behaviour is tested in
test_redis_cluster_backend.py.
"""

import shutil
import subprocess

import pytest
import redis

from kvpool.errors import InvalidArgument, PermissionDenied, ResourceExhausted, Unavailable
from services.store.backends import check_backend_spec, open_backend, redact_url
from services.store.backends.redis import RedisStore
from services.store.backends.redis_cluster import RedisClusterStore
from tests.support.redis import RedisProcess, require_redis_server

pytestmark = pytest.mark.integration


@pytest.fixture(params=["redis", "redis+cluster"])
def backend_and_raw(request):
    """A backend under test and a plain redis-py client of the same servers."""
    if request.param == "redis":
        url = request.getfixturevalue("redis_server")
        backend, raw = RedisStore(url), redis.Redis.from_url(url)
    else:
        cluster = request.getfixturevalue("redis_cluster")
        backend = RedisClusterStore(cluster.url)
        raw = redis.RedisCluster(host="127.0.0.1", port=cluster.master_ports()[0])
    yield backend, raw
    backend.close()
    raw.close()


@pytest.fixture
def store(backend_and_raw):
    return backend_and_raw[0]


@pytest.fixture
def raw(backend_and_raw):
    return backend_and_raw[1]


@pytest.fixture
def redis_store(redis_server):
    backend = RedisStore(redis_server)
    yield backend
    backend.close()


def test_round_trip_lookup_get_put_delete(store):
    assert store.put_many([("a", b"1"), ("b", memoryview(b"xx22yy")[2:4]), ("d", b"")], None) == 3
    assert store.lookup(["a", "b", "c", "d"]) == 2
    assert store.get_many(["a", "b", "c", "d"]) == [b"1", b"22", None, b""]
    assert store.delete(["a", "c"]) == 1
    assert store.lookup(["a"]) == 0


def test_put_sets_the_ttl_on_each_key(store, raw):
    store.put_many([("t", b"v")], ttl_s=100)
    store.put_many([("p", b"v")], ttl_s=None)
    assert 98 <= raw.ttl("t") <= 100
    assert raw.ttl("p") == -1  # no expiry


def test_lookup_is_one_command_that_stops_at_the_first_miss(redis_store, redis_server):
    store = redis_store
    chain = [f"kvpool:blk:{i:064x}" for i in range(64)]
    store.put_many([(key, b"v") for key in chain], None)
    raw = redis.Redis.from_url(redis_server)
    raw.delete(chain[40])
    assert store.lookup(chain) == 40  # also loads the script
    stats = raw.info("commandstats")
    calls = lambda name: stats.get(f"cmdstat_{name}", {}).get("calls", 0)  # noqa: E731
    before_evalsha, before_exists = calls("evalsha"), calls("exists")
    assert store.lookup(chain) == 40
    stats = raw.info("commandstats")
    assert calls("evalsha") == before_evalsha + 1  # one round trip for the whole chain
    assert calls("exists") == before_exists + 41  # inside the script, stopping at the miss


def test_lookup_survives_a_restart_that_drops_the_script_cache(redis_process):
    store = RedisStore(redis_process.url)
    store.put_many([("a", b"1")], None)
    assert store.lookup(["a"]) == 1
    redis_process.restart()
    store.put_many([("a", b"1")], None)
    assert store.lookup(["a", "b"]) == 1
    store.close()


def test_stats_report_keys_memory_and_evictions_under_allkeys_lru():
    require_redis_server()
    with RedisProcess(maxmemory_bytes=4 << 20, policy="allkeys-lru") as process:
        store = RedisStore(process.url)
        for i in range(40):  # 40 x 256 KiB into a 4 MiB cache
            store.put_many([(f"k{i}", b"x" * (256 << 10))], None)
        stats = store.stats()
        assert stats.evictions and stats.evictions > 0
        assert stats.capacity_bytes == 4 << 20
        assert stats.keys is not None and stats.keys < 40
        assert stats.bytes is not None and stats.bytes > 0
        store.close()


def test_a_full_redis_that_does_not_evict_is_resource_exhausted_with_the_fix():
    require_redis_server()
    with RedisProcess(maxmemory_bytes=2 << 20, policy="noeviction") as process:
        store = RedisStore(process.url)
        with pytest.raises(ResourceExhausted, match="allkeys-lru"):
            for i in range(20):
                store.put_many([(f"k{i}", b"x" * (256 << 10))], None)
        store.close()


def test_credentials_from_the_url_or_a_password_and_never_in_messages():
    require_redis_server()
    with RedisProcess(password="s3cret-pw") as process:
        with_url = RedisStore(process.url)
        with_url.put_many([("a", b"1")], None)
        assert with_url.url == f"redis://:***@127.0.0.1:{process.port}/0"
        plain_url = f"redis://127.0.0.1:{process.port}/0"
        assert RedisStore(plain_url, password="s3cret-pw").get_many(["a"]) == [b"1"]
        with pytest.raises(Unavailable) as err:
            RedisStore(f"redis://:wrong@127.0.0.1:{process.port}/0").lookup(["a"])
        assert "***" in str(err.value) and "wrong" not in str(err.value)
        with pytest.raises(InvalidArgument, match="not both"):
            RedisStore(process.url, password="x")


def test_outage_is_unavailable_naming_the_url_then_recovers_on_restart(redis_process):
    store = RedisStore(redis_process.url)
    store.put_many([("a", b"1")], None)
    redis_process.stop()
    with pytest.raises(Unavailable) as err:
        store.get_many(["a"])
    assert f"127.0.0.1:{redis_process.port}" in str(err.value)
    assert "unreachable" in str(err.value)
    redis_process.start()  # same port, empty (no persistence)
    assert store.get_many(["a"]) == [None]
    store.put_many([("a", b"2")], None)
    assert store.get_many(["a"]) == [b"2"]


def test_backend_specs():
    check_backend_spec("memory")
    for spec in ("redis://h:1/0", "rediss://u:p@h:1/0", "unix:///tmp/redis.sock"):
        check_backend_spec(spec)
    for spec in ("memcached://h:1", "redis:/h", "h:6379", "", "Memory"):
        with pytest.raises(
            InvalidArgument, match=r"'memory' or a URL starting with redis://, rediss://, unix://"
        ):
            check_backend_spec(spec)
    with pytest.raises(InvalidArgument) as err:
        check_backend_spec("http://user:topsecret@h:1")
    assert "topsecret" not in str(err.value)
    assert open_backend("memory", max_memory_bytes=10).stats().capacity_bytes == 10


def test_redact_url_keeps_user_host_port_and_db():
    assert redact_url("rediss://app:pw@r.example:6380/2") == "rediss://app:***@r.example:6380/2"
    assert redact_url("redis://r:6379/0") == "redis://r:6379/0"


def test_the_documented_acl_user_is_enough(redis_server):
    """The least-privilege user docs/store.md recommends can do everything the store does."""
    admin = redis.Redis.from_url(redis_server)
    rule = "on >pw ~kvpool:* resetchannels -@all +get +mget +set +exists +del +dbsize +info +ping"
    rule += " +strlen +evalsha +script|load +multi +exec +discard"
    admin.execute_command("ACL", "SETUSER", "kvpool", *rule.split())
    store = RedisStore(redis_server.replace("redis://", "redis://kvpool:pw@"))
    assert store.put_many([("kvpool:blk:1", b"v")], ttl_s=60) == 1
    assert store.lookup(["kvpool:blk:1"]) == 1
    assert store.get_many(["kvpool:blk:1"]) == [b"v"]
    assert store.stats().keys == 1
    assert store.delete(["kvpool:blk:1"]) == 1
    with pytest.raises(PermissionDenied, match="no permissions"):
        store.put_many([("other:1", b"v")], None)  # keys outside kvpool:* are refused (NOPERM)
    store.close()


def test_rediss_urls_use_tls_and_verify_the_server(tmp_path):
    require_redis_server()
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    openssl = "openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=127.0.0.1"
    openssl += " -addext subjectAltName=IP:127.0.0.1"
    subprocess.run(
        [*openssl.split(), "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True
    )
    with RedisProcess(tls_cert_key=(cert, key)) as process:
        trusted = RedisStore(f"{process.tls_url}?ssl_ca_certs={cert}")
        assert trusted.put_many([("k", b"over tls")], None) == 1
        assert trusted.get_many(["k"]) == [b"over tls"]
        trusted.close()
        with pytest.raises(Unavailable, match="rediss://"):
            RedisStore(process.tls_url).lookup(["k"])  # self-signed: not trusted by default


def test_a_unix_socket_url_opens_a_store_and_its_data_path_stream(tmp_path):
    """`unix://` is an accepted backend spec: it must open (redis-py's Unix connection takes no
    keepalive argument, which a TCP one does) and give the data path its raw stream."""
    require_redis_server()
    sock = tmp_path / "redis.sock"
    with RedisProcess(extra_args=["--unixsocket", str(sock), "--unixsocketperm", "700"]) as proc:
        backend = RedisStore(f"unix://{sock}?db=0")
        try:
            assert backend.put_many([("a", b"1"), ("b", b"22")], None) == 2
            assert backend.get_many(["a", "b", "c"]) == [b"1", b"22", None]
            stream = backend.open_stream()
            assert stream is not None
            try:
                assert stream.lookup(["a", "b", "c"]) == 2
            finally:
                stream.close()
        finally:
            backend.close()
        over_tcp = redis.Redis.from_url(proc.url)
        try:
            assert over_tcp.get("b") == b"22"  # the same server, over TCP
        finally:
            over_tcp.close()
