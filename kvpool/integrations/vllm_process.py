"""The vLLM engine of one kvpool worker actor, in a process of its own (`--engine vllm`).

    .venv-vllm/bin/python -m kvpool.integrations.vllm_process --fd N

vLLM cannot be imported beside Ray and kvpool's worker code (it pins other torch and
transformers versions), so the worker actor (`workers.vllm_worker`) starts this module with the
python of `make vllm`'s venv and talks to it over the socket inherited as fd N, in
`workers.vllm_wire` records: a `Start` first, then `Submit`, `Abort` and `Ping`; it answers
`Ready` (or `StartFailed`), then each request's `Tokens` and `Finished` (or `Failed`), and `Pong`.

One `LLMEngine` runs here in-process (no engine-core subprocess: VLLM_ENABLE_V1_MULTIPROCESSING=0),
prefix caching on, with kvpool's connector (`ReportingConnector`, below) pointed at the stack's
store: a prompt another worker computed is loaded from the store, and what this one computes is
saved there. The main thread owns the engine and steps it while it has requests; a reader thread
queues the actor's messages. The process ends when the socket closes or its parent (the actor)
dies, whichever it sees first.

Alongside `kvpool.integrations.vllm`, the only kvpool module that imports vLLM, and only ever run
as this program in vLLM's venv: no kvpool module imports it.
"""

import argparse
import logging
import os
import queue
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from kvpool import errors
from kvpool.integrations.vllm import KVPoolConnector, model_fingerprint
from workers.vllm_wire import (
    Abort,
    Failed,
    Finished,
    Ping,
    Pong,
    Ready,
    Start,
    StartFailed,
    Submit,
    Tokens,
    WireError,
    receive,
    send,
)

log = logging.getLogger("kvpool.vllm_process")

# vLLM block sizes tried, largest first: the largest that divides kvpool's block is used.
ENGINE_BLOCK_SIZES = (128, 64, 32, 16)
IDLE_WAIT_S = 0.5  # how long an idle engine waits for a message before checking its parent


