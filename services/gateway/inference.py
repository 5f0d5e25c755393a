"""What the gateway does per request, in domain types (no protobuf here; see `servicer`).

Generate: resolve the session, tokenize on a worker, hash the full blocks, route, stream from
the worker, and on a worker's death resume on another one with the tokens already streamed as
`prior_output`. The client's stream simply continues: the new worker rebuilds the cache from the
stored blocks, recomputes the short tail, and carries on from the next token.
"""

import contextlib
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import ray
from ray.exceptions import GetTimeoutError, RayTaskError

from kvpool.errors import InvalidArgument, ResourceExhausted, Unavailable
from services.gateway.metrics import GatewayMetrics
from services.gateway.pool import WORKER_GONE, WorkerPool, call, unwrap
from services.gateway.router import Route
from services.gateway.sessions import LiveSessions, Session, SessionStore, check_session_id
from workers.engine import SamplingParams, TokenEvent
from workers.inputs import PromptInput
from workers.kv.hashing import BlockHash, Namespace, chain_hashes, tenant_salt
from workers.window import DEFAULT_SINK_TOKENS, requested_window
from workers.worker import PrefillResult, WorkDone, WorkRequest, WorkUsage

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    max_failovers: int = 3
    # A worker silent for this long between two tokens is treated as dead: killed and replaced.
    token_timeout_s: float = 300.0
    # Limits (0: none beyond the model's context). A prompt counts a session's history too.
    max_prompt_tokens: int = 0
    max_new_tokens: int = 0
    max_sessions: int = 0  # live sessions this gateway has opened and not seen expire
    max_sessions_per_tenant: int = 0  # of those, one tenant's (0: only max_sessions)
    # Keys the tenant salt of block hashes, as in the workers (WorkerConfig.namespace_secret).
    namespace_secret: bytes | None = field(default=None, repr=False)
    # The cache bound of requests that name none (and are not in a session that has one).
    max_cache_tokens: int = 0  # 0: unbounded
    sink_tokens: int = DEFAULT_SINK_TOKENS

    def __post_init__(self) -> None:
        if self.max_failovers < 0:
            raise ValueError(f"max_failovers must be >= 0, got {self.max_failovers}")
        if self.token_timeout_s <= 0:
            raise ValueError(f"token_timeout_s must be > 0, got {self.token_timeout_s}")
        for name in (
            "max_prompt_tokens",
            "max_new_tokens",
            "max_sessions",
            "max_sessions_per_tenant",
            "max_cache_tokens",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0: no limit), got {getattr(self, name)}")


@dataclass(frozen=True, slots=True)
class GenerateCall:
    input: PromptInput
    params: SamplingParams
    session_id: str = ""  # "" when the request is not part of a session
    tenant: str = ""
    # The cache bound (workers.window); None: the session's, else the gateway's default.
    max_cache_tokens: int | None = None
    sink_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class Delta:
    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    cached_local_tokens: int
    cached_store_tokens: int
    completion_tokens: int
    ttft_ms: float  # gateway receipt to first token
    tokens_per_s: float
    worker: str
    session_id: str
    failovers: int
    evicted_tokens: int = 0
    bounded: bool = False  # the request ran with max_cache_tokens

    @property
    def cached_tokens(self) -> int:
        return self.cached_local_tokens + self.cached_store_tokens


@dataclass(frozen=True, slots=True)
class Finished:
    finish_reason: str  # "stop" | "length" | "eos"
    usage: Usage


@dataclass(frozen=True, slots=True)
class PrefillCall:
    input: PromptInput
    tenant: str = ""


