"""Running a KVWorker request to the end in a test."""

from workers.api import WorkDone, WorkerConfig, WorkRequest
from workers.worker import KVWorker


def run(worker: KVWorker, request: WorkRequest) -> WorkDone:
    """Every event of `request`; checks that the streamed tokens are the output's new tokens."""
    items = list(worker.generate(request))
    done = items[-1]
    assert isinstance(done, WorkDone)
    assert [i.token_id for i in items[:-1]] == list(done.token_ids[len(request.prior_output) :])
    return done


# The namespace secret of the tests' workers, like one deployment's: workers share blocks
# through the store only under one secret.
NAMESPACE_SECRET = b"tests-namespace-secret-0123456789abcdef"


def make_worker(store, worker_id: str, **overrides) -> KVWorker:
    """A tiny-random worker on `store` (a started StoreServer); `overrides` go to WorkerConfig.

    fp16 keeps tiny-random's greedy output identical to the exact cache: its random logits have
    near-ties that int8 can flip (int8 is checked on SmolLM2). The fetch plan is pinned to
    "fetch": these tests check what each tier holds, and "auto" may rightly find that tiny-random
    recomputes faster than it fetches (the plan is tested in tests/workers/test_plan*.py).
    """
    config = dict(
        model="tiny-random",
        codec="fp16",
        block_tokens=16,
        store_target=store.target,
        fetch_plan="fetch",
        namespace_secret=NAMESPACE_SECRET,
    )
    config.update(overrides)
    return KVWorker(WorkerConfig(**config), worker_id)
