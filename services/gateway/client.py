"""A client for the Inference gateway (`kvpool generate --target` runs on it).

    with InferenceClient("127.0.0.1:50051") as client:
        for chunk in client.stream(prompt="Hello", max_new_tokens=16):
            print(chunk.text, end="")
        done = client.generate(messages=[{"role": "user", "content": "Hi"}], session_id="s1")
        print(done.text, done.usage["cached_tokens"])

Every call has a deadline. Failures are raised as `kvpool.errors` exceptions (InvalidArgument,
NotFound, Unavailable, ...) through `services.status.error_from_rpc`.
"""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from kvpool.v1 import inference_pb2 as pb
from kvpool.v1 import inference_pb2_grpc
from services.auth import call_metadata
from services.status import error_from_rpc

FINISH_REASON_NAMES = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_EOS: "eos",
}


@dataclass(frozen=True, slots=True)
class Completion:
    """A whole Generate stream, gathered."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    usage: dict[str, Any] = field(default_factory=dict)  # the `--json` usage object

    def as_json(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "token_ids": list(self.token_ids),
            "finish_reason": self.finish_reason,
            "usage": self.usage,
        }


def usage_dict(usage: pb.Usage) -> dict[str, Any]:
    """The `usage` object of `kvpool generate --json` (a contract: fields are only added)."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "cached_tokens": usage.cached_tokens,
        "cached_tokens_by_tier": {
            "local": usage.cached_tokens_by_tier.local,
            "store": usage.cached_tokens_by_tier.store,
            "node": usage.cached_tokens_by_tier.node,
        },
        "completion_tokens": usage.completion_tokens,
        "ttft_ms": round(usage.ttft_ms, 3),
        "tokens_per_s": round(usage.tokens_per_s, 3),
        "worker": usage.worker,
        "session_id": usage.session_id,
        "failovers": usage.failovers,
        "evicted_tokens": usage.evicted_tokens,
        "plan": usage.plan,
        "recomputed_tokens": usage.recomputed_tokens,
        "session_saved": usage.session_saved,
    }


def build_request(
    *,
    prompt: str | None = None,
    messages: Sequence[dict[str, str]] | None = None,
    token_ids: Sequence[int] | None = None,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    ignore_eos: bool = False,
    session_id: str = "",
    tenant: str = "",
    max_cache_tokens: int | None = None,
    sink_tokens: int | None = None,
) -> pb.GenerateRequest:
    request = pb.GenerateRequest(session_id=session_id, tenant=tenant)
    if max_cache_tokens is not None:
        request.max_cache_tokens = max_cache_tokens
    if sink_tokens is not None:
        request.sink_tokens = sink_tokens
    _set_input(request, prompt, messages, token_ids)
    sampling = request.sampling
    for name, value in (
        ("max_new_tokens", max_new_tokens),
        ("temperature", temperature),
        ("top_k", top_k),
        ("top_p", top_p),
        ("seed", seed),
    ):
        if value is not None:
            setattr(sampling, name, value)
    sampling.stop.extend(stop)
    sampling.ignore_eos = ignore_eos
    return request


def _set_input(
    request: pb.GenerateRequest | pb.PrefillRequest,
    prompt: str | None,
    messages: Sequence[dict[str, str]] | None,
    token_ids: Sequence[int] | None,
) -> None:
    """Fill the request's `input` oneof with whichever of the three is given."""
    if prompt is not None:
        request.prompt = prompt
    elif messages is not None:
        chat = [pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages]
        request.messages.CopyFrom(pb.ChatMessages(messages=chat))
    elif token_ids is not None:
        request.token_ids.CopyFrom(pb.TokenIds(ids=list(token_ids)))


class InferenceClient:
    def __init__(
        self,
        target: str,
        *,
        timeout_s: float = 300.0,
        auth_token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.target = target
        self.timeout_s = timeout_s
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=list(options))
        else:
            self._channel = grpc.secure_channel(target, credentials, options=list(options))
        self._stub = inference_pb2_grpc.InferenceStub(self._channel)
        self._metadata = call_metadata(auth_token)

    def stream(
        self, timeout_s: float | None = None, **request: Any
    ) -> Iterator[pb.GenerateResponse]:
        """The raw Generate stream; `request` takes the keyword arguments of `build_request`."""
        call = self._stub.Generate(
            build_request(**request), timeout=timeout_s or self.timeout_s, metadata=self._metadata
        )
        try:
            yield from call
        except grpc.RpcError as err:
            raise error_from_rpc(err, f"Generate at {self.target}") from None
        finally:
            call.cancel()  # no-op when finished; stops the server's work when we stop early

    def generate(self, timeout_s: float | None = None, **request: Any) -> Completion:
        text: list[str] = []
        tokens: list[int] = []
        last = pb.GenerateResponse()
        for chunk in self.stream(timeout_s, **request):
            text.append(chunk.text)
            tokens.extend(chunk.token_ids)
            last = chunk
        return Completion(
            text="".join(text),
            token_ids=tuple(tokens),
            finish_reason=FINISH_REASON_NAMES.get(last.finish_reason, "unknown"),
            usage=usage_dict(last.usage),
        )

    def prefill(
        self,
        *,
        prompt: str | None = None,
        messages: Sequence[dict[str, str]] | None = None,
        token_ids: Sequence[int] | None = None,
        tenant: str = "",
        timeout_s: float | None = None,
    ) -> pb.PrefillResponse:
        request = pb.PrefillRequest(tenant=tenant)
        _set_input(request, prompt, messages, token_ids)
        return self._unary("Prefill", request, timeout_s)

    def get_session(self, session_id: str, tenant: str = "") -> pb.Session:
        return self._unary("GetSession", pb.GetSessionRequest(session_id=session_id, tenant=tenant))

    def delete_session(self, session_id: str, tenant: str = "") -> None:
        self._unary("DeleteSession", pb.DeleteSessionRequest(session_id=session_id, tenant=tenant))

    def _unary(self, method: str, request: Any, timeout_s: float | None = None) -> Any:
        try:
            return getattr(self._stub, method)(
                request, timeout=timeout_s or self.timeout_s, metadata=self._metadata
            )
        except grpc.RpcError as err:
            raise error_from_rpc(err, f"{method} at {self.target}") from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "InferenceClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
