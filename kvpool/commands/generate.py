"""`kvpool generate`: generate text in-process (`--local`) or through a running gateway.

Text streams to stdout as it is produced. With `--json` one JSON object is printed at the end
instead: {"text", "token_ids", "finish_reason", "usage": {...}}. Those names are a contract;
later versions add fields, they never rename them.
"""

import argparse
import json
import sys

from kvpool.config import env_default
from services.auth_flags import add_client_flags
from workers.api import SamplingParams, WorkerConfig
from workers.kv.bounds import DEFAULT_SINK_TOKENS

SAMPLING = SamplingParams()  # the defaults of the sampling flags


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the prompt text")
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--local",
        action="store_true",
        help="run the model in this process, with no servers (the default "
        "when --target is not given)",
    )
    where.add_argument(
        "--target",
        default=env_default("--target", None),
        metavar="HOST:PORT",
        help="a kvpool gateway to send the request to (env KVPOOL_TARGET)",
    )
    parser.add_argument(
        "--model",
        default=env_default("--model", WorkerConfig().model),
        help=f"{WorkerConfig().model} (default), tiny-random, a local folder or a HF id "
        "(--local only; a gateway serves its own model)",
    )
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: auto)")
    parser.add_argument("--max-new-tokens", type=int, default=SAMPLING.max_new_tokens)
    parser.add_argument(
        "--temperature", type=float, default=SAMPLING.temperature, help="0 is greedy (default)"
    )
    parser.add_argument("--top-p", type=float, default=SAMPLING.top_p)
    parser.add_argument("--top-k", type=int, default=SAMPLING.top_k)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="stop when this text appears (repeatable)",
    )
    parser.add_argument("--system", default=None, help="a system message for the chat template")
    parser.add_argument(
        "--raw",
        action="store_true",
        help="send the prompt as plain text, without the chat template",
    )
    parser.add_argument(
        "--no-cache",
        action="store_true",
        help="recompute the whole sequence at every step (for comparison)",
    )
    parser.add_argument("--session", default=None, help="continue this session (--target only)")
    parser.add_argument(
        "--max-cache-tokens",
        type=int,
        default=None,
        help="bound the KV cache: keep --sink-tokens plus the most recent tokens, evict the "
        "middle (default: unbounded, or the session's or gateway's bound)",
    )
    parser.add_argument(
        "--sink-tokens",
        type=int,
        default=None,
        help=f"first tokens a bounded cache always keeps (default {DEFAULT_SINK_TOKENS})",
    )
    parser.add_argument(
        "--tenant",
        default=env_default("--tenant", None),
        help="tenant name when the gateway runs without auth; with auth the token decides "
        "(--target only)",
    )
    add_client_flags(parser)
    parser.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="deadline in seconds for the whole request (--target only)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")


def run(args: argparse.Namespace) -> int:
    if args.target:
        return _run_remote(args)
    if args.session or args.tenant:
        raise ValueError("--session and --tenant need a gateway: pass --target HOST:PORT")
    return _run_local(args)


def messages_for(args: argparse.Namespace) -> list[dict[str, str]] | None:
    """The chat messages for the prompt, or None when it goes as plain text (`--raw`)."""
    if args.raw:
        return None
    messages = [{"role": "system", "content": args.system}] if args.system else []
    return [*messages, {"role": "user", "content": args.prompt}]


