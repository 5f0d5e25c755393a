"""What the gateway does per request, in domain types (no protobuf here, see `servicer`; no Ray
here, see `pool`).

Generate: resolve the session, tokenize (here, with the workers' tokenizer), hash the full blocks,
route, stream from the worker, and on a worker's death resume on another one with the tokens
already streamed as `prior_output`. The client's stream simply continues: the new worker rebuilds
the cache from the stored blocks, recomputes the short tail, and carries on from the next token.
"""

import logging
import threading
import time
import uuid
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field

from kvpool.errors import KvpoolError, NotFound, ResourceExhausted, Unavailable
from services.gateway.admission import RequestLimits
from services.gateway.api import Delta, Finished, GenerateCall, PrefillCall, Usage
from services.gateway.metrics import GatewayMetrics
from services.gateway.pool import WorkerLost, WorkerPool
from services.gateway.router import Route
from services.gateway.sessions import LiveSessions, Session, SessionStore, check_session_id
from services.gateway.settings import GatewayConfig
from services.gateway.shares import TenantShares
from workers.api import (
    PrefillResult,
    PrefillTimeout,
    SamplingParams,
    WorkDone,
    WorkRequest,
    WorkUsage,
)
from workers.kv.hashing import BlockHash, Namespace, chain_hashes, tenant_salt

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Turn:
    """One Generate request resolved: its session, cache bound, prompt and the prompt's hashes."""

    call: GenerateCall
    session: Session | None
    window: tuple[int, int]  # (max_cache_tokens, sink_tokens)
    prompt: tuple[int, ...]  # a session's history included
    params: SamplingParams  # seeded
    hashes: list[BlockHash]


@dataclass(slots=True)
class _Progress:
    """One Generate stream's progress across the workers it runs on."""

    received: float  # perf_counter when the gateway took the request
    output: list[int] = field(default_factory=list)  # tokens streamed so far
    first_token_at: float | None = None
    failovers: int = 0
    excluded: set[str] = field(default_factory=set)  # workers lost in this stream
    last_worker: str = ""


