"""A stand-in for `kvpool.integrations.vllm_process` that speaks the wire without vLLM, for the
link's unit tests. Its `Start.model` says how it behaves:

    "ok"          Ready; a Submit gets its first max_tokens prompt ids back as one Tokens each,
                  then Finished("length"); an Abort of a live request gets Finished("abort");
                  "hang" as a prompt of token id 7 never finishes (until aborted)
    "refuse"      StartFailed(InvalidArgument)
    "crash"       prints a line and exits before Ready
    "die-on-submit"  Ready, then exits at the first Submit
"""

import argparse
import socket
import sys

from workers.vllm_wire import (
    Abort,
    Finished,
    Ping,
    Pong,
    Ready,
    StartFailed,
    Submit,
    Tokens,
    receive,
    send,
)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fd", type=int)
    parser.add_argument("--worker")
    args = parser.parse_args()
    sock = socket.socket(fileno=args.fd)
    stream = sock.makefile("rb")
    start = receive(stream)
    if start.model == "refuse":
        send(sock, StartFailed("InvalidArgument", "no such model"))
        return 1
    if start.model == "crash":
        print("the fake engine crashed on purpose", flush=True)
        return 3
    ready = Ready(start.model, "fake|fp", start.codec, start.block_tokens, 256, (2,), 100, "cpu")
    send(sock, ready)
    live: set[str] = set()
    while (message := receive(stream)) is not None:
        if isinstance(message, Submit):
            if start.model == "die-on-submit":
                return 4
            if message.token_ids[0] == 7:
                live.add(message.request_id)
                continue
            for token in message.token_ids[: message.max_tokens]:
                send(sock, Tokens(message.request_id, (token,)))
            send(sock, Finished(message.request_id, "length", local_tokens=1, store_tokens=2))
        elif isinstance(message, Abort) and message.request_id in live:
            live.discard(message.request_id)
            send(sock, Finished(message.request_id, "abort"))
        elif isinstance(message, Ping):
            send(sock, Pong(message.nonce, running=len(live)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