def _run_remote(args: argparse.Namespace) -> int:
    """`kvpool generate --target HOST:PORT ...`: stream to stdout, or print one JSON object."""
    from kvpool.v1 import inference_pb2 as pb
    from services.auth import channel_credentials, client_token, read_pem
    from services.gateway.client import FINISH_REASON_NAMES, InferenceClient, usage_dict

    if not args.prompt.strip():
        raise ValueError("prompt is empty; give some text to continue")
    messages = messages_for(args)
    request: dict[str, object] = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.seed,
        "stop": tuple(args.stop),
        "session_id": args.session or "",
        "tenant": args.tenant or "",
        "max_cache_tokens": args.max_cache_tokens,
        "sink_tokens": args.sink_tokens,
    }
    if messages is None:
        request["prompt"] = args.prompt
    else:
        request["messages"] = messages
    client = InferenceClient(
        args.target,
        timeout_s=args.timeout,
        auth_token=client_token(args.auth_token, args.auth_token_file),
        credentials=channel_credentials(read_pem(args.tls_ca_file, "TLS CA certificate")),
        # Through a port-forward the address is 127.0.0.1, but the certificate names the Service.
        options=[("grpc.ssl_target_name_override", args.tls_server_name)]
        if args.tls_server_name
        else (),
    )
    with client:
        if args.json:
            print(json.dumps(client.generate(**request).as_json(), ensure_ascii=False))
            return 0
        last = pb.GenerateResponse()
        for chunk in client.stream(**request):
            if chunk.text:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
            last = chunk
    u = usage_dict(last.usage)
    tiers = u["cached_tokens_by_tier"]
    print(
        f"\n[{FINISH_REASON_NAMES.get(last.finish_reason, 'unknown')}] prompt={u['prompt_tokens']} "
        f"cached={u['cached_tokens']} (local {tiers['local']}, node {tiers['node']}, "
        f"store {tiers['store']}) "
        f"completion={u['completion_tokens']} ttft={u['ttft_ms']:.0f}ms "
        f"{u['tokens_per_s']:.1f} tok/s worker={u['worker']}"
        + (f" session={u['session_id']}" if u["session_id"] else ""),
        file=sys.stderr,
    )
    return 0


def _run_local(args: argparse.Namespace) -> int:
    from workers.api import SamplingParams
    from workers.engine import Engine

    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop),
    )
    if not args.prompt.strip():
        raise ValueError("prompt is empty; give some text to continue")
    from workers.kv.bounds import requested_window
    from workers.models import load_model
    from workers.prompt import PromptEncoder

    loaded = load_model(args.model, device=args.device)
    engine, prompts = Engine(loaded), PromptEncoder.for_model(loaded)
    messages = messages_for(args)
    if messages is not None and loaded.tokenizer.chat_template is not None:
        prompt_ids = prompts.encode(messages=messages)
    else:
        prompt_ids = prompts.encode(prompt=args.prompt)

    sinks = DEFAULT_SINK_TOKENS if args.sink_tokens is None else args.sink_tokens
    window = requested_window(
        args.max_cache_tokens or 0, sinks, block_tokens=WorkerConfig().block_tokens
    )
    if window is not None and args.no_cache:
        raise ValueError("--max-cache-tokens bounds the cache; it cannot go with --no-cache")
    generation = engine.stream(prompt_ids, params, use_cache=not args.no_cache, window=window)
    for event in generation:
        if not args.json and event.text:
            sys.stdout.write(event.text)
            sys.stdout.flush()
    result = generation.run()
    if args.json:
        print(json.dumps(result_json(result), ensure_ascii=False))
    else:
        usage = result.usage
        print(
            f"\n[{result.finish_reason}] prompt={usage.prompt_tokens} cached={usage.cached_tokens} "
            f"completion={usage.completion_tokens} ttft={usage.ttft_ms:.0f}ms "
            f"{usage.tokens_per_s:.1f} tok/s",
            file=sys.stderr,
        )
    return 0


def result_json(result) -> dict:
    usage = result.usage
    return {
        "text": result.text,
        "token_ids": result.token_ids,
        "finish_reason": result.finish_reason,
        "usage": {
            "prompt_tokens": usage.prompt_tokens,
            "cached_tokens": usage.cached_tokens,
            "completion_tokens": usage.completion_tokens,
            "ttft_ms": round(usage.ttft_ms, 3),
            "tokens_per_s": round(usage.tokens_per_s, 3),
            "evicted_tokens": usage.evicted_tokens,
        },
    }
