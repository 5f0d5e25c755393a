"""OpenAI's request and response shapes, and their conversion to and from the core's types.

Requests are pydantic models, strict about types (a string is never read as a number) and
lenient about fields they do not know, as OpenAI-compatible servers are (LangChain and the SDKs
send fields such as `user` or `n: 1` on every call). A known field whose value kvpool cannot
honour (`n: 2`, `logprobs: true`, tools, a penalty) is refused with a 400 that names it, rather
than silently ignored. Sampling values are checked once, by `SamplingParams`, as for gRPC.

kvpool's own request fields and response figures live under one `kvpool` object, so neither
side of OpenAI's schema changes meaning:

    request:  "kvpool": {"session_id", "tenant", "top_k", "max_cache_tokens", "sink_tokens"}
    response: "kvpool": {"session_id", "worker",
                         "cached_tokens_by_tier": {"local", "node", "store"}, "plan",
                         "recomputed_tokens", "ttft_ms", "tokens_per_s", "failovers",
                         "evicted_tokens", "session_saved"}
"""

import secrets
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kvpool.errors import InvalidArgument
from services.gateway.api import Finished, GenerateCall, Usage
from workers.api import ChatMessage, PromptInput, SamplingParams

# The core says "eos" where OpenAI says "stop": both mean the model ended the text itself.
FINISH_REASONS = {"stop": "stop", "eos": "stop", "length": "length"}
# OpenAI's newer name for a system message.
_ROLE_ALIASES = {"developer": "system"}


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data: Any) -> Any:
        """OpenAI reads a null field as an absent one, and clients send `"stop": null` and such."""
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data


class StreamOptions(_Model):
    include_usage: bool = False


class KvpoolOptions(_Model):
    """kvpool's own request fields (`extra_body={"kvpool": {...}}` in the openai SDK)."""

    model_config = ConfigDict(extra="forbid", strict=True)  # our own namespace: typos are errors

    session_id: str = ""
    tenant: str = ""
    top_k: int = 0
    max_cache_tokens: int | None = None
    sink_tokens: int | None = None


