"""A worker whose engine is vLLM: the same calls as `KVWorker`, served by a vLLM child process.

vLLM cannot be imported in kvpool's venv (it pins other torch and transformers versions), so
`VLLMWorker` starts `kvpool.integrations.vllm_process` with the python of vLLM's venv and speaks
`workers.vllm_wire` to it over a socket pair. That process holds one vLLM engine, prefix caching
on, with kvpool's connector pointed at the stack's store (the worker's store address, token and
namespace secret), so a prompt one worker computed is loaded by another from the store.

This side is torch-free. It turns the engine's token ids into the gateway's `TokenEvent`s and
`WorkDone` with the transformers engine's own `OutputText` (end-of-text, stop strings,
max_new_tokens, the streamed text), so both engines end outputs and stream text alike; vLLM is
asked for token ids only, and a stop string ends the vLLM request by an abort. The usage splits
the prompt's cached tokens into vLLM's own prefix cache (`cached_local_tokens`, its L1) and the
store (`cached_store_tokens`), with the connector's fetch plan, as the connector reports them.

The engine process dies with the actor (it watches its parent), and the actor with the engine
process: when the socket ends, the actor's process exits, Ray reports the actor dead, and the
gateway fails the stream over and replaces the worker, as for any dead worker.
"""

import logging
import os
import queue
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from kvpool import errors
from kvpool.errors import InvalidArgument, NotFound, Unavailable
from workers.api import (
    PLAN_KINDS,
    VLLM_CPU_KV_CACHE_BYTES,
    LocalStats,
    PrefillResult,
    PrefillTimeout,
    TokenEvent,
    WorkDone,
    WorkerConfig,
    WorkerInfo,
    WorkerStats,
    WorkRequest,
    WorkUsage,
    WriteStats,
)
from workers.counters import RequestCounters
from workers.detokenizer import OutputText
from workers.kv.bounds import check_context
from workers.kv.hashing import Namespace, block_key, chain_hashes, tenant_salt
from workers.model_files import BUILTIN_MODELS, DEFAULT_MODEL, is_prepared, smollm2_cache_path
from workers.prompt import tokenizer_files
from workers.vllm_link import CONTROL_TIMEOUT_S, GONE, ROOT, EngineLink, error
from workers.vllm_wire import Abort, Failed, Finished, Start, Submit, Tokens

log = logging.getLogger(__name__)


def model_folder(model: str) -> str:
    """What vLLM loads for a kvpool model name: a folder, or a Hugging Face id as given."""
    if model == DEFAULT_MODEL:
        folder = smollm2_cache_path()
        if not is_prepared(folder):
            # The one conversion, with torch, in this process; later starts find the folder.
            from workers.models import prepare_smollm2

            prepare_smollm2()
        return str(folder)
    if model in BUILTIN_MODELS:
        raise InvalidArgument(
            f"model {model!r} is the transformers engine's test model; --engine vllm serves "
            f"{DEFAULT_MODEL}, a local model folder or a Hugging Face id"
        )
    path = Path(model).expanduser()
    return str(path) if path.is_dir() else model


def vllm_python(config: WorkerConfig) -> str:
    """The python of vLLM's venv: --vllm-python, else `make vllm`'s beside this checkout."""
    python = config.vllm_python or str(ROOT / ".venv-vllm" / "bin" / "python")
    if not os.access(python, os.X_OK):
        raise NotFound(
            f"--engine vllm runs vLLM with {python}, which is not there: run `make vllm`, or "
            "give --vllm-python (env KVPOOL_VLLM_PYTHON) the python of a venv with vllm and kvpool"
        )
    return python


