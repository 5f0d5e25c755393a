"""The Redis backend (`redis://`, `rediss://`, `unix://`): redis-py with hiredis.

One value per Redis string key, written with one `SET key value [EX ttl]`, so a reader sees the
whole value or nothing. Each batch is one round trip: a Lua script of `EXISTS` calls for a lookup,
`MGET` for reads, a pipeline with one `SET` per block for writes. Redis is meant to run as a
cache (maxmemory, allkeys-lru, no persistence; docs/store.md): an evicted block is a miss.

Connections come from a pool. A command that fails on a broken connection is retried on a fresh
one a couple of times with a short jittered backoff, which is what makes the store recover by
itself after a Redis restart. A command that times out is not retried: a Redis that does not
answer (hung, or stopped) would otherwise hold the calling thread for several timeouts. When
Redis stays unreachable, calls raise `Unavailable` naming the URL (never the password), quickly
enough for the caller to treat the store as a miss.
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import redis
from redis import exceptions as rex
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from kvpool.errors import InvalidArgument, PermissionDenied, ResourceExhausted, Unavailable
from services.store.backends.base import BackendStats
from services.store.backends.resp import LENGTHS
from services.store.backends.urls import redact_url

if TYPE_CHECKING:
    from services.store.backends.resp import RespStream

# The length of the present prefix of KEYS, in one command. It stops at the first miss. A
# pipeline of EXISTS took 0.35 ms for 64 keys here, against 0.09 ms for this script, most of it
# in redis-py packing and parsing 64 commands. EXISTS does not refresh LRU recency. redis-py
# sends EVALSHA and loads the script again after a Redis restart (NOSCRIPT).
_LOOKUP = """
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 0 then return i - 1 end
end
return #KEYS
"""


def _zero_copy_packer() -> object | None:
    """redis-py's pure-Python command packer, which sends large values as they are.

    With hiredis installed, redis-py packs each command into one new buffer, copying the value
    (twice for a memoryview). The pure-Python packer hands large values and views to `sendall`
    untouched, which roughly halves the CPU a Put costs here. Replies are still parsed by hiredis.
    """
    try:
        from redis._parsers.encoders import Encoder
        from redis.connection import PythonRespSerializer
    except ImportError:  # a redis-py that moved them: fall back to its default packer
        return None
    return PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode)


class RedisStore:
    """A `StorageBackend` on one Redis database; thread-safe (the pool hands out connections)."""

    def __init__(
        self,
        url: str,
        *,
        password: str | None = None,
        timeout_s: float = 2.0,
        max_connections: int = 64,
        retries: int = 2,
    ) -> None:
        if password is not None and urlsplit(url).password is not None:
            raise InvalidArgument("give the Redis password in the URL or as a password, not both")
        self.url = redact_url(url)
        self._raw_url, self._password, self._timeout_s = url, password, timeout_s
        # Credentials, TLS (rediss://) and the database number come from the URL; redis-py
        # reads `user:password@`, `?ssl_cert_reqs=...` and `/db` itself.
        # A Unix socket has no keepalive (redis-py's Unix connection refuses the argument).
        tcp = {} if urlsplit(url).scheme == "unix" else {"socket_keepalive": True}
        self._client = redis.Redis.from_url(
            url,
            password=password,
            socket_timeout=timeout_s,
            socket_connect_timeout=min(timeout_s, 2.0),
            **tcp,
            health_check_interval=30,
            max_connections=max_connections,
            retry=Retry(
                ExponentialWithJitterBackoff(cap=0.25, base=0.02),
                retries,
                supported_errors=(rex.ConnectionError,),
            ),
            retry_on_error=[rex.ConnectionError],
            command_packer=_zero_copy_packer(),
        )
        self._lookup = self._client.register_script(_LOOKUP)
        # Each value's length in one command: a Get reserves a window's bytes from these before
        # it reads the window (services/store/budget.py).
        self._sizes = self._client.register_script(LENGTHS)

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except rex.AuthenticationError as exc:
            raise Unavailable(
                f"Redis at {self.url} refused the credentials ({what}): {exc}"
            ) from exc
        except (rex.ConnectionError, rex.TimeoutError) as exc:
            raise Unavailable(f"Redis at {self.url} is unreachable ({what}): {exc}") from exc
        except rex.NoPermissionError as exc:
            # An ACL that lacks a command or a key pattern: retrying cannot help.
            raise PermissionDenied(
                f"Redis at {self.url} refused {what} for lack of a permission (NOPERM): {exc}; "
                "see the ACL in docs/store.md"
            ) from exc
        except rex.OutOfMemoryError as exc:
            raise ResourceExhausted(
                f"Redis at {self.url} is full and does not evict ({what}); configure "
                "maxmemory-policy allkeys-lru (docs/store.md)"
            ) from exc
        except rex.RedisError as exc:
            raise Unavailable(f"Redis at {self.url} failed ({what}): {exc}") from exc

    def open_stream(self) -> "RespStream | None":
        """A raw RESP connection for the data path (backends/resp.py); None for TLS Redis."""
        if urlsplit(self._raw_url).scheme not in ("redis", "unix"):
            return None
        from services.store.backends.resp import RespStream

        return RespStream(
            self._raw_url,
            password=self._password,
            timeout_s=self._timeout_s,
            shown=self.url,
            lookup_script=_LOOKUP,
        )

    def ping(self) -> None:
        with self._errors("ping"):
            self._client.ping()

    def lookup(self, keys: Sequence[str]) -> int:
        if not keys:
            return 0
        with self._errors("lookup"):
            return int(self._lookup(keys=keys))

    def sizes(self, keys: Sequence[str]) -> list[int]:
        if not keys:
            return []
        with self._errors("sizes"):
            return [max(int(n), 0) for n in self._sizes(keys=keys)]  # missing: 0

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        with self._errors("get"):
            return self._client.mget(keys)

    def put_many(self, items: Sequence[tuple[str, bytes | memoryview]], ttl_s: int | None) -> int:
        if not items:
            return 0
        with self._errors("put"):
            pipe = self._client.pipeline(transaction=False)
            for key, value in items:
                pipe.set(key, value, ex=ttl_s or None)
            return sum(1 for ok in pipe.execute() if ok)

    def delete(self, keys: Sequence[str]) -> int:
        if not keys:
            return 0
        with self._errors("delete"):
            return int(self._client.delete(*keys))

    def stats(self) -> BackendStats:
        with self._errors("stats"):
            pipe = self._client.pipeline(transaction=False)
            pipe.dbsize()
            pipe.info("memory")
            pipe.info("stats")
            keys, memory, stats = pipe.execute()
        maxmemory = int(memory.get("maxmemory", 0))
        return BackendStats(
            backend=self.url,
            keys=int(keys),
            bytes=int(memory["used_memory"]),
            capacity_bytes=maxmemory or None,  # 0 means "no limit" in Redis
            evictions=int(stats["evicted_keys"]),
        )

    def close(self) -> None:
        self._client.close()
        self._client.connection_pool.disconnect()
