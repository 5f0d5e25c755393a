"""The gateway core's requests and results, in domain types (the servicer converts protobuf to and
from these; the metrics read `Usage`). Its own module, so the core and the metrics both import it
and neither imports the other.
"""

from dataclasses import dataclass

from workers.api import PromptInput, SamplingParams


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
    cached_node_tokens: int = 0  # from the node tier (L2)
    plan: str = ""  # the worker's fetch plan: none, fetch, recompute or split
    recomputed_tokens: int = 0
    # The request named a session and its turn is stored. False with a session: the store could
    # not save it (the client has the output; the session keeps its earlier turns).
    session_saved: bool = False

    @property
    def cached_tokens(self) -> int:
        return self.cached_local_tokens + self.cached_node_tokens + self.cached_store_tokens


@dataclass(frozen=True, slots=True)
class Finished:
    finish_reason: str  # "stop" | "length" | "eos"
    usage: Usage


@dataclass(frozen=True, slots=True)
class PrefillCall:
    input: PromptInput
    tenant: str = ""
