"""The KVStore client the workers and the gateway use.

Every call has a deadline (`timeout_s`), retries included: a call that fails with UNAVAILABLE is
retried with exponential backoff and jitter while time is left, and what still fails is raised
as a `kvpool.errors` exception. Calls that run out of time trip a circuit breaker: after two in a
row, calls fail at once for a couple of seconds (then one probes), so a hung store costs misses,
not waits. On the generation path, catch `KvpoolError` and treat the store as a miss:

    with StoreClient("127.0.0.1:50052", timeout_s=0.5) as store:
        try:
            present = store.lookup(chain)
        except KvpoolError:
            present = 0  # the store is down: prefill everything, never fail the request

Puts are idempotent (the same key always gets the same bytes), so retrying them is safe.

A large Get is split into up to `streams` contiguous slices fetched at once, each on a channel of
its own (its own TCP connection, so with `kvpool store serve --processes N` the slices are served
by different processes, and each process fans out to the Redis Cluster shards): one fetch uses
several cores on the far side. The values still come back in request order, every slice is
checked like a whole Get, and a slice that fails fails the whole call.
"""

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import grpc.experimental

from kvpool.errors import (
    DataLoss,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from kvpool.v1 import store_pb2, store_pb2_grpc
from services.auth import call_metadata
from services.grpc_server import message_options
from services.status import error_from_rpc, retry_pushback_s
from services.store.breaker import Breaker
from services.store.chunks import (
    DEFAULT_CHUNK_BYTES,
    MESSAGE_MARGIN_BYTES,
    SERVICE_NAME,
    ValueAssembler,
    put_chunks,
)
from services.store.dataclient import DataPath
from services.store.datawire import Unencodable

T = TypeVar("T")
log = logging.getLogger(__name__)

DATA_RETRY_S = 2.0  # after a data path failure (or none advertised), gRPC until then


def _target_host(target: str) -> str | None:
    """The host of a plain `host:port` target ([v6]:port too); None for other gRPC targets."""
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or "/" in host or not host:
        return None
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _keep_value(found: dict[str, bytes], key: str, value: bytes | None) -> None:
    if value is not None:
        found[key] = value


class _Arrivals:
    """Values of one Get by index, filled by the slices' threads and read in order."""

    def __init__(self, count: int) -> None:
        self._values: dict[int, bytes | None] = {}
        self._failures: list[tuple[int, int, BaseException]] = []
        self._ready = threading.Condition()

    def put(self, index: int, value: bytes | None) -> None:
        with self._ready:
            self._values[index] = value
            self._ready.notify_all()

    def fail(self, lo: int, hi: int, exc: BaseException) -> None:
        with self._ready:
            self._failures.append((lo, hi, exc))
            self._ready.notify_all()

    def wait(self, index: int) -> bytes | None:
        with self._ready:
            while True:
                if index in self._values:
                    return self._values.pop(index)
                for lo, hi, exc in self._failures:
                    if lo <= index < hi:
                        raise exc
                self._ready.wait()


@dataclass(frozen=True, slots=True)
class StoreStats:
    """The store's figures; None where its backend cannot tell (docs/store.md, "Stats")."""

    backend: str
    keys: int | None
    bytes: int | None
    capacity_bytes: int | None
    hits: int
    misses: int
    puts: int
    evictions: int | None


def _check_settings(
    timeout_s: float, retries: int, chunk_bytes: int, streams: int, min_keys_per_stream: int
) -> None:
    if timeout_s <= 0 or retries < 0 or chunk_bytes <= 0:
        raise ValueError("timeout_s and chunk_bytes must be positive and retries >= 0")
    if not 1 <= streams <= 64 or min_keys_per_stream < 1:
        raise ValueError(
            f"streams must be 1 to 64 and min_keys_per_stream positive, got {streams} and "
            f"{min_keys_per_stream}"
        )


def _open_channels(
    target: str,
    credentials: grpc.ChannelCredentials | None,
    count: int,
    chunk_bytes: int,
    options: Sequence[tuple[str, Any]],
) -> list[grpc.Channel]:
    channel_options = [
        *message_options(chunk_bytes + MESSAGE_MARGIN_BYTES),
        # gRPC waits 1 s (growing to 120 s) before reconnecting after a failure, and fails
        # calls fast meanwhile; a store that restarts should be back within our retries.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2000),
        # Get streams are read on the calling thread instead of being handed over from
        # gRPC's polling thread message by message: about a third less client CPU here.
        (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1),
        *options,
        # Its own connection per channel (gRPC otherwise shares one between equal channels),
        # so the slices of a Get reach different store processes behind one SO_REUSEPORT port.
        ("grpc.use_local_subchannel_pool", 1),
    ]
    if credentials is None:
        return [grpc.insecure_channel(target, options=channel_options) for _ in range(count)]
    return [grpc.secure_channel(target, credentials, options=channel_options) for _ in range(count)]


class StoreClient:
    def __init__(
        self,
        target: str,
        *,
        timeout_s: float = 5.0,
        retries: int = 3,
        auth_token: str | None = None,
        backoff_s: float = 0.05,
        max_backoff_s: float = 1.0,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
        streams: int = 4,
        min_keys_per_stream: int = 4,
        data_path: bool = True,
    ) -> None:
        _check_settings(timeout_s, retries, chunk_bytes, streams, min_keys_per_stream)
        self.target = target
        self._timeout_s = timeout_s
        self._retries = retries
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._chunk_bytes = chunk_bytes
        # Connections open on first use: the extra channels cost nothing until a large Get.
        self._channels = _open_channels(target, credentials, streams, chunk_bytes, options)
        self._channel = self._channels[0]
        self._stub = store_pb2_grpc.KVStoreStub(self._channel)
        # Get responses and Put requests stay raw bytes, encoded and parsed by `framing`
        # (protobuf-compatible, fewer copies); the other methods use the generated stub.
        self._gets = [
            each.unary_stream(
                f"/{SERVICE_NAME}/Get",
                request_serializer=store_pb2.GetRequest.SerializeToString,
                _registered_method=True,
            )
            for each in self._channels
        ]
        self._min_keys_per_stream = min_keys_per_stream
        self._slices: ThreadPoolExecutor | None = None  # started at the first split Get
        self._slices_lock = threading.Lock()
        self._put = self._channel.stream_unary(
            f"/{SERVICE_NAME}/Put",
            response_deserializer=store_pb2.PutResponse.FromString,
            _registered_method=True,
        )
        self._metadata = call_metadata(auth_token)
        self.breaker = Breaker(f"the store at {target}", threshold=2)
        # The data path (dataclient.py), one per channel: Stats on channel n names the data port
        # of the store process that channel reached, so behind --processes N the slices still
        # spread over the processes. Found on first use, never over TLS (it would bypass it).
        # After a failure it is dropped, and looked up again DATA_RETRY_S later.
        self._data_wanted = data_path and credentials is None
        self._data: list[DataPath | None] = [None] * streams
        self._data_retry_at = [0.0] * streams
        self._data_lock = threading.Lock()
        self._auth_token = auth_token

    def _call(self, what: str, attempt: Callable[[float], T], deadline: float | None = None) -> T:
        """Run `attempt(seconds left)` until it succeeds, fails for good or time runs out."""
        self.breaker.check()
        if deadline is None:
            deadline = time.monotonic() + self._timeout_s
        for n in range(self._retries + 1):
            try:
                result = attempt(deadline - time.monotonic())
            except grpc.RpcError as err:
                code = err.code()  # type: ignore[attr-defined]
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    self.breaker.failure()  # a store that does not answer: stop waiting on it
                pushback = retry_pushback_s(err)  # the store's breaker is open: not before then
                if (
                    code != grpc.StatusCode.UNAVAILABLE
                    or n == self._retries
                    or (pushback is not None and time.monotonic() + pushback >= deadline)
                ):
                    raise error_from_rpc(err, f"store {what} at {self.target}") from err
            else:
                self.breaker.success()
                return result
            # Equal jitter: at least half the exponential step, so retries still spread out.
            step = min(self._max_backoff_s, self._backoff_s * 2**n)
            pause = step / 2 + random.uniform(0, step / 2)
            pause = max(pause, pushback or 0.0)
            if time.monotonic() + pause >= deadline:
                break
            time.sleep(pause)
        raise Unavailable(f"store {what} at {self.target}: no answer within {self._timeout_s:g} s")

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Block until the channel connects; Unavailable after `timeout_s` (default timeout_s)."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout_s or self._timeout_s)
        except grpc.FutureTimeoutError as exc:
            raise Unavailable(f"store at {self.target} not reachable") from exc

    def lookup(self, keys: Sequence[str]) -> int:
        """How many of `keys`, from the start, are present (one RPC for the whole chain)."""
        if not keys:
            return 0
        deadline = time.monotonic() + self._timeout_s
        present = self._on_data_path(0, deadline, lambda data: data.lookup(list(keys), deadline))
        if present is not None:
            return present
        request = store_pb2.LookupRequest(keys=keys)

        def attempt(timeout: float) -> int:
            reply = self._stub.Lookup(request, timeout=timeout, metadata=self._metadata)
            return reply.present

        return self._call("Lookup", attempt, deadline)

    # --- the data path ---------------------------------------------------------------------

    def _data_path(self, n: int, deadline: float) -> DataPath | None:
        """Channel n's data path, or None (off, not advertised, recently failed, or the store's
        circuit open): gRPC. While the circuit is open the call goes to gRPC's `_call`, which
        fails fast or lets it through as the probe whose answer closes the circuit (a data
        path call never takes the probe: it would not report back)."""
        if not self._data_wanted or self.breaker.is_open:
            return None
        if self._data[n] is not None:
            return self._data[n]
        with self._data_lock:
            if self._data[n] is not None or time.monotonic() < self._data_retry_at[n]:
                return self._data[n]
            self._data_retry_at[n] = time.monotonic() + DATA_RETRY_S
            host = _target_host(self.target)
            left = deadline - time.monotonic()
            if host is None or left <= 0:
                return None
            try:
                reply = store_pb2_grpc.KVStoreStub(self._channels[n]).Stats(
                    store_pb2.StatsRequest(), timeout=min(left, 1.0), metadata=self._metadata
                )
            except grpc.RpcError:
                return None  # gRPC will say what is wrong
            if not reply.HasField("data_port"):
                return None
            # Two connections: a get_iter and a get_many at once on the same slice.
            self._data[n] = DataPath(host, reply.data_port, self._auth_token, 2)
            return self._data[n]

    def _on_data_path(
        self,
        n: int,
        deadline: float,
        call: Callable[[DataPath], T | None],
        keep_on: tuple[type[Exception], ...] = (),
    ) -> T | None:
        """`call` on channel n's data path: its answer (the store answered: the circuit closes),
        or None for gRPC to answer instead (no data path, no connection free, or it failed:
        then it is dropped for a while, unless the error is one of `keep_on`). A bad or
        repeated key is the caller's mistake, raised as gRPC would raise it."""
        data = self._data_path(n, deadline)
        if data is None:
            return None
        try:
            result = call(data)
        except InvalidArgument:
            raise
        except keep_on:
            return None
        except Exception as exc:
            self._data_failed(n, data, exc)
            return None
        if result is not None:
            self.breaker.success()
        return result

    def _data_failed(self, n: int, data: DataPath, exc: Exception) -> None:
        log.debug("store data path at %s:%d failed, using gRPC: %s", data.host, data.port, exc)
        with self._data_lock:
            if self._data[n] is data:
                self._data[n] = None
                self._data_retry_at[n] = time.monotonic() + DATA_RETRY_S
        data.close()

    def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        """The values of the present keys, in request order; missing keys are absent.

        At least `2 * min_keys_per_stream` keys are split over up to `streams` concurrent Gets.
        After a retryable failure mid-stream, only the keys not answered yet are asked again.
        """
        keys = list(keys)
        slices = self._split(keys)
        if len(slices) <= 1:
            found: dict[str, bytes] = {}
            self._get_slice(0, keys, lambda i, v: _keep_value(found, keys[i], v))
            return {key: found[key] for key in keys if key in found}  # request order
        pool = self._pool()
        parts: list[dict[str, bytes]] = [{} for _ in slices]

        def fetch(n: int) -> None:
            lo, hi = slices[n]
            self._get_slice(n, keys[lo:hi], lambda i, v: _keep_value(parts[n], keys[lo + i], v))

        futures: list[Future[None]] = [pool.submit(fetch, n) for n in range(1, len(slices))]
        outcomes: list[BaseException | None] = []
        try:
            fetch(0)
            outcomes.append(None)
        except Exception as exc:  # wait for the other slices before raising
            outcomes.append(exc)
        outcomes += [future.exception() for future in futures]
        for outcome in outcomes:
            if outcome is not None:
                raise outcome
        merged = {key: value for part in parts for key, value in part.items()}
        return {key: merged[key] for key in keys if key in merged}  # request order

    def get_iter(self, keys: Sequence[str]) -> Iterator[tuple[str, bytes | None]]:
        """(key, value, or None when missing) for every key in request order, each as soon as it
        and the keys before it have arrived, so the caller can decode while the rest is in flight.

        Sliced over several streams as `get_many`, all read on the client's threads. A failed
        slice raises when the caller reaches its first unanswered key. A caller that stops early
        leaves its slices to finish (bounded by the deadline) on the client's threads.
        """
        keys = list(keys)
        if not keys:
            return
        arrivals = _Arrivals(len(keys))
        pool = self._pool()
        for n, (lo, hi) in enumerate(self._split(keys)):
            pool.submit(self._feed, n, keys[lo:hi], lo, arrivals)
        for index, key in enumerate(keys):
            yield key, arrivals.wait(index)

    def _split(self, keys: list[str]) -> list[tuple[int, int]]:
        """[lo, hi) bounds of the slices a Get of `keys` is split into (at least one)."""
        parts = max(1, min(len(self._gets), len(keys) // self._min_keys_per_stream))
        bounds = [len(keys) * i // parts for i in range(parts + 1)]
        return [(bounds[i], bounds[i + 1]) for i in range(parts)]

    def _pool(self) -> ThreadPoolExecutor:
        with self._slices_lock:
            if self._slices is None:  # bounded: one thread per channel
                self._slices = ThreadPoolExecutor(len(self._gets), thread_name_prefix="store-get")
            return self._slices

    def _feed(self, n: int, keys: list[str], offset: int, arrivals: "_Arrivals") -> None:
        try:
            self._get_slice(n, keys, lambda i, v: arrivals.put(offset + i, v))
        except BaseException as exc:  # the caller raises it when it reaches the slice's gap
            arrivals.fail(offset, offset + len(keys), exc)

    def _get_slice(
        self, n: int, keys: list[str], on_value: Callable[[int, bytes | None], None]
    ) -> None:
        """One Get stream for `keys`, checked and retried as a whole call: `on_value(i, value)`
        once per key, in order, as each arrives (value None for a missing key)."""
        remaining = list(range(len(keys)))
        deadline = time.monotonic() + self._timeout_s
        get = self._gets[n]
        answered = 0

        def arrived(i: int, value: bytes | None) -> None:
            nonlocal answered
            on_value(i, value)
            answered = i + 1

        def on_data_path(data: DataPath) -> bool | None:
            return data.get(keys, deadline, arrived) or None  # False: no connection was free

        if keys and self._on_data_path(n, deadline, on_data_path):
            return
        remaining = remaining[answered:]  # after a failure: gRPC asks for the rest only

        def attempt(timeout: float) -> None:
            nonlocal remaining
            asked = remaining
            answered: set[int] = set()
            assembler = ValueAssembler(len(asked))
            request = store_pb2.GetRequest(keys=[keys[i] for i in asked])
            call = get(request, timeout=timeout, metadata=self._metadata)
            try:
                for chunk in call:
                    for index, value in assembler.add(chunk):
                        answered.add(index)
                        on_value(asked[index], value)
            except DataLoss:
                call.cancel()
                raise
            finally:
                remaining = [key for n, key in enumerate(asked) if n not in answered]
            if remaining:
                raise DataLoss(f"store Get at {self.target} left {len(remaining)} keys unanswered")

        if remaining:
            self._call("Get", attempt, deadline)

    def put_many(self, items: Sequence[tuple[str, bytes]], ttl_s: int | None = None) -> int:
        """Write blocks (each atomically); returns how many the store kept.

        `ttl_s` None or 0 uses the server's default TTL (--ttl).
        """
        if not items:
            return 0
        if ttl_s is not None and ttl_s < 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")

        deadline = time.monotonic() + self._timeout_s
        # A limit (a block too large, the store's connections) or a key or value the data path
        # cannot carry: gRPC answers it, and the data path stays on.
        stored = self._on_data_path(
            0, deadline, lambda data: data.put(list(items), ttl_s or 0, deadline),
            keep_on=(ResourceExhausted, Unencodable),
        )  # fmt: skip
        if stored is not None:
            return stored

        def attempt(timeout: float) -> int:
            chunks = put_chunks(items, ttl_s, self._chunk_bytes)
            reply = self._put(chunks, timeout=timeout, metadata=self._metadata)
            return reply.stored

        return self._call("Put", attempt, deadline)

    def delete(self, keys: Sequence[str]) -> int:
        """Remove keys; returns how many existed."""
        if not keys:
            return 0
        request = store_pb2.DeleteRequest(keys=keys)

        def attempt(timeout: float) -> int:
            reply = self._stub.Delete(request, timeout=timeout, metadata=self._metadata)
            return reply.deleted

        return self._call("Delete", attempt)

    def stats(self) -> StoreStats:
        def attempt(timeout: float) -> StoreStats:
            r = self._stub.Stats(store_pb2.StatsRequest(), timeout=timeout, metadata=self._metadata)

            def opt(name: str) -> int | None:
                return getattr(r, name) if r.HasField(name) else None

            return StoreStats(
                backend=r.backend,
                keys=opt("keys"),
                bytes=opt("bytes"),
                capacity_bytes=opt("capacity_bytes"),
                hits=r.hits,
                misses=r.misses,
                puts=r.puts,
                evictions=opt("evictions"),
            )

        return self._call("Stats", attempt)

    def close(self) -> None:
        for data in self._data:
            if data is not None:
                data.close()
        if self._slices is not None:
            self._slices.shutdown(wait=True)
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> "StoreClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
