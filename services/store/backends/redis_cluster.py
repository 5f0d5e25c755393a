"""The Redis Cluster backend (`redis+cluster://`, `rediss+cluster://`): redis-py's cluster client.

Keys are the same one-string-per-block keys as on one Redis (docs/store.md, "Keys"); Redis Cluster
puts each in a hash slot by CRC16 of the whole key, so the blocks of a chain spread over the
shards. No key carries a `{hash tag}`: a tag would put a whole chain, or a whole tenant, on one
shard. Each value is still written with one `SET`, so a reader sees all of it or nothing.

A batch is grouped by the master that holds each key's slot; each master gets one pipeline (one
round trip), all pipelines are sent before any answer is read so the masters work at once, and
a call costs about one round trip to the slowest shard it touches. The answers go back in
request order, and a Lookup's prefix is computed from the per-key answers: the first key that is
absent, or whose shard did not answer, ends it.

A shard that fails (a master down, its replica not yet promoted, a MOVED during a failover) never
fails the call: its keys read as misses, its writes are dropped and counted (`dropped` in the
stats), the slot map is refreshed and the keys are tried once more on the new owner. Only when no
node of the cluster answers at all does a call raise `Unavailable`, like the one-Redis backend.
"""

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from redis import exceptions as rex
from redis.cluster import ClusterNode, RedisCluster
from redis.connection import SSLConnection, parse_url
from redis.crc import key_slot

from kvpool.errors import InvalidArgument, ResourceExhausted, Unavailable
from services.store.backends.base import BackendStats
from services.store.backends.urls import CLUSTER_SCHEMES as SCHEMES
from services.store.backends.urls import redact_url

log = logging.getLogger(__name__)

# What a shard may answer while it fails over or is being resharded: a miss, not an error.
_SHARD_ERRORS = (
    rex.ConnectionError,
    rex.TimeoutError,
    rex.MovedError,
    rex.AskError,
    rex.ClusterDownError,
    rex.TryAgainError,
    rex.MasterDownError,
    rex.ReadOnlyError,
    rex.BusyLoadingError,
    rex.SlotNotCoveredError,
)
# Configuration mistakes stay loud: every call would fail the same way.
_FATAL_ERRORS = (rex.AuthenticationError, rex.NoPermissionError, rex.OutOfMemoryError)


@dataclass(frozen=True, slots=True)
class ClusterUrl:
    """A parsed `redis+cluster://[user:password@]host:port[,host:port...][?ssl_...]` spec."""

    seeds: tuple[tuple[str, int], ...]
    options: dict[str, Any]  # username, password, ssl and ssl_* keywords for redis-py

    @classmethod
    def parse(cls, spec: str) -> "ClusterUrl":
        scheme, sep, rest = spec.partition("://")
        if not sep or f"{scheme}://" not in SCHEMES:
            raise InvalidArgument(
                f"not a cluster URL: {redact_url(spec)!r}; use " + " or ".join(SCHEMES)
            )
        rest, _, query = rest.partition("?")  # first: a query may hold paths
        netloc, _, path = rest.partition("/")
        userinfo, at, hosts = netloc.rpartition("@")
        if path not in ("", "0"):
            raise InvalidArgument(f"a Redis Cluster has only database 0, got /{path}")
        seeds = []
        for host_port in hosts.split(","):
            host, colon, port = host_port.rpartition(":")
            if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise InvalidArgument(
                    f"bad seed {host_port!r} in {redact_url(spec)!r}: "
                    f"use {scheme}://host:port[,host:port...]"
                )
            seeds.append((host.strip("[]"), int(port)))
        # redis-py parses credentials, TLS and ?ssl_* options of a one-node URL; reuse that.
        single = f"{scheme.removesuffix('+cluster')}://{userinfo}{at}{hosts.split(',')[0]}"
        options = parse_url(single + (f"?{query}" if query else ""))
        for key in ("host", "port", "db", "path"):
            options.pop(key, None)
        if options.pop("connection_class", None) is SSLConnection:
            options["ssl"] = True
        return cls(tuple(seeds), options)


