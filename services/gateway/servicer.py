"""The Inference servicer: convert from proto, call `InferenceCore`, convert back.

No logic lives here beyond the conversion. Errors are raised as `kvpool.errors` exceptions and
mapped to status codes by `services.status.ErrorInterceptor`.
"""

import threading
import time
from collections.abc import Iterator

import grpc

from kvpool.errors import InvalidArgument
from kvpool.v1 import inference_pb2 as pb
from kvpool.v1 import inference_pb2_grpc
from services.auth import TokenTable, caller_tenant, request_authorization
from services.gateway.api import Delta, Finished, GenerateCall, PrefillCall
from services.gateway.core import InferenceCore
from workers.api import ChatMessage, PromptInput, SamplingParams

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inference"].full_name

FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "eos": pb.FINISH_REASON_EOS,
}


def tenant_of(request_tenant: str, context: grpc.ServicerContext, auth: TokenTable | None) -> str:
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
    )


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, core: InferenceCore, auth: TokenTable | None = None) -> None:
        self.core = core
        self.auth = auth

    def Generate(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateResponse]:
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
        context.add_callback(cancelled.set)  # runs when the call ends, a client cancel included
        self.core.metrics.in_flight.inc()
        try:
            for item in self.core.generate(call, cancelled):
                if isinstance(item, Delta):
                    yield pb.GenerateResponse(text=item.text, token_ids=item.token_ids)
                elif isinstance(item, Finished):
                    yield pb.GenerateResponse(
                        finish_reason=FINISH_REASONS[item.finish_reason], usage=_usage(item)
                    )
        finally:
            self.core.metrics.in_flight.dec()

    def Prefill(
        self, request: pb.PrefillRequest, context: grpc.ServicerContext
    ) -> pb.PrefillResponse:
        started = time.perf_counter()
        result = self.core.prefill(
            PrefillCall(
                input=prompt_input(request), tenant=tenant_of(request.tenant, context, self.auth)
            )
        )
        return pb.PrefillResponse(
            prompt_tokens=result.prompt_tokens,
            stored_tokens=result.stored_tokens,
            cached_tokens=result.cached_tokens,
            worker=result.worker,
            elapsed_ms=(time.perf_counter() - started) * 1000.0,
        )

    def GetSession(
        self, request: pb.GetSessionRequest, context: grpc.ServicerContext
    ) -> pb.Session:
        session, text = self.core.get_session(
            tenant_of(request.tenant, context, self.auth), request.session_id
        )
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

    def DeleteSession(
        self, request: pb.DeleteSessionRequest, context: grpc.ServicerContext
    ) -> pb.DeleteSessionResponse:
        self.core.delete_session(tenant_of(request.tenant, context, self.auth), request.session_id)
        return pb.DeleteSessionResponse()


def _usage(item: Finished) -> pb.Usage:
    u = item.usage
    return pb.Usage(
        prompt_tokens=u.prompt_tokens,
        cached_tokens=u.cached_tokens,
        cached_tokens_by_tier=pb.CachedTokensByTier(
            local=u.cached_local_tokens, store=u.cached_store_tokens, node=u.cached_node_tokens
        ),
        completion_tokens=u.completion_tokens,
        ttft_ms=u.ttft_ms,
        tokens_per_s=u.tokens_per_s,
        worker=u.worker,
        session_id=u.session_id,
        failovers=u.failovers,
        evicted_tokens=u.evicted_tokens,
        plan=u.plan,
        recomputed_tokens=u.recomputed_tokens,
    )
