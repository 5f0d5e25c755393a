"""The link from a worker actor to its vLLM engine process: start it, send it records, route
its answers to the requests that wait for them.

`EngineLink` starts `kvpool.integrations.vllm_process` with the python of vLLM's venv, hands it
one end of a socket pair (fd passing; the `Start` record goes first, over the socket, so no
secret is on a command line), waits for its `Ready`, and then runs one reader thread that puts
each message in the queue of its request (`open`) or answers a waiting `ping`. Sends share one
lock. The engine process writes its log to a file (`log_path`), whose tail the errors quote.

When the socket ends and the link is not closing, the engine process is gone with every request
on it: every open request's queue gets `GONE`, and the actor's own process exits, so Ray reports
the actor dead and the gateway fails the streams over and replaces the worker, as for any dead
worker (`exit_on_loss=False` keeps the process, for tests that drive a link directly).
"""

import contextlib
import itertools
import logging
import os
import queue
import socket
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

from kvpool import errors
from kvpool.errors import Unavailable
from workers.vllm_wire import (
    Abort,
    Message,
    Ping,
    Pong,
    Ready,
    Start,
    StartFailed,
    WireError,
    receive,
    send,
)

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]  # the checkout: the engine process imports it too
ENGINE_MODULE = "kvpool.integrations.vllm_process"
START_TIMEOUT_S = 600.0  # a model load in a fresh process
CONTROL_TIMEOUT_S = 30.0  # a Ping's answer, a flush's included
GONE = object()  # put in every open request's queue when the engine process is gone


