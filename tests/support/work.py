"""Running a KVWorker request to the end in a test."""

from workers.worker import KVWorker, WorkDone, WorkRequest


def run(worker: KVWorker, request: WorkRequest) -> WorkDone:
    """Every event of `request`; checks that the streamed tokens are the output's new tokens."""
    items = list(worker.generate(request))
    done = items[-1]
    assert isinstance(done, WorkDone)
    assert [i.token_id for i in items[:-1]] == list(done.token_ids[len(request.prior_output) :])
    return done