class InferenceCore:
    def __init__(
        self,
        pool: WorkerPool,
        sessions: SessionStore,
        metrics: GatewayMetrics,
        config: GatewayConfig | None = None,
        *,
        tenants: int = 1,
    ) -> None:
        """`tenants`: how many tenants the gateway serves (its token file's); with more than
        one, each gets a default share of the workers (services.gateway.shares)."""
        self.pool = pool
        self.sessions = sessions
        self.metrics = metrics
        self.config = config or GatewayConfig()  # also sets self.limits
        self.live_sessions = LiveSessions(
            sessions.ttl_s, per_tenant=self.config.max_sessions_per_tenant
        )
        router = pool.router
        self.shares = TenantShares(
            lambda: len(router.workers()) * router.config.max_in_flight,
            self.config.max_requests_per_tenant,
            router.config.queue_timeout_s,
            reserve=tenants > 1,
        )

    @property
    def config(self) -> GatewayConfig:
        return self._config

    @config.setter
    def config(self, config: GatewayConfig) -> None:
        """A new config (tests change it mid-run) brings its limits with it."""
        self._config = config
        self.limits = RequestLimits(config, self.pool, self.metrics)

    # --- Generate ----------------------------------------------------------------------------

    def generate(
        self, req: GenerateCall, cancelled: threading.Event | None = None
    ) -> Iterator[Delta | Finished]:
        received = time.perf_counter()
        self.metrics.requests.labels(req.tenant).inc()
        self.limits.check_new_tokens(req.params)
        self.limits.check_stop(req.params)
        session = self._open_session(req)
        saved = threading.Event()
        try:
            yield from self._generate(req, cancelled, session, received, saved)
        finally:
            if session is not None and session.turns == 0 and not saved.is_set():
                # A first turn that failed or was cancelled leaves no session: free its slot.
                self.live_sessions.forget(req.tenant, req.session_id)

    def _generate(
        self,
        req: GenerateCall,
        cancelled: threading.Event | None,
        session: Session | None,
        received: float,
        saved: threading.Event,
    ) -> Iterator[Delta | Finished]:
        """The stream of `generate`: worker after worker until one finishes it (a lost worker's
        tokens so far go to the next as `prior_output`); sets `saved` once a session's turn is
        stored."""
        turn = self._turn(req, session)
        progress = _Progress(received)
        while True:
            done = self._finished_without_worker(turn, progress)
            if done is None:
                done = yield from self._run_on_worker(turn, progress, cancelled)
            if done is not None:
                break
            if cancelled is not None and cancelled.is_set():
                return  # the client went away: nothing to resume, nothing to save
        yield self._finish(turn, done, progress, saved)

    def _turn(self, req: GenerateCall, session: Session | None) -> _Turn:
        """The request resolved against its session: its cache bound, prompt and block hashes,
        each checked before any worker is asked."""
        window = self.limits.window(req, session)
        prompt = self.limits.encode(req.input, session.token_ids if session else ())
        self.limits.check_fits(len(prompt), req.params, window)
        return _Turn(
            call=req,
            session=session,
            window=window,
            prompt=tuple(prompt),
            params=req.params.seeded(),  # fixed here: a failover continues the very same sample
            hashes=chain_hashes(self._namespace(req.tenant), prompt),
        )

    def _run_on_worker(
        self, turn: _Turn, progress: _Progress, cancelled: threading.Event | None
    ) -> Generator[Delta, None, WorkDone | None]:
        """One worker's part of the stream: its tokens, then its WorkDone; None when it was lost
        (counted in `progress`, see `_fail_over`) or the client left."""
        tenant = turn.call.tenant
        route = self._acquire(turn.hashes, frozenset(progress.excluded), tenant, cancelled)
        progress.last_worker = route.worker_id
        self.pool.router.record(route.worker_id, turn.hashes)
        request = WorkRequest(
            token_ids=turn.prompt,
            params=turn.params,
            tenant=tenant,
            prior_output=tuple(progress.output),
            request_id=uuid.uuid4().hex,
            max_cache_tokens=turn.window[0],
            sink_tokens=turn.window[1],
            prefill_timeout_s=self.config.prefill_timeout_s,
            block_hashes=tuple(turn.hashes),  # hashed once, here: the worker goes on from them
        )
        try:
            for item in self.pool.stream(
                route.worker_id,
                request,
                cancelled,
                self.config.token_timeout_s,
                self.config.prefill_timeout_s,
            ):
                if isinstance(item, WorkDone):
                    return item
                if progress.first_token_at is None:
                    progress.first_token_at = time.perf_counter()
                progress.output.append(item.token_id)
                yield Delta(item.text, (item.token_id,))
        except PrefillTimeout:
            self.metrics.limit_rejections.labels("prefill_timeout").inc()
            raise  # the request's own doing: another worker would take as long
        except WorkerLost as lost:
            self._fail_over(route.worker_id, lost, progress)
        finally:
            self._release(route, tenant)
        return None

    def _fail_over(self, worker_id: str, lost: WorkerLost, progress: _Progress) -> None:
        """Leave a lost worker out of the stream's next try; Unavailable past --max-failovers."""
        progress.failovers += 1
        progress.excluded.add(worker_id)
        self.metrics.failovers.inc()
        log.warning(
            "worker %s lost after %d tokens (%s); failing over",
            worker_id, len(progress.output), lost,
        )  # fmt: skip
        if progress.failovers > self.config.max_failovers:
            raise Unavailable(
                f"gave up after {progress.failovers - 1} failovers; the last worker was lost: "
                f"{lost}"
            ) from None
        if not self.pool.has_live(progress.excluded):
            progress.excluded.clear()  # replacements may be up; better any worker than none

    def _finish(
        self, turn: _Turn, done: WorkDone, progress: _Progress, saved: threading.Event
    ) -> Finished:
        """The stream's last item: the finished blocks recorded, the session's turn saved (then
        `saved` is set), the usage counted."""
        req, session = turn.call, turn.session
        # The worker now holds (in L1) the prompt's and the output's blocks: a session's next turn
        # should find its way back there.
        fed = [*turn.prompt, *done.token_ids][:-1]
        known = turn.hashes  # the prompt's; only the blocks the output completed are new
        more = chain_hashes(
            self._namespace(req.tenant), fed[len(known) * self.pool.info.block_tokens :],
            known[-1] if known else None,
        )  # fmt: skip
        self.pool.router.record(done.usage.worker, [*known, *more])
        session_saved = session is not None and self._save_turn(
            session.with_turn([*turn.prompt, *done.token_ids], window=turn.window)
        )
        if session_saved:
            saved.set()
        ttft_ms = ((progress.first_token_at or time.perf_counter()) - progress.received) * 1000.0
        usage = Usage(
            done.usage,
            ttft_ms=ttft_ms,
            session_id=req.session_id,
            failovers=progress.failovers,
            bounded=turn.window[0] > 0,
            session_saved=session_saved,
        )
        self.metrics.observe_generate(usage, req.tenant)
        return Finished(done.finish_reason, usage)

    def _finished_without_worker(self, turn: _Turn, progress: _Progress) -> WorkDone | None:
        """The end of a stream whose worker died after its last token but before its summary."""
        output = progress.output
        if not output:
            return None
        if output[-1] in self.pool.info.eos_token_ids:
            reason = "eos"
        elif len(output) >= turn.params.max_new_tokens:
            reason = "length"
        else:
            return None
        usage = WorkUsage(
            len(turn.prompt), 0, 0, len(output), 0.0, 0.0, worker=progress.last_worker
        )
        return WorkDone(finish_reason=reason, token_ids=tuple(output), text="", usage=usage)

    # --- Prefill -----------------------------------------------------------------------------

    def prefill(self, req: PrefillCall) -> PrefillResult:
        tokens = self.limits.encode(req.input)
        self.limits.check_fits(len(tokens), SamplingParams(max_new_tokens=1))
        hashes = chain_hashes(self._namespace(req.tenant), tokens)
        for _ in range(self.config.max_failovers + 1):
            route = self._acquire(hashes, tenant=req.tenant)
            try:
                result = self.pool.prefill(
                    route.worker_id, tokens, req.tenant, self.config.prefill_timeout_s
                )
            except PrefillTimeout:
                self.metrics.limit_rejections.labels("prefill_timeout").inc()
                raise
            except WorkerLost:
                continue
            finally:
                self._release(route, req.tenant)
            self.pool.router.record(route.worker_id, hashes)
            return result
        raise Unavailable("no worker could prefill the prompt")

    # --- sessions ----------------------------------------------------------------------------

    def get_session(self, tenant: str, session_id: str) -> tuple[Session, str]:
        """The session and its history as text."""
        session = self.sessions.get(tenant, session_id)
        text = self.pool.prompts.decode(session.token_ids)
        return session, text

    def delete_session(self, tenant: str, session_id: str) -> None:
        """Forget a session; a lost one (see `_open_session`) too, so its id may start anew."""
        lost = self.live_sessions.saved(tenant, session_id)
        self.live_sessions.forget(tenant, session_id)
        try:
            self.sessions.delete(tenant, session_id)
        except NotFound:
            if not lost:
                raise

    def _save_turn(self, session: Session) -> bool:
        """Store a session's turn; False, logged and counted, when the store cannot.

        The generation ran and its client has every token: it is not thrown away because the
        history could not be stored. The client sees `session_saved` false in the usage and may
        send the turn again; the session keeps its earlier turns.
        """
        try:
            self.sessions.save(session)
        except KvpoolError as exc:
            log.warning("session %r: its turn was not saved: %s", session.session_id, exc)
            self.metrics.session_save_failures.inc()
            return False
        self.live_sessions.touch(session.tenant, session.session_id)
        return True

    # --- helpers -----------------------------------------------------------------------------

    def _open_session(self, req: GenerateCall) -> Session | None:
        if not req.session_id:
            return None
        check_session_id(req.session_id)
        session = self.sessions.open(req.tenant, req.session_id)
        if session.turns == 0 and self.live_sessions.saved(req.tenant, req.session_id):
            # Saved here within its TTL, and gone from the store: lost, not new. Carrying on as
            # if new would answer with the history silently dropped.
            self.metrics.lost_sessions.inc()
            raise NotFound(
                f"session {req.session_id!r} was lost: the store no longer holds its history, "
                "though it has not expired; start a new session_id, or DeleteSession it to "
                "start this one anew"
            )
        limit, per_tenant = self.config.max_sessions, self.config.max_sessions_per_tenant
        if session.turns == 0 and (limit or per_tenant):
            refused = self.live_sessions.admit(req.tenant, req.session_id, limit)
            if refused is not None:
                n = limit if refused == "--max-sessions" else per_tenant
                whose = "" if refused == "--max-sessions" else " for this tenant"
                self.metrics.limit_rejections.labels(refused.lstrip("-").replace("-", "_")).inc()
                raise ResourceExhausted(
                    f"{n} live sessions already{whose} (limit {refused}={n}); delete one with "
                    "DeleteSession or wait for one to expire"
                )
        return session

    def _namespace(self, tenant: str) -> Namespace:
        info = self.pool.info
        # The workers' own secret: the gateway routes by the very keys they store under.
        salt = tenant_salt(tenant, self.pool.config.worker.namespace_secret)
        return Namespace(info.fingerprint, info.codec, info.block_tokens, salt)

    def _acquire(
        self,
        hashes: list[BlockHash],
        excluded: frozenset[str] = frozenset(),
        tenant: str = "",
        cancelled: threading.Event | None = None,
    ) -> Route:
        """A worker, within the tenant's share of the pool (`shares`); `_release` it after."""
        try:
            self.shares.acquire(tenant, cancelled)
        except ResourceExhausted:
            self.metrics.limit_rejections.labels("max_requests_per_tenant").inc()
            raise
        try:
            return self.pool.router.acquire(hashes, excluded)
        except ResourceExhausted:
            self.shares.release(tenant)
            self.metrics.limit_rejections.labels("max_requests_per_worker").inc()
            raise
        except BaseException:
            self.shares.release(tenant)
            raise

    def _release(self, route: Route, tenant: str) -> None:
        self.pool.router.release(route)
        self.shares.release(tenant)
