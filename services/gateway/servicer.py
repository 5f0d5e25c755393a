"""The Inference servicer: convert from proto, call `InferenceCore`, convert back.

No logic lives here beyond the conversion. Errors are raised as `kvpool.errors` exceptions and
mapped to status codes by the server (`services.aio_server`). It runs on `grpc.aio`: the core
blocks (on Ray, on the tokenizer), so each of its steps runs in a thread of the servicer's own
limiter (`max_threads`, shared by every call), and a call waiting on its client (for its request
message, or for room to write the next token) holds no thread at all.
"""

import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import anyio
import grpc
from anyio import CapacityLimiter

from kvpool.errors import InvalidArgument
from kvpool.v1 import inference_pb2 as pb
from kvpool.v1 import inference_pb2_grpc
from services.auth import TokenTable, caller_tenant, request_authorization
from services.gateway.api import Delta, Finished, GenerateCall, PrefillCall, Usage
from services.gateway.core import InferenceCore
from services.gateway.http.bridge import CoreStream
from workers.api import ChatMessage, PromptInput, SamplingParams

T = TypeVar("T")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inference"].full_name

FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "eos": pb.FINISH_REASON_EOS,
}


def tenant_of(
    request_tenant: str, context: grpc.aio.ServicerContext, auth: TokenTable | None
) -> str:
    """The tenant a call acts for (`services.auth.caller_tenant`, the rule both APIs share)."""
    sent = None if auth is None else request_authorization(context.invocation_metadata())
    return caller_tenant(request_tenant, sent, auth)


def prompt_input(request: pb.GenerateRequest | pb.PrefillRequest) -> PromptInput:
    kind = request.WhichOneof("input")
    if kind == "prompt":
        return PromptInput(prompt=request.prompt)
    if kind == "messages":
        return PromptInput(
            messages=tuple(ChatMessage(m.role, m.content) for m in request.messages.messages)
        )
    if kind == "token_ids":
        return PromptInput(token_ids=tuple(request.token_ids.ids))
    raise InvalidArgument("the request has no input; set one of prompt, messages or token_ids")


def sampling_params(sampling: pb.SamplingParams) -> SamplingParams:
    defaults = SamplingParams()
    # proto3 `optional` gives presence: an absent field takes the default, a present 0 is sent on.
    return SamplingParams(
        max_new_tokens=(
            sampling.max_new_tokens
            if sampling.HasField("max_new_tokens")
            else defaults.max_new_tokens
        ),
        temperature=sampling.temperature if sampling.HasField("temperature") else 0.0,
        top_k=sampling.top_k if sampling.HasField("top_k") else 0,
        top_p=sampling.top_p if sampling.HasField("top_p") else 1.0,
        seed=sampling.seed if sampling.HasField("seed") else None,
        stop=tuple(sampling.stop),
        ignore_eos=sampling.ignore_eos,
    )


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(
        self, core: InferenceCore, auth: TokenTable | None = None, max_threads: int = 64
    ) -> None:
        self.core = core
        self.auth = auth
        self.limiter = CapacityLimiter(max_threads)

    async def _run(self, fn: Callable[[], T]) -> T:
        return await anyio.to_thread.run_sync(fn, limiter=self.limiter)

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        call = GenerateCall(
            input=prompt_input(request),
            params=sampling_params(request.sampling),
            session_id=request.session_id,
            tenant=tenant_of(request.tenant, context, self.auth),
            max_cache_tokens=(
                request.max_cache_tokens if request.HasField("max_cache_tokens") else None
            ),
            sink_tokens=request.sink_tokens if request.HasField("sink_tokens") else None,
        )
        cancelled = threading.Event()
        # Set when the call ends, a client's cancel included, even while a step is in its thread:
        # the core then stops waiting for the worker and tells it to stop.
        context.add_done_callback(lambda _: cancelled.set())
        stream = CoreStream(self.core.generate(call, cancelled), cancelled, self.limiter)
        self.core.metrics.in_flight.inc()
        try:
            while (item := await stream.next()) is not None:
                if isinstance(item, Delta):
                    yield pb.GenerateResponse(text=item.text, token_ids=item.token_ids)
                elif isinstance(item, Finished):
                    yield pb.GenerateResponse(
                        finish_reason=FINISH_REASONS[item.finish_reason],
                        usage=usage_proto(item.usage),
                    )
        finally:
            await stream.close()  # the route released, the worker told to stop if unfinished
            self.core.metrics.in_flight.dec()

    async def Prefill(
        self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> pb.PrefillResponse:
        started = time.perf_counter()
        call = PrefillCall(
            input=prompt_input(request), tenant=tenant_of(request.tenant, context, self.auth)
        )
        result = await self._run(lambda: self.core.prefill(call))
        return pb.PrefillResponse(
            prompt_tokens=result.prompt_tokens,
            stored_tokens=result.stored_tokens,
            cached_tokens=result.cached_tokens,
            worker=result.worker,
            elapsed_ms=(time.perf_counter() - started) * 1000.0,
        )

    async def GetSession(
        self, request: pb.GetSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.Session:
        tenant = tenant_of(request.tenant, context, self.auth)
        session, text = await self._run(lambda: self.core.get_session(tenant, request.session_id))
        return pb.Session(
            session_id=session.session_id,
            token_ids=session.token_ids,
            text=text,
            turns=session.turns,
            created_unix_s=session.created_unix_s,
            updated_unix_s=session.updated_unix_s,
            max_cache_tokens=session.max_cache_tokens,
            sink_tokens=session.sink_tokens,
        )

    async def DeleteSession(
        self, request: pb.DeleteSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteSessionResponse:
        tenant = tenant_of(request.tenant, context, self.auth)
        await self._run(lambda: self.core.delete_session(tenant, request.session_id))
        return pb.DeleteSessionResponse()


def usage_proto(usage: Usage) -> pb.Usage:
    """The proto's `Usage`: the worker's figures and the gateway's own."""
    work = usage.work
    return pb.Usage(
        prompt_tokens=work.prompt_tokens,
        cached_tokens=work.cached_tokens,
        cached_tokens_by_tier=pb.CachedTokensByTier(
            local=work.cached_local_tokens,
            store=work.cached_store_tokens,
            node=work.cached_node_tokens,
        ),
        completion_tokens=work.completion_tokens,
        ttft_ms=usage.ttft_ms,
        tokens_per_s=work.tokens_per_s,
        worker=work.worker,
        session_id=usage.session_id,
        failovers=usage.failovers,
        evicted_tokens=work.evicted_tokens,
        plan=work.plan,
        recomputed_tokens=work.recomputed_tokens,
        session_saved=usage.session_saved,
    )