class EngineLink:
    def __init__(
        self,
        python: str,
        worker_id: str,
        start: Start,
        *,
        exit_on_loss: bool = True,
        module: str = ENGINE_MODULE,  # the program (tests run a fake engine)
    ) -> None:
        self.worker_id = worker_id
        self._module = module
        self._exit_on_loss = exit_on_loss
        self._send_lock = threading.Lock()
        self._queues: dict[str, queue.Queue[Any]] = {}
        self._queues_lock = threading.Lock()
        self._pongs: dict[int, queue.Queue[Pong]] = {}
        self._nonces = itertools.count(1)
        self._cancelled: dict[str, None] = {}  # cancels that came before their request
        self.closing = False
        ours, theirs = socket.socketpair()
        self._sock = ours
        self.log_path = Path(tempfile.gettempdir()) / f"kvpool-vllm-{worker_id}.log"
        self.process = self._spawn(python, theirs)
        theirs.close()
        self._stream = ours.makefile("rb")
        self.ready = self._handshake(start)
        self._reader = threading.Thread(target=self._read, name="kvpool-vllm-reader", daemon=True)
        self._reader.start()

    def _spawn(self, python: str, theirs: socket.socket) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
        env["PYTHONPATH"] = str(ROOT)  # this checkout's kvpool, whatever vLLM's venv installed
        level = os.environ.get("KVPOOL_LOG_LEVEL", "WARNING")
        env.setdefault("VLLM_LOGGING_LEVEL", "INFO" if level == "DEBUG" else "WARNING")
        fd = str(theirs.fileno())
        argv = [python, "-m", self._module, "--fd", fd, "--worker", self.worker_id]
        out = open(self.log_path, "ab")  # noqa: SIM115 (the child's; it keeps its own copy)
        try:
            return subprocess.Popen(
                argv, cwd=ROOT, env=env, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        finally:
            out.close()

    def _handshake(self, start: Start) -> Ready:
        self._sock.settimeout(START_TIMEOUT_S)
        try:
            send(self._sock, start)
            reply = receive(self._stream)
        except (OSError, WireError) as exc:
            reply = StartFailed("Unavailable", f"no answer: {exc}")
        finally:
            self._sock.settimeout(None)
        if isinstance(reply, Ready):
            return reply
        self.stop()
        if isinstance(reply, StartFailed):
            raise error(reply.kind, f"the vLLM engine did not start: {reply.message}")
        raise Unavailable(
            f"the vLLM engine process exited before it was ready; its log: {self.log_path}\n"
            + self.log_tail()
        )

    def _read(self) -> None:
        """The reader thread: each message to its request's queue; at the end, GONE to each."""
        try:
            while (message := receive(self._stream)) is not None:
                if isinstance(message, Pong):
                    waiter = self._pongs.pop(message.nonce, None)
                    if waiter is not None:
                        waiter.put(message)
                    continue
                with self._queues_lock:
                    target = self._queues.get(getattr(message, "request_id", ""))
                if target is not None:
                    target.put(message)
        except (OSError, WireError) as exc:
            log.error("the vLLM engine's socket failed: %s", exc)
        with self._queues_lock:
            for target in self._queues.values():
                target.put(GONE)
        if not self.closing:
            log.error(
                "the vLLM engine process of worker %s exited (code %s); its log: %s\n%s",
                self.worker_id, self.process.poll(), self.log_path, self.log_tail(),
            )  # fmt: skip
            if self._exit_on_loss:
                os._exit(1)  # the worker is gone with its engine: Ray reports the actor dead

    # --- requests and control ----------------------------------------------------------------

    def send(self, message: Message) -> None:
        with self._send_lock:
            try:
                send(self._sock, message)
            except OSError as exc:
                raise Unavailable(f"the vLLM engine process is gone: {exc}") from None

    def open(self, request_id: str) -> "queue.Queue[Any]":
        """The queue the request's messages (then GONE, if the engine goes) arrive in."""
        inbox: queue.Queue[Any] = queue.Queue()
        with self._queues_lock:
            if request_id in self._queues:
                raise errors.InvalidArgument(f"request id {request_id!r} is already running")
            self._queues[request_id] = inbox
        return inbox

    def close(self, request_id: str, finished: bool) -> None:
        """Forget the request; abort it in the engine unless it `finished` there."""
        with self._queues_lock:
            self._queues.pop(request_id, None)
        if not finished:  # left early (cancelled, a timeout, the caller stopped reading)
            with contextlib.suppress(Unavailable):  # a dead engine runs nothing
                self.send(Abort(request_id))

    def cancel(self, request_id: str) -> None:
        """Abort `request_id` in the engine, or, not begun yet, as soon as it begins."""
        with self._queues_lock:
            live = request_id in self._queues
            if not live:
                self._cancelled[request_id] = None
                while len(self._cancelled) > 1024:  # a cancel may come after its request ended
                    del self._cancelled[next(iter(self._cancelled))]
        if live:
            self.send(Abort(request_id))

    def take_cancel(self, request_id: str) -> bool:
        """True once for a request cancelled before it began."""
        with self._queues_lock:
            return self._cancelled.pop(request_id, False) is None

    def ping(self, flush: bool = False, timeout_s: float = CONTROL_TIMEOUT_S) -> Pong:
        nonce = next(self._nonces)
        waiter: queue.Queue[Pong] = queue.Queue(maxsize=1)
        self._pongs[nonce] = waiter
        try:
            self.send(Ping(nonce, flush=flush))
            return waiter.get(timeout=timeout_s)
        except queue.Empty:
            raise Unavailable(f"the vLLM engine did not answer in {timeout_s:g} s") from None
        finally:
            self._pongs.pop(nonce, None)

    def stop(self) -> None:
        """End the engine process: the socket closes, and it exits (killed after 30 s)."""
        self.closing = True
        with contextlib.suppress(OSError):  # already closed
            self._sock.shutdown(socket.SHUT_RDWR)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def error(kind: str, message: str) -> errors.KvpoolError:
    """The kvpool error `kind` names (the engine process sends names, not exceptions)."""
    cls = getattr(errors, kind, None)
    if not (isinstance(cls, type) and issubclass(cls, errors.KvpoolError)):
        cls = Unavailable
    return cls(message)