class VLLMWorker:
    def __init__(self, config: WorkerConfig, worker_id: str | None = None) -> None:
        self.config = config
        self.worker_id = worker_id or f"worker-{os.urandom(4).hex()}"
        if config.store_tls_ca is not None:
            raise InvalidArgument(
                "--engine vllm: kvpool's vLLM connector reaches the store in plaintext only; a "
                "store behind TLS is not supported with this engine yet"
            )
        if config.device is not None and config.device != "cpu" and "cuda" not in config.device:
            raise InvalidArgument(
                f"--engine vllm runs on cpu or cuda, got --device {config.device}"
            )
        python = vllm_python(config)
        folder = model_folder(config.model)
        from transformers import PreTrainedTokenizerFast  # torch-free (the gateway uses it too)

        try:
            self.tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
        except OSError as exc:
            raise InvalidArgument(f"model {config.model!r}: no fast tokenizer: {exc}") from exc
        self.counters = RequestCounters()
        self._store: Any = None
        self.link = EngineLink(
            python, self.worker_id, self._start_record(folder),
            exit_on_loss=os.environ.get("KVPOOL_VLLM_KEEP_ACTOR") != "1",
        )  # fmt: skip
        self.ready = self.link.ready
        if config.store_target:
            from services.store.client import StoreClient  # the gRPC edge, only when used

            self._store = StoreClient(
                config.store_target, timeout_s=config.store_timeout_s,
                auth_token=config.store_auth_token,
            )  # fmt: skip

    def _start_record(self, folder: str) -> Start:
        """What the engine process builds vLLM with."""
        config = self.config
        on_cpu = config.device == "cpu" or (config.device is None and not _sees_gpu())
        return Start(
            model=folder,
            dtype="float32" if on_cpu else "auto",
            block_tokens=config.block_tokens,
            codec=config.codec,
            max_num_seqs=config.max_batch,
            kv_cache_bytes=config.kv_cache_bytes or (VLLM_CPU_KV_CACHE_BYTES if on_cpu else 0),
            enforce_eager=on_cpu,
            store=config.store_target or "",
            store_auth_token=config.store_auth_token or "",
            store_timeout_s=config.store_timeout_s,
            namespace_secret=config.namespace_secret,
            fetch_plan=config.fetch_plan,
        )

    # --- what the gateway asks ---------------------------------------------------------------

    def info(self) -> WorkerInfo:
        ready = self.ready
        return WorkerInfo(
            worker_id=self.worker_id,
            model=self.config.model,
            fingerprint=ready.fingerprint,
            codec=ready.codec,
            block_tokens=ready.block_tokens,
            max_context=ready.max_context,
            eos_token_ids=frozenset(ready.eos_token_ids),
            device=ready.device,
            vocab_size=ready.vocab_size,
        )

    def tokenizer_files(self) -> dict[str, bytes]:
        return tokenizer_files(self.tokenizer)

    def namespace(self, tenant: str) -> Namespace:
        """The connector's namespace for `tenant`: the store keys this worker's blocks have."""
        ready = self.ready
        salt = tenant_salt(tenant, self.config.namespace_secret)
        return Namespace(ready.fingerprint, ready.codec, ready.block_tokens, salt)

    def check(self, request: WorkRequest) -> None:
        """What this engine refuses that the transformers engine serves, and the context."""
        if request.max_cache_tokens:
            raise InvalidArgument(
                "max_cache_tokens: the vllm engine does not bound a request's cache (sinks and "
                "a recent window); serve with --engine transformers for bounded sessions"
            )
        if request.fetch_plan and request.fetch_plan != self.config.fetch_plan:
            raise InvalidArgument(
                f"fetch_plan {request.fetch_plan!r}: the vllm engine's fetch plan is fixed when "
                f"it starts (--fetch-plan {self.config.fetch_plan})"
            )
        check_context(
            len(request.token_ids), request.params.max_new_tokens, self.ready.max_context, None
        )

    def generate(self, request: WorkRequest) -> Iterator[TokenEvent | WorkDone]:
        """Stream the output's tokens, then one WorkDone."""
        started = time.perf_counter()
        self.check(request)
        params = request.params
        sequence = (*request.token_ids, *request.prior_output)
        request_id = request.request_id or os.urandom(8).hex()
        if self.link.take_cancel(request_id):
            return
        out = OutputText(self._decode, params, self.ready.eos_token_ids, list(request.prior_output))
        inbox = self.link.open(request_id)
        first_at: float | None = None
        ended: Finished | None = None
        self.counters.count(requests=1, in_flight=1)
        try:
            self.link.send(Submit(
                request_id, sequence, params.max_new_tokens - len(request.prior_output),
                temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                seed=params.seed, ignore_eos=params.ignore_eos, cache_salt=request.tenant,
                read_cache=request.read_cache,
            ))  # fmt: skip
            deadline = started + request.prefill_timeout_s if request.prefill_timeout_s else None
            while ended is None:
                message = self._next(inbox, None if first_at is not None else deadline, request)
                if isinstance(message, Finished):
                    ended = message
                    break
                for token in message.token_ids:
                    if out.done:
                        break
                    if first_at is None:
                        first_at = time.perf_counter()
                    yield out.add(token)
                if out.done:  # a stop string, or the last token: vLLM may not know yet
                    ended = self._end(request_id, inbox)
        finally:
            self.link.close(request_id, finished=ended is not None)
            self.counters.count(in_flight=-1)
        if ended.reason == "abort" and not out.done:
            return  # cancelled: its client has gone
        if not out.done and ended.reason == "eos":
            out.finish_reason = "eos"  # a stop token vLLM knows beyond ours
        yield self._done(out, ended, len(sequence), started, first_at, len(request.prior_output))

    def _next(
        self, inbox: "queue.Queue[Any]", deadline: float | None, request: WorkRequest
    ) -> Tokens | Finished:
        """The request's next message; PrefillTimeout past `deadline` (before the first token)."""
        try:
            wait = None if deadline is None else max(0.0, deadline - time.perf_counter())
            message = inbox.get(timeout=wait)
        except queue.Empty:
            raise PrefillTimeout(
                f"prefill of {len(request.token_ids)} tokens took longer than the gateway's "
                f"--prefill-timeout={request.prefill_timeout_s:g} s; send a shorter prompt"
            ) from None
        if message is GONE:
            raise Unavailable("the vLLM engine process is gone")
        if isinstance(message, Failed):
            raise error(message.kind, message.message)
        return message

    def _end(self, request_id: str, inbox: "queue.Queue[Any]") -> Finished:
        """The output is complete on our side: the engine's Finished, after an abort if vLLM
        would go on (a stop string it was not told about)."""
        self.link.send(Abort(request_id))
        while True:
            message = inbox.get(timeout=CONTROL_TIMEOUT_S)
            if message is GONE:
                raise Unavailable("the vLLM engine process is gone")
            if isinstance(message, Finished):
                # Aborted by us or finished on its own: the usage is what it loaded either way.
                return message
            if isinstance(message, Failed):
                return Finished(request_id, "length")

    def _done(
        self,
        out: OutputText,
        ended: Finished,
        sequence_tokens: int,
        started: float,
        first_at: float | None,
        prior: int,
    ) -> WorkDone:
        local, store = ended.local_tokens, ended.store_tokens
        plan = ended.plan if ended.plan in PLAN_KINDS else "none"
        self.counters.count(
            cached_local_tokens=local,
            cached_store_tokens=store,
            computed_tokens=max(0, sequence_tokens - local - store),
            recomputed_tokens=ended.recomputed_tokens,
            plan=plan,
        )
        now = time.perf_counter()
        generated = len(out.tokens) - prior
        decode_s = now - (first_at or now)
        return WorkDone(
            finish_reason=out.finish_reason,
            token_ids=tuple(out.tokens),
            text=out.text,
            usage=WorkUsage(
                prompt_tokens=sequence_tokens - prior,
                cached_local_tokens=local,
                cached_store_tokens=store,
                completion_tokens=len(out.tokens),
                ttft_ms=((first_at or now) - started) * 1000.0,
                tokens_per_s=(generated - 1) / decode_s if generated > 1 and decode_s > 0 else 0.0,
                worker=self.worker_id,
                plan=plan,
                recomputed_tokens=ended.recomputed_tokens,
            ),
        )

    def prefill(self, token_ids: Sequence[int], tenant: str = "") -> PrefillResult:
        """Compute the prompt once and wait until its full blocks are in the store."""
        request_id = os.urandom(8).hex()
        inbox = self.link.open(request_id)
        try:
            self.link.send(Submit(request_id, tuple(token_ids), 1, cache_salt=tenant, prefill=True))
            while True:
                message = inbox.get()
                if message is GONE:
                    raise Unavailable("the vLLM engine process is gone")
                if isinstance(message, Failed):
                    raise error(message.kind, message.message)
                if isinstance(message, Finished):
                    break
        finally:
            self.link.close(request_id, finished=True)
        size = self.ready.block_tokens
        stored = 0
        if self._store is not None:
            hashes = chain_hashes(self.namespace(tenant), list(token_ids))
            try:
                stored = self._store.lookup([block_key(h) for h in hashes]) if hashes else 0
            except errors.KvpoolError as exc:
                log.warning("store lookup after prefill failed: %s", exc)
        return PrefillResult(
            prompt_tokens=len(token_ids),
            stored_tokens=stored * size,
            cached_tokens=message.local_tokens + message.store_tokens,
            worker=self.worker_id,
        )

    def cancel(self, request_id: str) -> None:
        """Abort the vLLM request `request_id` (its client went away)."""
        if request_id:
            self.link.cancel(request_id)

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until every block the connector saved so far is in the store."""
        try:
            return self.link.ping(flush=True, timeout_s=timeout_s).pending_blocks == 0
        except Unavailable:
            return False

    def stats(self) -> WorkerStats:
        pong = self.link.ping(timeout_s=5.0)
        # The connector counts what failed to load; a failed lookup it serves as a miss, uncounted.
        counts = {**self.counters.snapshot(), "corrupt_blocks": pong.load_errors}
        return WorkerStats(
            worker_id=self.worker_id,
            **counts,
            local=LocalStats(0, 0, 0, 0, 0, 0),  # vLLM's prefix cache: vLLM's own metrics
            writes=WriteStats(
                submitted=pong.saved_blocks,
                stored=pong.stored_blocks,
                dropped=pong.dropped_blocks,
                failed=pong.failed_blocks,
                pending=pong.pending_blocks,
            ),
            batch_running=pong.running,
            batch_waiting=pong.waiting,
        )

    def close(self) -> None:
        """Let the connector put what it saved, then end the engine process."""
        if self.link.closing:
            return
        self.flush()
        self.link.stop()
        if self._store is not None:
            self._store.close()

    # --- internals ---------------------------------------------------------------------------

    def _decode(self, token_ids: list[int]) -> str:
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=True))


def _sees_gpu() -> bool:
    """Whether this process may use a GPU (Ray sets CUDA_VISIBLE_DEVICES for a GPU actor)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return bool(visible.strip()) and visible.strip() != "-1"
    return Path("/dev/nvidia0").exists()
