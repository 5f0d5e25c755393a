"""The wire between a worker actor and the vLLM engine process it runs: one record per message.

vLLM runs in a venv of its own (`make vllm`: other torch and transformers pins, no Ray), so a
worker actor with `--engine vllm` (`workers.vllm_worker`, kvpool's venv) starts one child process,
`kvpool.integrations.vllm_process`, in vLLM's venv, and talks to it over a socket pair. This
module is all the two sides share: it imports neither torch, vLLM nor Ray.

Frame: a 4-byte big-endian length, then a msgpack map `{"t": record name, field: value, ...}`.
Tuples travel as msgpack arrays and come back as tuples. The peer is our own child, so a frame
that does not decode is a bug, raised as `WireError`, never a request's error.

    actor -> engine   Start (once, first), Submit, Abort, Ping
    engine -> actor   Ready or StartFailed (once, first), Tokens, Finished, Failed, Pong
"""

import socket
import struct
from dataclasses import asdict, dataclass, fields
from typing import Any

import msgpack

MAX_FRAME_BYTES = 64 << 20  # a Submit of a 1M-token prompt is about 5 MB
_HEADER = struct.Struct(">I")


class WireError(Exception):
    """A frame that is not one of the records below (a bug on one side, or a torn stream)."""


# --- actor -> engine ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Start:
    """What the engine is built with; sent first, so no secret is on a command line."""

    model: str  # a local folder or a Hugging Face id
    dtype: str  # vLLM's: "float32" on CPU, "auto" on a GPU
    block_tokens: int  # kvpool's block; vLLM's block size divides it
    codec: str
    max_num_seqs: int  # sequences vLLM batches at once (the worker's max_batch)
    kv_cache_bytes: int  # 0: vLLM's own sizing (gpu_memory_utilization); required on CPU
    max_model_len: int = 0  # 0: the model's context
    enforce_eager: bool = True  # no CUDA graphs: on CPU there are none to capture
    store: str = ""  # HOST:PORT of the KVStore; "" runs vLLM without kvpool's connector
    store_auth_token: str = ""
    store_timeout_s: float = 5.0
    namespace_secret: bytes = b""  # salts tenants' keys (workers.kv.hashing.tenant_salt)
    fetch_plan: str = "auto"


@dataclass(frozen=True, slots=True)
class Submit:
    """Generate from `token_ids` (the prompt, a failover's prior output included)."""

    request_id: str
    token_ids: tuple[int, ...]
    max_tokens: int  # new tokens, prior output excluded
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    ignore_eos: bool = False
    cache_salt: str = ""  # the tenant: vLLM's own prefix cache and the connector's keys
    read_cache: bool = True  # False: vLLM's prefix cache and the store are not read
    prefill: bool = False  # a Prefill call: the saves are flushed before it finishes


@dataclass(frozen=True, slots=True)
class Abort:
    request_id: str


@dataclass(frozen=True, slots=True)
class Ping:
    nonce: int
    flush: bool = False  # answer once the connector has put every block it saved so far


# --- engine -> actor ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ready:
    """The engine has loaded: what the actor's `WorkerInfo` says about it."""

    model: str
    fingerprint: str  # the connector's namespace: the gateway routes by the very keys it stores
    codec: str  # the connector's block codec (raw resolved to fp32, fp16 or bf16)
    block_tokens: int
    max_context: int
    eos_token_ids: tuple[int, ...]
    vocab_size: int
    device: str


@dataclass(frozen=True, slots=True)
class StartFailed:
    """The engine did not start; `kind` names a `kvpool.errors` class (or "Unavailable")."""

    kind: str
    message: str


@dataclass(frozen=True, slots=True)
class Tokens:
    """New tokens of one request, in order (one engine step's)."""

    request_id: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Finished:
    """A request ended: vLLM's reason, and where its prompt's cached tokens came from."""

    request_id: str
    reason: str  # "length", "eos" (vLLM's end-of-text or stop token), "abort"
    local_tokens: int = 0  # from vLLM's own prefix cache
    store_tokens: int = 0  # loaded by kvpool's connector from the store
    plan: str = "none"  # none | fetch | recompute (workers.api.PLAN_KINDS)
    recomputed_tokens: int = 0  # stored tokens the fetch plan chose to compute
    stored_tokens: int = 0  # a prefill: its prompt's full blocks the store now holds


@dataclass(frozen=True, slots=True)
class Failed:
    """vLLM refused or failed one request; `kind` names a `kvpool.errors` class."""

    request_id: str
    kind: str
    message: str


@dataclass(frozen=True, slots=True)
class Pong:
    """The answer to a Ping, with the engine's counters since it started."""

    nonce: int
    running: int = 0
    waiting: int = 0
    saved_blocks: int = 0  # blocks the connector saved: stored, failed or dropped (queue full)
    stored_blocks: int = 0  # blocks the store accepted
    dropped_blocks: int = 0  # saves dropped: the write-behind queue was full
    failed_blocks: int = 0  # puts that failed (store down)
    pending_blocks: int = 0
    load_errors: int = 0  # blocks that failed to load (missing, damaged, late): recomputed


Message = Start | Submit | Abort | Ping | Ready | StartFailed | Tokens | Finished | Failed | Pong
_RECORDS: dict[str, type] = {
    cls.__name__: cls
    for cls in (Start, Submit, Abort, Ping, Ready, StartFailed, Tokens, Finished, Failed, Pong)
}


def encode(message: Message) -> bytes:
    body = msgpack.packb({"t": type(message).__name__, **asdict(message)}, use_bin_type=True)
    return _HEADER.pack(len(body)) + body


def decode(body: bytes) -> Message:
    try:
        data = msgpack.unpackb(body, raw=False)
        cls = _RECORDS[data.pop("t")]
        names = {f.name for f in fields(cls)}
        if not set(data) <= names:
            raise WireError(f"{cls.__name__} has no fields {sorted(set(data) - names)}")
        values: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in data.items()
        }
        message: Message = cls(**values)
        return message
    except WireError:
        raise
    except Exception as exc:  # a malformed frame, whatever msgpack or the record says
        raise WireError(f"a frame that is no wire record: {exc}") from None


def send(sock: socket.socket, message: Message) -> None:
    """Write one frame (callers that share `sock` across threads hold a lock around this)."""
    sock.sendall(encode(message))


def receive(stream: Any) -> Message | None:
    """The next record from a binary file object (`sock.makefile("rb")`); None at its end."""
    header = stream.read(_HEADER.size)
    if not header:
        return None
    if len(header) < _HEADER.size:
        raise WireError("the stream ended inside a frame header")
    (length,) = _HEADER.unpack(header)
    if length > MAX_FRAME_BYTES:
        raise WireError(f"a frame of {length} bytes, over the {MAX_FRAME_BYTES} allowed")
    body = stream.read(length)
    if len(body) < length:
        raise WireError("the stream ended inside a frame")
    return decode(body)