class RedisClusterStore:
    """A `StorageBackend` on a Redis Cluster; thread-safe.

    The cluster client is created on first use, so a store may start before its cluster (as
    with one Redis, calls answer UNAVAILABLE until it is up).
    """

    def __init__(
        self,
        url: str,
        *,
        password: str | None = None,
        timeout_s: float = 5.0,
        max_connections: int = 64,
        refresh_interval_s: float = 0.25,
    ) -> None:
        parsed = ClusterUrl.parse(url)
        if password is not None and parsed.options.get("password") is not None:
            raise InvalidArgument("give the Redis password in the URL or as a password, not both")
        self.url = redact_url(url)
        self._seeds = parsed.seeds
        self._options = {
            **parsed.options,
            **({"password": password} if password is not None else {}),
            "socket_timeout": timeout_s,
            "socket_connect_timeout": min(timeout_s, 2.0),
            "socket_keepalive": True,
            "max_connections": max_connections,
        }
        self._client: RedisCluster | None = None
        self._client_lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._refreshed_at = 0.0
        self._refresh_interval_s = refresh_interval_s
        self._dropped = 0  # keys a failing shard could not read or write
        self._dropped_lock = threading.Lock()
        self._warned_at = 0.0

    # -- the cluster client and its slot map ---------------------------------------------

    def _cluster(self) -> RedisCluster:
        client = self._client
        if client is not None:
            return client
        with self._client_lock:
            if self._client is None:
                try:
                    self._client = RedisCluster(
                        startup_nodes=[ClusterNode(host, port) for host, port in self._seeds],
                        require_full_coverage=False,
                        **self._options,
                    )
                except _FATAL_ERRORS as exc:
                    raise Unavailable(
                        f"Redis Cluster at {self.url} refused the connection: {exc}"
                    ) from exc
                except (rex.RedisError, rex.RedisClusterException) as exc:
                    raise Unavailable(f"Redis Cluster at {self.url} is unreachable: {exc}") from exc
            return self._client

    def _refresh(self) -> None:
        """Reload the slot map after a shard failed (at most every `refresh_interval_s`)."""
        with self._refresh_lock:
            if time.monotonic() - self._refreshed_at < self._refresh_interval_s:
                return
            self._refreshed_at = time.monotonic()
            try:
                self._cluster().nodes_manager.initialize()
            except (rex.RedisError, rex.RedisClusterException) as exc:
                log.warning("Redis Cluster at %s: slot map refresh failed: %s", self.url, exc)

    def _groups(self, keys: Sequence[str]) -> dict[ClusterNode | None, list[int]]:
        """Indices of `keys` by the master that holds their slot (None: slot not covered)."""
        slots = self._cluster().nodes_manager.slots_cache  # slot -> [master, replicas...]
        groups: dict[ClusterNode | None, list[int]] = {}
        for i, key in enumerate(keys):
            owners = slots.get(key_slot(key.encode()))
            groups.setdefault(owners[0] if owners else None, []).append(i)
        return groups

    # -- one pipeline per shard, in parallel ----------------------------------------------

    def _on_shards(
        self,
        what: str,
        keys: Sequence[str],
        command: Callable[[str], tuple[Any, ...]],
    ) -> list[Any]:
        """Run `command(key)` for every key, one pipeline per master, masters in parallel.

        Returns one reply per key in order; a key whose shard failed gets an exception instead.
        Failed keys are tried once more after a slot map refresh (a failover moves slots).
        """
        replies: list[Any] = [None] * len(keys)
        todo = list(range(len(keys)))
        for attempt in range(2):
            subset = [keys[i] for i in todo]
            groups = self._groups(subset)
            results = self._fan_out(groups, subset, command)
            failed = []
            for node, indices in groups.items():
                answer = results[node]
                for position, i in enumerate(indices):
                    reply = answer if isinstance(answer, Exception) else answer[position]
                    replies[todo[i]] = reply
                    if isinstance(reply, Exception):
                        self._raise_if_fatal(reply, what)
                        failed.append(todo[i])
            todo = failed
            if not failed:
                break
            if attempt == 0:
                self._refresh()
        if todo and len(todo) == len(keys) and not self._any_master_answers():
            raise Unavailable(f"Redis Cluster at {self.url} is unreachable ({what})")
        return replies

    def _any_master_answers(self) -> bool:
        """Whether the cluster is there at all (when every key of a call failed)."""
        cluster = self._cluster()
        for node in cluster.get_primaries():
            try:
                cluster.get_redis_connection(node).ping()
                return True
            except rex.RedisError:
                continue
        return False

    def _fan_out(
        self,
        groups: dict[ClusterNode | None, list[int]],
        keys: Sequence[str],
        command: Callable[[str], tuple[Any, ...]],
    ) -> dict[ClusterNode | None, list[Any] | Exception]:
        """Send every master its pipeline first, then read the answers: the shards work at once.

        This beat a thread per shard here (0.7 against 1.6 ms for a Lookup of 64 keys over three
        shards): no thread hand-offs, and reading is one core's work in Python either way.
        """
        cluster = self._cluster()
        results: dict[ClusterNode | None, list[Any] | Exception] = {}
        sent = []
        for node, indices in groups.items():
            if node is None:
                results[node] = rex.SlotNotCoveredError("slot not covered by any master")
                continue
            pool = cluster.get_redis_connection(node).connection_pool
            try:
                conn = pool.get_connection()
            except rex.RedisError as exc:  # the master is down (or refuses us)
                results[node] = exc
                continue
            try:
                conn.send_packed_command(conn.pack_commands([command(keys[i]) for i in indices]))
            except rex.RedisError as exc:
                conn.disconnect()
                pool.release(conn)
                results[node] = exc
                continue
            sent.append((node, pool, conn, indices))
        for node, pool, conn, indices in sent:
            replies: list[Any] = []
            try:
                for _ in indices:
                    try:
                        replies.append(conn.read_response())
                    except rex.ResponseError as exc:  # this key's error reply (MOVED, ...)
                        replies.append(exc)
                results[node] = replies
            except rex.RedisError as exc:  # the connection broke: this master's answers are lost
                conn.disconnect()
                results[node] = exc
            finally:
                pool.release(conn)
        return results

    def _raise_if_fatal(self, exc: Exception, what: str) -> None:
        if isinstance(exc, rex.OutOfMemoryError):
            raise ResourceExhausted(
                f"Redis Cluster at {self.url} is full and does not evict ({what}); configure "
                "maxmemory-policy allkeys-lru on every node (docs/store.md)"
            ) from exc
        if isinstance(exc, _FATAL_ERRORS):
            raise Unavailable(
                f"Redis Cluster at {self.url} refused the credentials ({what}): {exc}"
            ) from exc
        if not isinstance(exc, _SHARD_ERRORS):
            raise Unavailable(f"Redis Cluster at {self.url} failed ({what}): {exc}") from exc

    def _count_dropped(self, replies: list[Any], what: str) -> int:
        failed = sum(1 for reply in replies if isinstance(reply, Exception))
        if failed:
            with self._dropped_lock:
                self._dropped += failed
                quiet = time.monotonic() - self._warned_at < 5.0  # one line per 5 s at most
                if not quiet:
                    self._warned_at = time.monotonic()
            if quiet:
                return failed
            first = next(reply for reply in replies if isinstance(reply, Exception))
            log.warning(
                "Redis Cluster at %s: %d of %d keys of a %s went to a failing shard (%s); "
                "counted as misses",
                self.url, failed, len(replies), what, first,
            )  # fmt: skip
        return failed

    # -- the StorageBackend contract ----------------------------------------------------------

    def lookup(self, keys: Sequence[str]) -> int:
        if not keys:
            return 0
        replies = self._on_shards("lookup", keys, lambda key: ("EXISTS", key))
        self._count_dropped(replies, "lookup")
        for n, reply in enumerate(replies):
            if isinstance(reply, Exception) or not reply:
                return n
        return len(keys)

    def sizes(self, keys: Sequence[str]) -> list[int]:
        """Each value's length (0: missing), one STRLEN pipeline per master, in parallel; a
        failing shard's keys read as missing, as in a Get."""
        if not keys:
            return []
        replies = self._on_shards("sizes", keys, lambda key: ("STRLEN", key))
        self._count_dropped(replies, "sizes")
        return [reply if isinstance(reply, int) else 0 for reply in replies]

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        replies = self._on_shards("get", keys, lambda key: ("GET", key))
        self._count_dropped(replies, "get")
        return [None if isinstance(reply, Exception) else reply for reply in replies]

    def put_many(self, items: Sequence[tuple[str, bytes | memoryview]], ttl_s: int | None) -> int:
        if not items:
            return 0
        values = dict(items)  # the last value of a repeated key wins, as in one pipeline
        keys = list(values)
        expiry = ("EX", ttl_s) if ttl_s else ()
        replies = self._on_shards("put", keys, lambda key: ("SET", key, values[key], *expiry))
        self._count_dropped(replies, "put")
        stored = {key for key, reply in zip(keys, replies, strict=True) if reply == b"OK"}
        return sum(1 for key, _ in items if key in stored)

    def delete(self, keys: Sequence[str]) -> int:
        if not keys:
            return 0
        unique = list(dict.fromkeys(keys))
        replies = self._on_shards("delete", unique, lambda key: ("DEL", key))
        self._count_dropped(replies, "delete")
        return sum(reply for reply in replies if isinstance(reply, int))

    def ping(self) -> None:
        self.stats()

    def stats(self) -> BackendStats:
        cluster = self._cluster()
        answers = []
        for node in cluster.get_primaries():
            try:
                pipe = cluster.get_redis_connection(node).pipeline(transaction=False)
                pipe.dbsize()
                pipe.info("memory")
                pipe.info("stats")
                answers.append(pipe.execute())
            except _FATAL_ERRORS as exc:
                self._raise_if_fatal(exc, "stats")
            except rex.RedisError:
                continue  # a failing shard: the figures of the others still count
        if not answers:
            self._refresh()
            raise Unavailable(f"Redis Cluster at {self.url}: no master answered (stats)")
        maxmemory = [int(memory.get("maxmemory", 0)) for _, memory, _ in answers]
        with self._dropped_lock:
            dropped = self._dropped
        return BackendStats(
            backend=self.url,
            keys=sum(int(keys) for keys, _, _ in answers),
            bytes=sum(int(memory["used_memory"]) for _, memory, _ in answers),
            capacity_bytes=sum(maxmemory) if all(maxmemory) else None,  # 0: "no limit"
            evictions=sum(int(stats["evicted_keys"]) for _, _, stats in answers),
            dropped=dropped,
        )

    def close(self) -> None:
        with self._client_lock:
            if self._client is not None:
                self._client.close()
                self._client = None