class ReportingConnector(KVPoolConnector):
    """kvpool's connector, also telling where each request's cached prompt tokens came from.

    vLLM's request output counts cached tokens in one sum (its own prefix cache plus what a
    connector loaded); the worker's usage splits them by tier and names the fetch plan. The
    scheduler side learns both when vLLM asks how many tokens the store can give: `report`
    hands them to the engine's host, in this process (the engine core runs in-process here).
    It also sums the worker side's counts (loads that failed, blocks saved) for `Pong`.
    """

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        self._reports: dict[str, _Report] = {}
        self.counts = {"load_errors": 0, "saved_blocks": 0}

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int):
        loaded, is_async = super().get_num_new_matched_tokens(request, num_computed_tokens)
        tracked = self._requests.get(request.request_id)
        size = self._block_tokens
        stored = tracked.stored if tracked is not None else 0
        loadable = max(0, min(stored, (len(request.prompt_token_ids or ()) - 1) // size))
        beyond = max(0, loadable * size - num_computed_tokens)  # what the store could add
        if loaded:
            report = _Report(loaded, "fetch")
        elif beyond:
            report = _Report(0, "recompute", beyond)
        else:
            report = _Report()
        self._reports[request.request_id] = report
        return loaded, is_async

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int):
        super().update_state_after_alloc(request, blocks, num_external_tokens)
        report = self._reports.get(request.request_id)
        if report is not None and num_external_tokens == 0 and report.store_tokens:
            # vLLM took none of it (read_cache false: skip_reading_prefix_cache).
            self._reports[request.request_id] = _Report()

    def update_connector_output(self, connector_output: Any) -> None:
        super().update_connector_output(connector_output)
        stats = getattr(connector_output, "kv_connector_stats", None)
        if stats is not None:
            for name in self.counts:  # counters by label value (vllm_metrics): all of them
                self.counts[name] += int(sum(stats.data.get(name, {}).values()))

    def report(self, internal_id: str) -> "_Report":
        """Where the request's cached tokens came from, once (the host asks as it ends it)."""
        return self._reports.pop(internal_id, None) or _Report()


@dataclass(frozen=True, slots=True)
class _Report:
    store_tokens: int = 0  # loaded from the store
    plan: str = "none"  # none | fetch | recompute
    recomputed_tokens: int = 0  # held by the store, computed because the plan said so


@dataclass(slots=True)
class _Live:
    """A request the engine runs: vLLM's id for it, and what its outputs said so far."""

    internal_id: str
    prefill: bool
    cached_tokens: int = 0  # vLLM's count: its prefix cache and the connector's loads


def engine_block_size(block_tokens: int) -> int:
    for size in ENGINE_BLOCK_SIZES:
        if block_tokens % size == 0:
            return size
    raise errors.InvalidArgument(
        f"--block-tokens {block_tokens} is not a multiple of 16: with --engine vllm a kvpool "
        f"block spans whole vLLM blocks (of {', '.join(map(str, ENGINE_BLOCK_SIZES))} tokens)"
    )


class EngineHost:
    """One LLMEngine, driven by the actor's messages."""

    def __init__(self, sock: socket.socket, stream: Any, start: Start) -> None:
        self._sock = sock
        self._stream = stream
        self._start = start
        self._inbox: queue.Queue[Any] = queue.Queue()
        self._live: dict[str, _Live] = {}
        self.engine = self._build(start)

    @staticmethod
    def _build(start: Start) -> Any:
        from vllm.engine.arg_utils import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        transfer = None
        if start.store:
            extra: dict[str, Any] = {
                "store": start.store,
                "codec": start.codec,
                "block_tokens": start.block_tokens,
                "timeout_s": min(60.0, start.store_timeout_s),
                "plan": start.fetch_plan,
            }
            if start.store_auth_token:
                extra["auth_token"] = start.store_auth_token
            if start.namespace_secret:
                extra["namespace_secret"] = start.namespace_secret.decode()
            transfer = {
                "kv_connector": "ReportingConnector",
                "kv_connector_module_path": __spec__.name if __spec__ else __name__,
                "kv_role": "kv_both",
                "kv_connector_extra_config": extra,
            }
        args = EngineArgs(
            model=start.model,
            dtype=start.dtype,
            enforce_eager=start.enforce_eager,
            enable_prefix_caching=True,
            block_size=engine_block_size(start.block_tokens),
            max_num_seqs=start.max_num_seqs,
            max_model_len=start.max_model_len or None,
            kv_cache_memory_bytes=start.kv_cache_bytes or None,
            seed=0,
            kv_transfer_config=transfer,
        )
        return LLMEngine.from_engine_args(args)

    def ready(self) -> Ready:
        engine = self.engine
        model = engine.model_config
        from vllm.platforms import current_platform

        eos: set[int] = set()
        tokenizer_eos = getattr(engine.get_tokenizer(), "eos_token_id", None)
        generation_eos = model.try_get_generation_config().get("eos_token_id")
        for source in (tokenizer_eos, generation_eos):
            if isinstance(source, int):
                eos.add(source)
            elif isinstance(source, list | tuple):
                eos.update(int(i) for i in source)
        codec = self._start.codec
        if self._start.store:
            codec = _connector_settings(engine).codec_for(str(model.dtype).removeprefix("torch."))
        return Ready(
            model=self._start.model,
            fingerprint=model_fingerprint(engine.vllm_config),
            codec=codec,
            block_tokens=self._start.block_tokens,
            max_context=int(model.max_model_len),
            eos_token_ids=tuple(sorted(eos)),
            vocab_size=int(model.get_vocab_size()),
            device="cpu" if current_platform.is_cpu() else str(current_platform.device_type),
        )

    # --- the loop -------------------------------------------------------------------------

    def read_forever(self) -> None:
        """The reader thread: every message into the inbox, then None when the socket ends."""
        try:
            while (message := receive(self._stream)) is not None:
                self._inbox.put(message)
        except (OSError, WireError) as exc:
            log.error("the actor's socket failed: %s", exc)
        self._inbox.put(None)

    def serve(self) -> None:
        while True:
            busy = self.engine.has_unfinished_requests()
            try:
                message = self._inbox.get(timeout=0 if busy else IDLE_WAIT_S)
            except queue.Empty:
                message = False
            while message is not False:
                if message is None:
                    return  # the actor closed the socket
                self._handle(message)
                try:
                    message = self._inbox.get_nowait()
                except queue.Empty:
                    message = False
            if self.engine.has_unfinished_requests():
                self._step()

    def _handle(self, message: Any) -> None:
        if isinstance(message, Submit):
            self._submit(message)
        elif isinstance(message, Abort):
            if message.request_id in self._live:
                self.engine.abort_request([message.request_id])
                send(self._sock, self._finished(message.request_id, "abort"))
        elif isinstance(message, Ping):
            if message.flush:
                _flush_saves()
            send(self._sock, self._pong(message.nonce))
        else:
            log.error("unexpected message from the actor: %r", message)

    def _submit(self, submit: Submit) -> None:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        try:
            params = SamplingParams(
                max_tokens=submit.max_tokens,
                temperature=submit.temperature,
                top_p=submit.top_p,
                top_k=submit.top_k,
                seed=submit.seed,
                ignore_eos=submit.ignore_eos,
                detokenize=False,  # the actor makes the text (workers.detokenizer), as kvpool's
                output_kind=RequestOutputKind.DELTA,
                skip_reading_prefix_cache=not submit.read_cache or None,
            )
            prompt: dict[str, Any] = {"prompt_token_ids": list(submit.token_ids)}
            if submit.cache_salt:
                prompt["cache_salt"] = submit.cache_salt
            internal_id = self.engine.add_request(submit.request_id, prompt, params)
        except Exception as exc:  # vLLM's own checks: the request's fault
            send(self._sock, Failed(submit.request_id, "InvalidArgument", f"vLLM: {exc}"))
            return
        self._live[submit.request_id] = _Live(internal_id, submit.prefill)

    def _step(self) -> None:
        for output in self.engine.step():
            request_id = output.request_id
            live = self._live.get(request_id)
            if live is None:
                continue
            if output.num_cached_tokens is not None:
                live.cached_tokens = int(output.num_cached_tokens)
            completion = output.outputs[0]
            if completion.token_ids:
                send(self._sock, Tokens(request_id, tuple(completion.token_ids)))
            if not output.finished:
                continue
            reason = completion.finish_reason
            if reason not in ("length", "stop"):
                self._finished(request_id, "abort")
                send(self._sock, Failed(request_id, "Unavailable", f"vLLM ended it: {reason}"))
                continue
            if live.prefill:
                _flush_saves()
            send(self._sock, self._finished(request_id, "eos" if reason == "stop" else "length"))

    def _finished(self, request_id: str, reason: str) -> Finished:
        """The request's end, its usage from vLLM's count and the connector's report."""
        live = self._live.pop(request_id)
        connector = getattr(_scheduler(self.engine), "connector", None)
        report = connector.report(live.internal_id) if connector is not None else _Report()
        store = min(live.cached_tokens, report.store_tokens)
        return Finished(
            request_id, reason, local_tokens=live.cached_tokens - store, store_tokens=store,
            plan=report.plan, recomputed_tokens=report.recomputed_tokens,
        )  # fmt: skip

    def _pong(self, nonce: int) -> Pong:
        counts = _scheduler_counts(self.engine)
        writes = _writer_stats()
        scheduler = _scheduler(self.engine)
        return Pong(
            nonce,
            running=len(getattr(scheduler, "running", ())),
            waiting=len(getattr(scheduler, "waiting", ())),
            saved_blocks=counts.get("saved_blocks", 0),
            stored_blocks=getattr(writes, "stored", 0),
            dropped_blocks=getattr(writes, "dropped", 0),
            failed_blocks=getattr(writes, "failed", 0),
            pending_blocks=getattr(writes, "pending", 0),
            load_errors=counts.get("load_errors", 0),
        )


# --- what vLLM holds in this process ------------------------------------------------------------


def _scheduler(engine: Any) -> Any:
    """vLLM's scheduler, in-process here (InprocClient); None where vLLM moved it."""
    core = getattr(getattr(engine, "engine_core", None), "engine_core", None)
    return getattr(core, "scheduler", None)


def _scheduler_counts(engine: Any) -> dict[str, int]:
    connector = getattr(_scheduler(engine), "connector", None)
    return dict(getattr(connector, "counts", {}))


def _connector_settings(engine: Any) -> Any:
    from kvpool.integrations.vllm_settings import ConnectorSettings

    transfer = engine.vllm_config.kv_transfer_config
    return ConnectorSettings.from_extra(transfer.kv_connector_extra_config)


def _worker_connector() -> Any:
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    return get_kv_transfer_group() if has_kv_transfer_group() else None


def _flush_saves(timeout_s: float = 30.0) -> None:
    """Wait until the connector's write-behind has put every save (a Prefill call's promise)."""
    connector = _worker_connector()
    if connector is not None and not connector.flush(timeout_s):
        log.warning("saves not flushed within %.0f s", timeout_s)


def _writer_stats() -> Any:
    writer = getattr(_worker_connector(), "_writer", None)
    return writer.stats() if writer is not None else None


def _watch_parent(parent: int) -> None:
    """End this process when the actor that started it is gone (killed, it cannot say so)."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _failure(exc: BaseException) -> StartFailed:
    if isinstance(exc, errors.KvpoolError):
        return StartFailed(type(exc).__name__, str(exc))
    # vLLM's own start errors (a bad model, no memory) come as ValueError, RuntimeError, ...
    cause: BaseException = exc
    while cause.__cause__ is not None:
        cause = cause.__cause__
    if isinstance(cause, errors.KvpoolError):  # the connector's, wrapped by vLLM
        return StartFailed(type(cause).__name__, str(cause))
    return StartFailed("Unavailable", f"vLLM did not start: {type(exc).__name__}: {exc}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvpool.integrations.vllm_process")
    parser.add_argument("--fd", type=int, required=True, help="the actor's end of a socket pair")
    parser.add_argument("--worker", default="", help="the worker's id (names the process in ps)")
    parser.add_argument("--parent", type=int, default=os.getppid(), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("KVPOOL_LOG_LEVEL", "WARNING"))
    threading.Thread(target=_watch_parent, args=(args.parent,), daemon=True).start()
    sock = socket.socket(fileno=args.fd)
    stream = sock.makefile("rb")
    first = receive(stream)
    if not isinstance(first, Start):
        log.error("the actor's first message is not a Start: %r", first)
        return 2
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process
    try:
        host = EngineHost(sock, stream, first)
        ready = host.ready()
    except Exception as exc:
        send(sock, _failure(exc))
        return 1
    send(sock, ready)
    threading.Thread(target=host.read_forever, name="kvpool-vllm-reader", daemon=True).start()
    host.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
