"""The hostile clients of `kvpool bench load --abuse` (issue 14).

They run beside the well-behaved clients for the same duration, each cycling through the requests
the hardening review found dangerous:

- `oversized_bounded_prompt`: 1,000,000 token ids (about 2 MB) with `max_cache_tokens=2048`.
  A hardened gateway answers INVALID_ARGUMENT (`--max-prompt-tokens`) at once.
- `stop_flood`: 20,000 stop strings of 40 characters; INVALID_ARGUMENT (`--max-stop-strings`).
- `capped_stop_flood`: 16 stop strings of 256 characters, the most allowed; it generates, at a
  bounded cost per token.
- `idle_stream`: a Generate stream read up to its first token, then held open unread for 10 s;
  it holds a gateway thread, not a worker.
- `duplicate_key_get` (with `--store`): a store Get of one 256 KiB key repeated 256 times; the
  store's side of issue 14 refuses it or bounds its bytes.

Their outcomes are counted by kind and status code and reported apart from the well-behaved
clients' figures, whose errors alone decide the exit status.
"""

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

KINDS = (
    "oversized_bounded_prompt",
    "stop_flood",
    "capped_stop_flood",
    "idle_stream",
    "duplicate_key_get",
)
IDLE_HOLD_S = 10.0
DUPLICATE_KEY = "kvpool:bench:abuse:duplicate"
DUPLICATE_VALUE_BYTES = 256 << 10
DUPLICATES = 256


@dataclass(frozen=True, slots=True)
class Attempt:
    kind: str
    code: str  # "OK" or the gRPC status code name
    seconds: float


def drive(
    target: str,
    clients: int,
    stop_at: float,
    timeout_s: float,
    store: str | None = None,
    store_token: str | None = None,
) -> list[Attempt]:
    """Run `clients` hostile threads until `stop_at` (a `time.perf_counter()` value)."""
    kinds = [k for k in KINDS if store or k != "duplicate_key_get"]
    if store:
        _plant_duplicate(store, store_token, timeout_s)
    attempts: list[Attempt] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        import grpc

        from kvpool.v1 import inference_pb2_grpc

        requests = _requests()
        order = random.Random(index)
        with grpc.insecure_channel(target, options=_channel_options()) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            n = index
            while time.perf_counter() < stop_at:
                kind = kinds[n % len(kinds)] if n < len(kinds) else order.choice(kinds)
                attempt = _one(kind, stub, requests, timeout_s, stop_at, store, store_token)
                with lock:
                    attempts.append(attempt)
                n += 1

    threads = [
        threading.Thread(target=client, args=(i,), name=f"abuse-client-{i}", daemon=True)
        for i in range(clients)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, stop_at - time.perf_counter()) + timeout_s + 30)
    return attempts


def summarize(attempts: list[Attempt]) -> dict[str, Any]:
    """Per kind: how many, by status code, and the slowest answer."""
    out: dict[str, Any] = {}
    for kind in sorted({a.kind for a in attempts}):
        mine = [a for a in attempts if a.kind == kind]
        out[kind] = {
            "requests": len(mine),
            "codes": dict(Counter(a.code for a in mine)),
            "max_seconds": round(max(a.seconds for a in mine), 2),
        }
    return out


def _channel_options() -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", 64 << 20)]


def _requests() -> dict[str, Any]:
    from services.gateway.client import build_request

    return {
        "oversized_bounded_prompt": build_request(
            token_ids=[1 + i % 1000 for i in range(1_000_000)],
            max_new_tokens=8,
            max_cache_tokens=2048,
        ),
        "stop_flood": build_request(
            prompt="Write a long story.",
            max_new_tokens=8,
            stop=[f"{i:08d}" + "x" * 32 for i in range(20_000)],
        ),
        "capped_stop_flood": build_request(
            prompt="Write a long story.",
            max_new_tokens=16,
            stop=[f"{i:02d}" + "\u2603" * 254 for i in range(16)],
        ),
        "idle_stream": build_request(prompt="Count to one hundred.", max_new_tokens=64),
    }


def _one(
    kind: str,
    stub: Any,
    requests: dict[str, Any],
    timeout_s: float,
    stop_at: float,
    store: str | None,
    store_token: str | None,
) -> Attempt:
    import grpc

    started = time.perf_counter()
    code = "OK"
    try:
        if kind == "duplicate_key_get":
            code = _duplicate_get(store or "", store_token, timeout_s)
        elif kind == "idle_stream":
            call = stub.Generate(requests[kind], timeout=timeout_s)
            try:
                next(call)
                # Hold it open, unread, until the hold is over or the load ends.
                time.sleep(max(0.0, min(IDLE_HOLD_S, stop_at - time.perf_counter())))
            finally:
                call.cancel()
        else:
            for _ in stub.Generate(requests[kind], timeout=timeout_s):
                pass
    except grpc.RpcError as err:
        code = err.code().name if isinstance(err, grpc.Call) else "UNKNOWN"
    return Attempt(kind, code, time.perf_counter() - started)


def _plant_duplicate(store: str, token: str | None, timeout_s: float) -> None:
    from services.store.client import StoreClient

    with StoreClient(store, timeout_s=timeout_s, auth_token=token) as client:
        client.put_many([(DUPLICATE_KEY, b"\x00" * DUPLICATE_VALUE_BYTES)])


def _duplicate_get(store: str, token: str | None, timeout_s: float) -> str:
    from kvpool.errors import KvpoolError
    from services.store.client import StoreClient

    with StoreClient(store, timeout_s=timeout_s, auth_token=token) as client:
        try:
            client.get_many([DUPLICATE_KEY] * DUPLICATES)
        except KvpoolError as exc:
            return str(exc).split(": ")[1] if ": " in str(exc) else type(exc).__name__
    return "OK"
