"""Aggregate Get throughput of several client processes at once: the KVStore against raw redis-py.

Each client is a process of its own (so no interpreter lock is shared), reads 1 MiB values in
batches of 16, and starts on a shared barrier; a row's figure is all the bytes read over the wall
time from the first start to the last finish. The store and raw redis-py rows use the same Redis.
"""

import multiprocessing
import os
import time
from typing import Any

VALUE_BYTES = 1 << 20
BATCH = 16


def _client(
    kind: str, url: str, target: str, keys: list[str], ops: int, barrier: Any, out: Any
) -> None:
    if kind == "store":
        from services.store.client import StoreClient

        client = StoreClient(target, timeout_s=120)

        def get() -> int:
            return len(client.get_many(keys))
    else:
        import redis

        raw = redis.Redis.from_url(url)

        def get() -> int:
            return sum(v is not None for v in raw.mget(keys))

    if get() != len(keys):  # warm-up, and a check that every key is there
        out.put((kind, 0.0, 0.0, 0))
        return
    barrier.wait()
    started = time.time()
    for _ in range(ops):
        get()
    out.put((kind, started, time.time(), ops * len(keys) * VALUE_BYTES))


def aggregate_get(url: str, target: str, client_counts: list[int], mib: int) -> list[dict]:
    """Rows {clients, store_get_gbps, redis_get_gbps, ratio} for each client count."""
    import redis

    raw = redis.Redis.from_url(url)
    value = os.urandom(VALUE_BYTES)
    most = max(client_counts)
    keys = [[f"bench:agg:{c}:{i}" for i in range(BATCH)] for c in range(most)]
    pipe = raw.pipeline(transaction=False)
    for batch in keys:
        for key in batch:
            pipe.set(key, value)
    pipe.execute()
    ops = max(4, mib // BATCH)  # each client reads about --mib MiB
    context = multiprocessing.get_context("spawn")
    rows = []
    try:
        for count in client_counts:
            row: dict[str, Any] = {"clients": count, "value_bytes": VALUE_BYTES}
            for kind in ("store", "redis"):
                barrier, out = context.Barrier(count), context.Queue()
                procs = [
                    context.Process(
                        target=_client, args=(kind, url, target, keys[c], ops, barrier, out)
                    )
                    for c in range(count)
                ]
                for proc in procs:
                    proc.start()
                results = [out.get(timeout=600) for _ in procs]
                for proc in procs:
                    proc.join(60)
                if any(moved == 0 for *_, moved in results):
                    raise RuntimeError(f"a {kind} client missed keys it should have found")
                wall = max(end for _, _, end, _ in results) - min(s for _, s, _, _ in results)
                row[f"{kind}_get_gbps"] = round(sum(m for *_, m in results) / wall / 1e9, 3)
            row["ratio"] = round(row["store_get_gbps"] / row["redis_get_gbps"], 3)
            rows.append(row)
    finally:
        raw.delete(*[key for batch in keys for key in batch])
        raw.close()
    return rows