class _Request(_Model):
    model: str
    max_tokens: int | None = None
    # OpenAI's default is 1 (sampling); send 0 for greedy text, as the gRPC API's default.
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    logprobs: Any = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False  # vLLM's extension, which its load generator sends
    kvpool: KvpoolOptions = Field(default_factory=KvpoolOptions)

    def _refuse_unsupported(self, extra: dict[str, bool]) -> None:
        unsupported = {
            "n": self.n != 1,
            "logprobs": self.logprobs not in (None, False),
            "presence_penalty": self.presence_penalty != 0.0,
            "frequency_penalty": self.frequency_penalty != 0.0,
            "logit_bias": bool(self.logit_bias),
            **extra,
        }
        named = [name for name, used in unsupported.items() if used]
        if named:
            raise InvalidArgument(
                f"{', '.join(named)}: not supported by kvpool; leave "
                f"{'it' if len(named) == 1 else 'them'} out (n must be 1)"
            )

    def generate_call(self, tenant: str) -> GenerateCall:
        raise NotImplementedError  # each request kind converts its own input

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling(self, max_tokens: int | None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        return SamplingParams(
            max_new_tokens=SamplingParams().max_new_tokens if max_tokens is None else max_tokens,
            temperature=self.temperature,
            top_k=self.kvpool.top_k,
            top_p=self.top_p,
            seed=self.seed,
            stop=tuple(stop),
            ignore_eos=self.ignore_eos,
        )

    def call(self, input: PromptInput, params: SamplingParams, tenant: str) -> GenerateCall:
        return GenerateCall(
            input=input,
            params=params,
            session_id=self.kvpool.session_id,
            tenant=tenant,
            max_cache_tokens=self.kvpool.max_cache_tokens,
            sink_tokens=self.kvpool.sink_tokens,
        )


class TextPart(_Model):
    type: str
    text: str = ""


class Message(_Model):
    role: str
    content: str | list[TextPart] | None = None

    def domain(self, index: int) -> ChatMessage:
        if self.content is None:
            raise InvalidArgument(f"messages[{index}].content is missing; give the message text")
        if isinstance(self.content, str):
            text = self.content
        else:
            kinds = sorted({part.type for part in self.content} - {"text"})
            if kinds:
                raise InvalidArgument(
                    f"messages[{index}].content: part types {kinds} are not supported; only "
                    "'text' parts are"
                )
            text = "".join(part.text for part in self.content)
        return ChatMessage(_ROLE_ALIASES.get(self.role, self.role), text)


class ChatCompletionRequest(_Request):
    messages: list[Message]
    max_completion_tokens: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def generate_call(self, tenant: str) -> GenerateCall:
        fmt = (self.response_format or {}).get("type", "text")
        self._refuse_unsupported(
            {
                "tools": bool(self.tools),
                "tool_choice": self.tool_choice not in (None, "none"),
                "response_format": fmt != "text",
            }
        )
        if not self.messages:
            raise InvalidArgument("messages is empty; give at least one message")
        messages = tuple(m.domain(i) for i, m in enumerate(self.messages))
        limit = self.max_completion_tokens
        params = self.sampling(self.max_tokens if limit is None else limit)
        return self.call(PromptInput(messages=messages), params, tenant)


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def generate_call(self, tenant: str) -> GenerateCall:
        self._refuse_unsupported(
            {
                "echo": self.echo,
                "suffix": bool(self.suffix),
                "best_of": self.best_of not in (None, 1),
            }
        )
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                raise InvalidArgument(
                    f"prompt: a batch of {len(prompt)} prompts is not supported; send one "
                    "prompt (a string or a list of token ids) per request"
                )
            prompt = prompt[0]
        if isinstance(prompt, str):
            given = PromptInput(prompt=prompt)
        elif prompt:
            given = PromptInput(token_ids=tuple(prompt))  # type: ignore[arg-type]
        else:
            raise InvalidArgument("prompt is empty; give a string or a list of token ids")
        return self.call(given, self.sampling(self.max_tokens), tenant)


def parse(model: type[_Request], body: bytes) -> _Request:
    """The request, or InvalidArgument naming each bad field and what it should be."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        problems = [
            f"{'.'.join(str(part) for part in error['loc']) or 'body'}: {error['msg']}"
            for error in exc.errors(include_url=False)[:5]
        ]
        raise InvalidArgument("invalid request: " + "; ".join(problems)) from None


# --- responses --------------------------------------------------------------------------------


def completion_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)


def usage_body(usage: Usage) -> dict[str, Any]:
    """OpenAI's `usage` object."""
    work = usage.work
    return {
        "prompt_tokens": work.prompt_tokens,
        "completion_tokens": work.completion_tokens,
        "total_tokens": work.prompt_tokens + work.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": work.cached_tokens},
    }


def kvpool_body(usage: Usage) -> dict[str, Any]:
    """kvpool's own figures, the response's `kvpool` object beside OpenAI's fields."""
    work = usage.work
    return {
        "session_id": usage.session_id,
        "worker": work.worker,
        "cached_tokens_by_tier": {
            "local": work.cached_local_tokens,
            "node": work.cached_node_tokens,
            "store": work.cached_store_tokens,
        },
        "plan": work.plan,  # none | fetch | recompute | split, as on gRPC
        "recomputed_tokens": work.recomputed_tokens,
        "ttft_ms": round(usage.ttft_ms, 3),
        "tokens_per_s": round(work.tokens_per_s, 3),
        "failovers": usage.failovers,
        "evicted_tokens": work.evicted_tokens,
        "session_saved": usage.session_saved,
    }


class ResponseShape:
    """Builds one request's response objects: its id, creation time and model stay the same."""

    def __init__(self, chat: bool, model: str, include_usage: bool = False) -> None:
        self.chat = chat
        self.id = completion_id(chat)
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage

    def _head(self, kind: Literal["whole", "chunk"]) -> dict[str, Any]:
        if self.chat:
            obj = "chat.completion" if kind == "whole" else "chat.completion.chunk"
        else:
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, text: str, finished: Finished) -> dict[str, Any]:
        reason = FINISH_REASONS[finished.finish_reason]
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": reason,
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        return {
            **self._head("whole"),
            "choices": [choice],
            "usage": usage_body(finished.usage),
            "kvpool": kvpool_body(finished.usage),
        }

    def chunk(
        self, text: str | None, finish_reason: str | None = None, *, role: bool = False
    ) -> dict[str, Any]:
        """A streamed chunk: text (None: none), the finish reason on the last one."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text or ""}
        choice["logprobs"] = None
        choice["finish_reason"] = finish_reason
        body = {**self._head("chunk"), "choices": [choice]}
        if self.include_usage:
            body["usage"] = None  # as OpenAI: every chunk but the usage chunk says null
        return body

    def last_chunk(self, finished: Finished) -> dict[str, Any]:
        body = self.chunk(None, FINISH_REASONS[finished.finish_reason])
        body["kvpool"] = kvpool_body(finished.usage)
        return body

    def usage_chunk(self, finished: Finished) -> dict[str, Any]:
        return {**self._head("chunk"), "choices": [], "usage": usage_body(finished.usage)}