class InferenceCore:
    def __init__(
        self,
        pool: WorkerPool,
        sessions: SessionStore,
        metrics: GatewayMetrics,
        config: GatewayConfig | None = None,
    ) -> None:
        self.pool = pool
        self.sessions = sessions
        self.metrics = metrics
        self.config = config or GatewayConfig()
        self.live_sessions = LiveSessions(
            sessions.ttl_s, per_tenant=self.config.max_sessions_per_tenant
        )

    # --- Generate ----------------------------------------------------------------------------

    def generate(
        self, req: GenerateCall, cancelled: threading.Event | None = None
    ) -> Iterator[Delta | Finished]:
        received = time.perf_counter()
        self.metrics.requests.labels(req.tenant).inc()
        self._check_new_tokens(req.params)
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
        """The stream of `generate`; sets `saved` once a session's turn is stored."""
        history = session.token_ids if session else ()
        window = self._window(req, session)
        prompt = self.pool.on_any(lambda h: h.encode.remote(req.input, history))
        self._check_fits(len(prompt), req.params, window)
        params = req.params
        if not params.greedy and params.seed is None:
            # Fix the seed here, so a failover continues the very same sample.
            params = replace(params, seed=secrets.randbits(63))
        hashes = chain_hashes(self._namespace(req.tenant), prompt)

        output: list[int] = []
        failovers = 0
        first_token_at: float | None = None
        done: WorkDone | None = None
        excluded: set[str] = set()
        last_worker = ""
        while done is None:
            done = self._finished_without_worker(prompt, output, params, last_worker)
            if done is not None:
                break
            route = self._acquire(hashes, frozenset(excluded))
            last_worker = route.worker_id
            self.pool.router.record(route.worker_id, hashes)
            request = WorkRequest(
                token_ids=tuple(prompt),
                params=params,
                tenant=req.tenant,
                prior_output=tuple(output),
                request_id=uuid.uuid4().hex,
                max_cache_tokens=window[0],
                sink_tokens=window[1],
            )
            try:
                for item in self._stream(route, request, cancelled):
                    if isinstance(item, WorkDone):
                        done = item
                        break
                    if first_token_at is None:
                        first_token_at = time.perf_counter()
                    output.append(item.token_id)
                    yield Delta(item.text, (item.token_id,))
            except _WorkerLost as lost:
                failovers += 1
                excluded.add(route.worker_id)
                self.metrics.failovers.inc()
                log.warning(
                    "worker %s lost after %d tokens (%s); failing over",
                    route.worker_id, len(output), lost,
                )  # fmt: skip
                if failovers > self.config.max_failovers:
                    raise Unavailable(
                        f"gave up after {failovers - 1} failovers; the last worker was lost: {lost}"
                    ) from None
                if not set(self.pool.live()) - excluded:
                    excluded.clear()  # replacements may be up; better any worker than none
            finally:
                self.pool.router.release(route)
            if done is None and cancelled is not None and cancelled.is_set():
                return  # the client went away: nothing to resume, nothing to save

        # The worker now holds (in L1) the prompt's and the output's blocks: a session's next turn
        # should find its way back there.
        fed = [*prompt, *done.token_ids][:-1]
        self.pool.router.record(done.usage.worker, chain_hashes(self._namespace(req.tenant), fed))
        if session is not None:
            self.sessions.save(session.with_turn([*prompt, *done.token_ids], window=window))
            self.live_sessions.touch(req.tenant, req.session_id)
            saved.set()
        ttft_ms = ((first_token_at or time.perf_counter()) - received) * 1000.0
        usage = Usage(
            prompt_tokens=len(prompt),
            cached_local_tokens=done.usage.cached_local_tokens,
            cached_store_tokens=done.usage.cached_store_tokens,
            completion_tokens=len(done.token_ids),
            ttft_ms=ttft_ms,
            tokens_per_s=done.usage.tokens_per_s,
            worker=done.usage.worker,
            session_id=req.session_id,
            failovers=failovers,
            evicted_tokens=done.usage.evicted_tokens,
            bounded=window[0] > 0,
        )
        self.metrics.observe_generate(usage, req.tenant)
        yield Finished(done.finish_reason, usage)

    def _stream(
        self, route: Route, request: WorkRequest, cancelled: threading.Event | None
    ) -> Iterator[TokenEvent | WorkDone]:
        """The worker's items; raises _WorkerLost when the worker dies or stalls."""
        try:
            handle = self.pool.handle(route.worker_id)
        except Unavailable as exc:
            raise _WorkerLost(str(exc)) from None
        refs = handle.generate.options(num_returns="streaming").remote(request)
        finished = False
        try:
            while True:
                if cancelled is not None and cancelled.is_set():
                    return
                try:
                    # `next` would block for good on a hung worker; wait with a deadline first.
                    ready, _ = ray.wait([refs], timeout=self.config.token_timeout_s)
                    if not ready:
                        raise GetTimeoutError("no token")
                    item = ray.get(next(refs), timeout=self.config.token_timeout_s)
                except StopIteration:
                    finished = True
                    return
                except WORKER_GONE as exc:
                    self.pool.mark_dead(route.worker_id)
                    raise _WorkerLost(type(exc).__name__) from None
                except GetTimeoutError:
                    self.pool.mark_dead(route.worker_id, kill=True)
                    raise _WorkerLost(f"no token for {self.config.token_timeout_s:.0f} s") from None
                except RayTaskError as exc:
                    raise unwrap(exc) from None
                yield item
                if isinstance(item, WorkDone):
                    finished = True
        finally:
            if not finished:
                # The client left (or we failed over): stop the worker spending its time on it.
                with contextlib.suppress(Exception):  # a dead worker is not generating anyway
                    handle.cancel.remote(request.request_id)

    def _finished_without_worker(
        self, prompt: list[int], output: list[int], params: SamplingParams, worker: str
    ) -> WorkDone | None:
        """The end of a stream whose worker died after its last token but before its summary."""
        if not output:
            return None
        if output[-1] in self.pool.info.eos_token_ids:
            reason = "eos"
        elif len(output) >= params.max_new_tokens:
            reason = "length"
        else:
            return None
        usage = WorkUsage(len(prompt), 0, 0, len(output), 0.0, 0.0, worker=worker)
        return WorkDone(finish_reason=reason, token_ids=tuple(output), text="", usage=usage)

    # --- Prefill -----------------------------------------------------------------------------

    def prefill(self, req: PrefillCall) -> PrefillResult:
        tokens = self.pool.on_any(lambda h: h.encode.remote(req.input, ()))
        self._check_fits(len(tokens), SamplingParams(max_new_tokens=1))
        hashes = chain_hashes(self._namespace(req.tenant), tokens)
        for _ in range(self.config.max_failovers + 1):
            route = self._acquire(hashes)
            try:
                result = call(self.pool.handle(route.worker_id).prefill.remote(tokens, req.tenant))
            except WORKER_GONE:
                self.pool.mark_dead(route.worker_id)
                continue
            finally:
                self.pool.router.release(route)
            self.pool.router.record(route.worker_id, hashes)
            return result
        raise Unavailable("no worker could prefill the prompt")

    # --- sessions ----------------------------------------------------------------------------

    def get_session(self, tenant: str, session_id: str) -> tuple[Session, str]:
        """The session and its history as text."""
        session = self.sessions.get(tenant, session_id)
        text = self.pool.on_any(lambda h: h.decode_text.remote(session.token_ids))
        return session, text

    def delete_session(self, tenant: str, session_id: str) -> None:
        self.sessions.delete(tenant, session_id)
        self.live_sessions.forget(tenant, session_id)

    # --- helpers -----------------------------------------------------------------------------

    def _open_session(self, req: GenerateCall) -> Session | None:
        if not req.session_id:
            return None
        check_session_id(req.session_id)
        session = self.sessions.open(req.tenant, req.session_id)
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
        salt = tenant_salt(tenant, self.config.namespace_secret)
        return Namespace(info.fingerprint, info.codec, info.block_tokens, salt)

    def _acquire(self, hashes: list[BlockHash], excluded: frozenset[str] = frozenset()) -> Route:
        try:
            return self.pool.router.acquire(hashes, excluded)
        except ResourceExhausted:
            self.metrics.limit_rejections.labels("max_requests_per_worker").inc()
            raise

    def _check_new_tokens(self, params: SamplingParams) -> None:
        limit = self.config.max_new_tokens
        if limit and params.max_new_tokens > limit:
            self.metrics.limit_rejections.labels("max_new_tokens").inc()
            raise InvalidArgument(
                f"max_new_tokens={params.max_new_tokens} exceeds the gateway's limit "
                f"--max-new-tokens={limit}"
            )

    def _window(self, req: GenerateCall, session: Session | None) -> tuple[int, int]:
        """The turn's (max_cache_tokens, sink_tokens): the request's, the session's, or ours.

        Checked here, before any worker is asked, so a bad bound is a clear INVALID_ARGUMENT.
        """
        max_cache_tokens, sink_tokens = self.config.max_cache_tokens, self.config.sink_tokens
        if session is not None and session.turns:
            max_cache_tokens, sink_tokens = session.max_cache_tokens, session.sink_tokens
        if req.max_cache_tokens is not None:
            max_cache_tokens = req.max_cache_tokens
        if req.sink_tokens is not None:
            sink_tokens = req.sink_tokens
        window = requested_window(max_cache_tokens, sink_tokens, self.pool.info.block_tokens)
        if window is not None and window.max_cache_tokens > self.pool.info.max_context:
            raise InvalidArgument(
                f"max_cache_tokens={max_cache_tokens} exceeds the model's context of "
                f"{self.pool.info.max_context} tokens"
            )
        return max_cache_tokens, sink_tokens

    def _check_fits(
        self, prompt_tokens: int, params: SamplingParams, window: tuple[int, int] = (0, 0)
    ) -> None:
        most = self.config.max_prompt_tokens
        if most and prompt_tokens > most:
            self.metrics.limit_rejections.labels("max_prompt_tokens").inc()
            raise InvalidArgument(
                f"prompt of {prompt_tokens} tokens (a session's history included) exceeds the "
                f"gateway's limit --max-prompt-tokens={most}"
            )
        limit = self.pool.info.max_context
        if window[0]:
            return  # a bounded cache holds at most max_cache_tokens positions, whatever the length
        if prompt_tokens + params.max_new_tokens > limit:
            raise InvalidArgument(
                f"prompt of {prompt_tokens} tokens plus max_new_tokens={params.max_new_tokens} "
                f"exceeds the model's context of {limit} tokens"
            )


class _WorkerLost(Exception):
    """The worker serving a stream died or stalled; the stream moves to another one."""
