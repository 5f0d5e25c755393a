"""The workers' contract with their callers: requests, results and settings, as plain records.

Torch-free on purpose (no torch, transformers or Ray here): the gateway imports this module, never
the modules that run the model, so its process never loads torch (the way TGI's router shares
only its .proto with the model servers). Every record is a frozen dataclass that checks itself in
`__post_init__`, so a request is validated once, where it is made.
"""

import secrets
from dataclasses import dataclass, field, replace

from kvpool.errors import InvalidArgument, ResourceExhausted
from workers.kv.bounds import DEFAULT_SINK_TOKENS
from workers.kv.hashing import HASH_BYTES, BlockHash, check_namespace_secret, new_namespace_secret

MAX_NEW_TOKENS_LIMIT = 4096
ROLES = ("system", "user", "assistant")
FINISH_REASONS = ("length", "eos", "stop")


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens. `temperature == 0` is greedy; `top_k == 0` and `top_p == 1` disable."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # Generate max_new_tokens tokens, past the model's end-of-text token (load generators such
    # as `vllm bench serve --ignore-eos` fix output lengths this way). Stop strings still stop.
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise InvalidArgument(f"max_new_tokens must be an integer, got {self.max_new_tokens!r}")
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
            raise InvalidArgument(
                f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS_LIMIT}, "
                f"got {self.max_new_tokens}"
            )
        if not 0.0 <= self.temperature <= 10.0:
            raise InvalidArgument(f"temperature must be in [0, 10], got {self.temperature}")
        if self.top_k < 0:
            raise InvalidArgument(f"top_k must be 0 (off) or positive, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidArgument(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidArgument(f"seed must be in [0, 2**63), got {self.seed}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidArgument("stop strings must be non-empty strings")
        if type(self.ignore_eos) is not bool:
            raise InvalidArgument(f"ignore_eos must be true or false, got {self.ignore_eos!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def seeded(self) -> "SamplingParams":
        """These params with a seed fixed for a sample that has none (the one place it is drawn).

        Whoever fixes it first (the gateway, or the engine run alone) records it, so a failover
        hands it to the next worker and the stream continues identically.
        """
        if self.greedy or self.seed is not None:
            return self
        return replace(self, seed=secrets.randbits(63))


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One generated token and the text it added (empty while a character is incomplete)."""

    token_id: int
    text: str


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise InvalidArgument(f"message role must be one of {ROLES}, got {self.role!r}")


@dataclass(frozen=True, slots=True)
class PromptInput:
    """Exactly one of `prompt`, `messages` or `token_ids` is set."""

    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    token_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        given = [n for n in ("prompt", "messages", "token_ids") if getattr(self, n) is not None]
        if len(given) != 1:
            named = ", ".join(given) or "none"
            raise InvalidArgument(
                f"give exactly one of prompt, messages or token_ids (got {named})"
            )

    def as_dicts(self) -> list[dict[str, str]] | None:
        if self.messages is None:
            return None
        return [{"role": m.role, "content": m.content} for m in self.messages]


# --- the worker ---------------------------------------------------------------------------------

# How a worker uses a cached prefix (workers.plan): `auto` picks per request from live estimates.
PLAN_MODES = ("auto", "fetch", "recompute")
DEFAULT_PLAN_MODE = "auto"
PLAN_KINDS = ("none", "fetch", "recompute", "split")  # what a request's usage reports


# What runs prefill and decode in a worker actor (docs/vllm.md, "vLLM as the engine"): kvpool's
# own transformers loop (workers.worker), or one vLLM engine in a child process in vLLM's venv
# (workers.vllm_worker).
ENGINES = ("transformers", "vllm")
DEFAULT_ENGINE = "transformers"
# vLLM's KV cache on CPU when none is given: vLLM's own sizing would take 92% of host memory.
VLLM_CPU_KV_CACHE_BYTES = 512 << 20


def check_mode(mode: str) -> str:
    if mode not in PLAN_MODES:
        raise ValueError(f"fetch plan must be one of {', '.join(PLAN_MODES)}, got {mode!r}")
    return mode


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    engine: str = DEFAULT_ENGINE  # transformers | vllm (ENGINES)
    model: str = "smollm2-135m"
    device: str | None = None  # None: CUDA when the worker's process sees a GPU, else CPU
    codec: str = "int8"
    block_tokens: int = 64
    store_target: str | None = None  # HOST:PORT of the KVStore; None runs with L1 only
    store_timeout_s: float = 5.0
    store_auth_token: str | None = field(default=None, repr=False)  # bearer token for the store
    store_tls_ca: bytes | None = field(default=None, repr=False)  # PEM CA: reach the store by TLS
    # Keys the tenant salt (workers.kv.hashing.tenant_salt); the store never sees it. Random
    # unless given: workers share blocks through the store only under one secret, so every worker
    # of a deployment gets the same one (the gateway hands its own to each). Not compared: two
    # configs that differ only by their random default are the same configuration.
    namespace_secret: bytes = field(default_factory=new_namespace_secret, repr=False, compare=False)
    l1_bytes: int = 1 << 30
    write_queue_blocks: int = 512
    block_ttl_s: int | None = None  # None: the store's default
    retain_freed_memory: bool = True  # in the actor process; see workers.actor.retain_freed_memory
    node_tier: bool = True  # use this node's tier (L2) when one runs there (workers.node_tier)
    fetch_plan: str = DEFAULT_PLAN_MODE  # auto | fetch | recompute (workers.plan)
    # Continuous batching (workers.batch): sequences decoded together in one forward pass, and
    # tokens one scheduler step may feed (the decoders' one each, the rest for newcomers'
    # prefill chunks). More sequences raise throughput and each one's time per token; a larger
    # token budget shortens a newcomer's prefill and stalls the running streams longer.
    max_batch: int = 8
    max_batch_tokens: int = 256
    # The vLLM engine only: the python of vLLM's venv (None: .venv-vllm beside this checkout, as
    # `make vllm` builds it), and the bytes of vLLM's KV cache (0: vLLM's own sizing on a GPU,
    # VLLM_CPU_KV_CACHE_BYTES on CPU).
    vllm_python: str | None = None
    kv_cache_bytes: int = 0

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        check_mode(self.fetch_plan)
        if self.kv_cache_bytes < 0:
            raise ValueError(f"kv_cache_bytes must be >= 0, got {self.kv_cache_bytes}")
        check_namespace_secret(self.namespace_secret)
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_batch_tokens <= self.max_batch:
            raise ValueError(
                f"max_batch_tokens must be above max_batch ({self.max_batch}): each decoding "
                f"sequence takes one token of a step and prefill needs at least one more, got "
                f"{self.max_batch_tokens}"
            )
        if self.block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {self.block_tokens}")
        if self.l1_bytes < 0:
            raise ValueError(f"l1_bytes must be >= 0, got {self.l1_bytes}")
        if self.write_queue_blocks < 1:
            raise ValueError(f"write_queue_blocks must be >= 1, got {self.write_queue_blocks}")

    @property
    def reads_node_tier(self) -> bool:
        """Whether this worker reads and fills its node's tier (L2): the vLLM engine's process
        has no Ray, so its connector reads the store only (docs/vllm.md)."""
        return self.node_tier and self.engine != "vllm"


@dataclass(frozen=True, slots=True)
class WorkRequest:
    """What the gateway asks a worker to generate."""

    token_ids: tuple[int, ...]  # the whole prompt (a session's history included)
    params: SamplingParams
    tenant: str = ""
    prior_output: tuple[int, ...] = ()  # tokens already streamed before a failover
    read_cache: bool = True  # False computes from scratch (a baseline for tests and benches)
    request_id: str = ""  # names the request for `cancel`
    max_cache_tokens: int = 0  # > 0 bounds the cache with sinks + a recent window (workers.window)
    sink_tokens: int = DEFAULT_SINK_TOKENS
    # Seconds the worker may spend before the first token (0: no limit); past it the request ends
    # with RESOURCE_EXHAUSTED. Checked between prefill chunks, so it stops a long bounded prompt.
    prefill_timeout_s: float = 0.0
    fetch_plan: str = ""  # "" uses the worker's --fetch-plan; else auto | fetch | recompute
    # The chain hashes of token_ids' full blocks, as the gateway hashed them to route the
    # request (under the workers' own namespace): the worker goes on from them instead of
    # hashing the prompt again. Empty: the worker hashes it.
    block_hashes: tuple[BlockHash, ...] = ()

    def __post_init__(self) -> None:
        """What needs no model; the engine checks the rest against its model (`check_fits`)."""
        if not self.token_ids:
            raise InvalidArgument("prompt is empty; give at least one token")
        if len(self.prior_output) >= self.params.max_new_tokens:
            raise InvalidArgument(
                f"prior_output has {len(self.prior_output)} tokens, not below "
                f"max_new_tokens={self.params.max_new_tokens}"
            )
        if self.fetch_plan and self.fetch_plan not in PLAN_MODES:
            raise InvalidArgument(
                f"fetch_plan must be one of {', '.join(PLAN_MODES)} (or empty for the worker's "
                f"own), got {self.fetch_plan!r}"
            )
        if len(self.block_hashes) > len(self.token_ids) or not all(
            type(h) is bytes and len(h) == HASH_BYTES for h in self.block_hashes
        ):
            raise InvalidArgument(
                f"block_hashes must be {HASH_BYTES}-byte hashes, at most one per prompt token"
            )
        if self.prefill_timeout_s < 0:
            raise InvalidArgument(
                f"prefill_timeout_s must be >= 0 (0: no limit), got {self.prefill_timeout_s}"
            )
        # The window's bounds are checked against the worker's block size (kv.bounds).


class PrefillTimeout(ResourceExhausted):
    """A request's prefill ran past its deadline: the request fails, its worker stays.

    Raised by the worker between prefill chunks, or by the gateway's own clock; either way it is
    never failed over, since another worker would take as long.
    """


@dataclass(frozen=True, slots=True)
class WorkStarted:
    """The first item of a worker's stream: a worker thread has taken the request up.

    Time before it is spent in Ray's queue, not on the request; the gateway's prefill deadline
    and token timeout start here.
    """

    worker: str


@dataclass(frozen=True, slots=True)
class WorkUsage:
    prompt_tokens: int
    cached_local_tokens: int
    cached_store_tokens: int
    completion_tokens: int  # prior_output included
    ttft_ms: float  # worker receipt to first token, the cache fetch included
    tokens_per_s: float
    worker: str
    evicted_tokens: int = 0  # tokens of the sequence evicted from a windowed cache
    cached_node_tokens: int = 0  # from the node tier (L2)
    plan: str = ""  # how the cached prefix was used: none | fetch | recompute | split
    recomputed_tokens: int = 0  # cached tokens the plan chose to recompute rather than fetch

    @property
    def cached_tokens(self) -> int:
        return self.cached_local_tokens + self.cached_node_tokens + self.cached_store_tokens


@dataclass(frozen=True, slots=True)
class WorkDone:
    """The last item of a worker's stream."""

    finish_reason: str  # "stop" | "length" | "eos"
    token_ids: tuple[int, ...]  # the whole output, prior_output included
    text: str
    usage: WorkUsage


@dataclass(frozen=True, slots=True)
class PrefillResult:
    prompt_tokens: int
    stored_tokens: int  # full blocks of the prompt now in the store (or L1 without a store)
    cached_tokens: int  # of those, tokens that were cached before the call
    worker: str


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    worker_id: str
    model: str
    fingerprint: str
    codec: str
    block_tokens: int
    max_context: int
    eos_token_ids: frozenset[int]
    device: str
    vocab_size: int  # the model's; token ids must lie in [0, vocab_size)


@dataclass(frozen=True, slots=True)
class LocalStats:
    blocks: int
    bytes: int
    capacity_bytes: int
    hits: int
    misses: int
    evictions: int


@dataclass(frozen=True, slots=True)
class NodeTierStats:
    node_id: str
    blocks: int
    bytes: int
    capacity_bytes: int
    hits: int
    misses: int
    evictions: int
    puts: int


@dataclass(frozen=True, slots=True)
class WriteStats:
    submitted: int  # blocks handed to the queue
    stored: int  # blocks the store accepted
    dropped: int  # blocks not queued because the queue was full
    failed: int  # blocks whose put failed (store down): a later miss, never a request error
    pending: int  # blocks waiting in the queue or being written
    # Copies of fetched blocks that L1 and the node tier did not take because the queue was
    # full: nothing was lost (the store holds them), a later request fetches them again.
    dropped_copies: int = 0


@dataclass(frozen=True, slots=True)
class WorkerStats:
    worker_id: str
    requests: int
    in_flight: int
    cached_local_tokens: int
    cached_store_tokens: int
    computed_tokens: int  # prompt tokens prefilled because no tier had them
    corrupt_blocks: int
    store_errors: int  # store lookups or reads that failed and were served as misses
    local: LocalStats
    writes: WriteStats
    cached_node_tokens: int = 0
    recomputed_tokens: int = 0
    plans: dict[str, int] = field(default_factory=dict)  # requests by plan kind
    node: NodeTierStats | None = None  # this node's tier, when the worker uses one
    node_errors: int = 0  # node tier lookups or reads that failed and were served as misses
    estimates: dict[str, float] = field(default_factory=dict)  # the fetch plan's cost model
    # Continuous batching (workers.batch): sequences prefilling or decoding in the batch now,
    # sequences waiting to be admitted, batched decode steps so far, and the largest batch.
    batch_running: int = 0
    batch_waiting: int = 0
    batch_steps: int = 0
    batch_largest: int = 0


@dataclass(frozen=True, slots=True)
class ActorResources:
    """What one worker actor asks Ray for."""

    num_gpus: float = 0.0
    num_cpus: float = 1.0
    # Threads for generations and prefills; control calls (stats, cancel, health) have a group
    # of their own (workers.actor). The gateway admits at most a worker's max_batch requests, so
    # none waits in Ray's queue: the default is WorkerConfig's max_batch of 8 plus two spare, and
    # services.gateway.settings.PoolConfig.actor_resources raises it for a larger batch.
    max_concurrency: int = 10

    def __post_init__(self) -> None:
        if self.num_gpus < 0 or self.num_cpus < 0:
            raise ValueError("num_gpus and num_cpus must be >= 0")
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
