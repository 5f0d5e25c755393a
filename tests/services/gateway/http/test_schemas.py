"""OpenAI requests to `GenerateCall`s; `ResponseShape` checked against the openai SDK's types."""

import json

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from kvpool.errors import InvalidArgument
from services.gateway.api import Finished, Usage
from services.gateway.http.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    ResponseShape,
    parse,
)
from workers.api import ChatMessage, WorkUsage


def chat(**fields):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return parse(ChatCompletionRequest, json.dumps(body).encode()).generate_call("acme")


def completion(**fields):
    body = {"model": "m", "prompt": "hi", **fields}
    return parse(CompletionRequest, json.dumps(body).encode()).generate_call("")


def test_a_chat_request_becomes_the_grpc_call():
    call = chat(
        messages=[
            {"role": "developer", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
        ],
        max_tokens=5,
        max_completion_tokens=7,
        temperature=0,
        top_p=0.5,
        seed=3,
        stop="\n",
        user="ignored",
        kvpool={"session_id": "s1", "top_k": 4, "max_cache_tokens": 256, "sink_tokens": 4},
    )
    assert call.input.messages == (ChatMessage("system", "be brief"), ChatMessage("user", "ab"))
    p = call.params
    assert (p.max_new_tokens, p.temperature, p.top_p, p.seed, p.stop, p.top_k) == (
        7, 0.0, 0.5, 3, ("\n",), 4,
    )  # fmt: skip
    assert (call.session_id, call.tenant, call.max_cache_tokens, call.sink_tokens) == (
        "s1", "acme", 256, 4,
    )  # fmt: skip


def test_vllms_ignore_eos_reaches_the_sampling_params():
    assert completion(ignore_eos=True).params.ignore_eos
    assert not completion().params.ignore_eos
    with pytest.raises(InvalidArgument):
        completion(ignore_eos="yes")


def test_openais_defaults_sample_and_grpcs_bound_the_length():
    params = chat().params
    assert params.temperature == 1.0 and params.max_new_tokens == 64 and params.seed is None


def test_null_fields_take_their_defaults():
    nulls = dict.fromkeys(("temperature", "top_p", "n", "stream", "stop", "seed", "kvpool"))
    call = chat(**nulls, max_tokens=None, logit_bias=None, presence_penalty=None)
    assert call.params == chat().params and call.session_id == ""


@pytest.mark.parametrize(
    ("prompt", "field", "value"),
    [
        ("text", "prompt", "text"),
        (["text"], "prompt", "text"),
        ([1, 2, 3], "token_ids", (1, 2, 3)),
        ([[1, 2, 3]], "token_ids", (1, 2, 3)),
    ],
)
def test_completion_prompts(prompt, field, value):
    assert getattr(completion(prompt=prompt).input, field) == value


@pytest.mark.parametrize(
    ("make", "fields", "message"),
    [
        (chat, {"n": 3}, "n: not supported"),
        (chat, {"tools": [{"type": "function"}]}, "tools: not supported"),
        (chat, {"response_format": {"type": "json_object"}}, "response_format: not supported"),
        (chat, {"frequency_penalty": 0.5, "logit_bias": {"1": 2}}, "frequency_penalty, logit_bias"),
        (completion, {"echo": True}, "echo: not supported"),
        (completion, {"best_of": 2}, "best_of: not supported"),
        (completion, {"prompt": ["a", "b"]}, "a batch of 2 prompts is not supported"),
        (completion, {"prompt": []}, "prompt is empty"),
        (completion, {"prompt": 5}, "prompt"),
        (chat, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "'image_url'"),
        (chat, {"messages": [{"role": "assistant"}]}, "messages[0].content is missing"),
        (chat, {"temperature": "0.5"}, "temperature: Input should be a valid number"),
        (chat, {"stream": "yes"}, "stream: Input should be a valid boolean"),
        (chat, {"kvpool": {"session": "x"}}, "kvpool.session: Extra inputs are not permitted"),
        (chat, {"seed": -1}, "seed must be in [0, 2**63)"),
        (chat, {"stop": [""]}, "stop strings must be non-empty"),
    ],
)
def test_bad_requests_name_what_is_wrong(make, fields, message):
    with pytest.raises(InvalidArgument) as caught:
        make(**fields)
    assert message in str(caught.value)


def test_a_body_that_is_not_json_is_invalid():
    with pytest.raises(InvalidArgument, match="invalid request: body: Invalid JSON"):
        parse(CompletionRequest, b"{nope")
    with pytest.raises(InvalidArgument, match="model: Field required"):
        parse(CompletionRequest, b'{"prompt": "x"}')


FINISHED = Finished(
    "eos",
    Usage(
        WorkUsage(
            prompt_tokens=100, cached_local_tokens=64, cached_store_tokens=0, completion_tokens=5,
            ttft_ms=3.0, tokens_per_s=40.0, worker="worker-1", cached_node_tokens=32, plan="split",
            recomputed_tokens=16,
        ),
        ttft_ms=12.5, session_id="s", failovers=0,
    ),
)  # fmt: skip


def test_whole_responses_parse_as_the_sdks_types():
    reply = ChatCompletion.model_validate(ResponseShape(True, "m").whole("hello", FINISHED))
    assert reply.choices[0].message.content == "hello"
    assert reply.choices[0].finish_reason == "stop"  # the core's eos is OpenAI's stop
    assert reply.usage.prompt_tokens_details.cached_tokens == 96
    assert reply.usage.total_tokens == 105
    extras = reply.model_extra["kvpool"]
    assert extras["cached_tokens_by_tier"] == {"local": 64, "node": 32, "store": 0}
    assert (extras["plan"], extras["recomputed_tokens"]) == ("split", 16)  # as on gRPC
    text = Completion.model_validate(ResponseShape(False, "m").whole("hello", FINISHED))
    assert text.choices[0].text == "hello" and text.object == "text_completion"


def test_stream_chunks_parse_as_the_sdks_types():
    shape = ResponseShape(True, "m", include_usage=True)
    chunks = [
        shape.chunk("", role=True),
        shape.chunk("he"),
        shape.last_chunk(FINISHED),
        shape.usage_chunk(FINISHED),
    ]
    parsed = [ChatCompletionChunk.model_validate(c) for c in chunks]
    assert len({c.id for c in parsed}) == 1
    assert parsed[0].choices[0].delta.role == "assistant"
    assert parsed[2].choices[0].finish_reason == "stop" and parsed[2].usage is None
    assert parsed[3].choices == [] and parsed[3].usage.completion_tokens == 5
    # The SDK's `Completion` type insists on a finish reason, which OpenAI's own streamed text
    # chunks leave null until the last; the SDK builds those chunks without validating them.
    text = ResponseShape(False, "m").chunk("x")
    assert text["object"] == "text_completion" and "usage" not in text
    assert text["choices"] == [{"index": 0, "text": "x", "logprobs": None, "finish_reason": None}]


def test_grpcs_ignore_eos_reaches_the_sampling_params():
    from kvpool.v1 import inference_pb2 as pb
    from services.gateway.servicer import sampling_params

    assert sampling_params(pb.SamplingParams(ignore_eos=True)).ignore_eos
    assert not sampling_params(pb.SamplingParams()).ignore_eos
