"""The gateway core's requests and results, in domain types (the servicer converts protobuf to and
from these; the metrics read `Usage`). Its own module, so the core and the metrics both import it
and neither imports the other.
"""

from dataclasses import dataclass

from workers.api import PromptInput, SamplingParams, WorkUsage


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
    """A generation's usage: the record of the worker that finished it, as it crossed the Ray
    boundary, and what only the gateway knows. Built once, in the core; the servicer turns it
    into the proto's `Usage`, the HTTP API into OpenAI's `usage` and its `kvpool` object.
    """

    # The finishing worker's figures, as it sent them: prompt and completion tokens (the whole
    # prompt, the output across failovers), cached tokens by tier, the fetch plan, tokens/s,
    # evictions and its id.
    work: WorkUsage
    ttft_ms: float  # gateway receipt to first token (`work.ttft_ms` is the worker's own)
    session_id: str
    failovers: int
    bounded: bool = False  # the request ran with max_cache_tokens
    # The request named a session and its turn is stored. False with a session: the store could
    # not save it (the client has the output; the session keeps its earlier turns).
    session_saved: bool = False


@dataclass(frozen=True, slots=True)
class Finished:
    finish_reason: str  # "stop" | "length" | "eos"
    usage: Usage


@dataclass(frozen=True, slots=True)
class PrefillCall:
    input: PromptInput
    tenant: str = ""
